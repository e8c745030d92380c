"""The files next to a capture: per-packet labels (CSV) and the capture's metadata (JSON).

``corpus/mix.pcap`` has ``corpus/mix.labels.csv``, one line per packet::

    packet,scenario,class,client
    0,chrony,legitimate,17

(``packet`` is the record's index in the pcap, from 0; ``client`` is the client's
number inside its scenario: behind a NAT several clients share one address) and
``corpus/mix.meta.json`` with the seed, scale, duration and each scenario's class,
address blocks and packet count, which the live replay uses to set its counters.
"""

from __future__ import annotations

import ipaddress
import json
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..quoting import shown

FORMAT = "guardntp-capture/1"
LABELS_HEADER = "packet,scenario,class,client"
#: The group of packets in a capture without labels.
UNLABELLED = ("capture", "unlabelled")


class SidecarError(Exception):
    """A labels or metadata file is missing or malformed; the message is one line."""


def sidecar_paths(capture: str | Path) -> tuple[Path, Path]:
    """(labels CSV, metadata JSON) beside ``capture``."""
    path = Path(capture)
    stem = path.name[:-5] if path.name.endswith(".pcap") else path.name
    return path.with_name(stem + ".labels.csv"), path.with_name(stem + ".meta.json")


@dataclass
class Labels:
    """Packet index -> group index, and the groups as (scenario, class)."""

    groups: list[tuple[str, str]] = field(default_factory=list)
    group_of_packet: array[int] = field(default_factory=lambda: array("H"))
    client_of_packet: array[int] = field(default_factory=lambda: array("L"))

    def group_index(self, scenario: str, klass: str) -> int:
        key = (scenario, klass)
        try:
            return self.groups.index(key)
        except ValueError:
            self.groups.append(key)
            return len(self.groups) - 1


def read_labels(path: Path) -> Labels:
    """Read a labels CSV. Raises SidecarError."""
    labels = Labels()
    index_of: dict[tuple[str, str], int] = {}
    groups, clients = labels.group_of_packet, labels.client_of_packet
    try:
        with open(path, encoding="ascii") as file:
            header = file.readline().strip()
            if header != LABELS_HEADER:
                raise SidecarError(f"{path}: first line must be {LABELS_HEADER!r}")
            for number, line in enumerate(file):
                parts = line.rstrip("\n").split(",")
                if len(parts) != 4 or parts[0] != str(number):
                    raise SidecarError(f"{path}:{number + 2}: expected "
                                       f"'{number},SCENARIO,CLASS,CLIENT'")
                key = (parts[1], parts[2])
                group = index_of.get(key)
                if group is None:
                    group = index_of[key] = labels.group_index(*key)
                groups.append(group)
                clients.append(int(parts[3]) if parts[3].isdigit() else 0)
    except OSError as error:
        raise SidecarError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SidecarError(f"{path}: not a text labels file") from None
    return labels


def read_meta(path: Path) -> dict[str, Any]:
    """Read a capture's metadata JSON. Raises SidecarError."""
    try:
        meta = json.loads(path.read_text())
    except OSError as error:
        raise SidecarError(f"{path}: cannot read: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SidecarError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SidecarError(f"{path}: not a guardntp capture description ({FORMAT})")
    _check_meta(path, meta)
    return meta


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """The fields the replay reads, of the types it reads them as; else SidecarError."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value) and value >= 0)

    for key, fits, wanted in (("seed", whole, "a whole number >= 0"),
                              ("packets", whole, "a whole number >= 0"),
                              ("scale", number, "a finite number >= 0"),
                              ("duration_s", number, "a finite number >= 0")):
        if key in meta and not fits(meta[key]):
            raise SidecarError(f"{path}: {key} must be {wanted}, not {shown(meta[key])}")
    scenarios = meta.get("scenarios", [])
    if not isinstance(scenarios, list):
        raise SidecarError(f"{path}: scenarios must be a list")
    for index, scenario in enumerate(scenarios):
        if not (isinstance(scenario, dict) and isinstance(scenario.get("name"), str)
                and isinstance(scenario.get("class"), str)):
            raise SidecarError(f"{path}: scenarios[{index}] must be an object with a "
                               "\"name\" and a \"class\"")
        networks = scenario.get("networks", [])
        if not isinstance(networks, list):
            raise SidecarError(f"{path}: scenarios[{index}].networks must be a list of CIDRs")
        for cidr in networks:
            try:
                ipaddress.ip_network(cidr)
            except (TypeError, ValueError):
                raise SidecarError(f"{path}: scenarios[{index}].networks: {shown(cidr)} is "
                                   "not a CIDR") from None
