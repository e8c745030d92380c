"""Scenarios -> a pcap file plus its labels and metadata (``guardntp capture make``).

Rule: scapy (imported only here, and only when a capture is made) builds one
template frame per packet kind and address family; every packet is a copy of
its template with the source address, source port, TTL / hop limit, transmit
timestamp and checksums patched (``pcap.FrameTemplate``), which is what makes a
million packets take seconds rather than minutes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..timestamps import NS_PER_S, NTP_UNIX_OFFSET_S
from .pcap import FrameTemplate, PcapWriter, word_sum
from .scenarios import (
    CAPTURE_EPOCH_NS,
    KIND_PAYLOADS,
    SCENARIOS,
    SERVER_PORT,
    SERVER_V4,
    SERVER_V6,
    XMT_PATCHED,
    Kind,
    mix_events,
)
from .sidecar import FORMAT, LABELS_HEADER, sidecar_paths

#: lo is DLT_EN10MB with all-zero MAC addresses.
ZERO_MAC = "00:00:00:00:00:00"
#: progress(packets written so far, capture time reached in ns)
Progress = Callable[[int, int], None]
PROGRESS_EVERY = 1 << 14


class ScapyMissing(Exception):
    """scapy is not installed; the message says how to get it."""


def build_templates() -> dict[tuple[int, int], FrameTemplate]:
    """One template frame per (Kind, address length 4 or 16), built by scapy."""
    try:
        from scapy.layers.inet import IP, UDP
        from scapy.layers.inet6 import IPv6
        from scapy.layers.l2 import Ether
        from scapy.packet import Raw
    except ImportError:
        raise ScapyMissing("making captures needs scapy: pip install 'guardntp[tools]' "
                           "or apt install python3-scapy") from None
    templates: dict[tuple[int, int], FrameTemplate] = {}
    for kind, payload in KIND_PAYLOADS.items():
        for width in (4, 16):
            network = (IP(src="0.0.0.0", dst=SERVER_V4, ttl=64, id=0, flags="DF") if width == 4
                       else IPv6(src="::", dst=SERVER_V6, hlim=64))
            frame = Ether(src=ZERO_MAC, dst=ZERO_MAC) / network / \
                UDP(sport=0, dport=SERVER_PORT) / Raw(payload)
            templates[(kind, width)] = FrameTemplate(bytes(frame), kind in XMT_PATCHED)
    return templates


def make_capture(names: list[str], out: Path, seed: int, scale: float, duration_s: float,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Write ``out`` and its sidecars for the scenarios ``names``; return the metadata.

    Raises ValueError for bad arguments and OSError when a file cannot be written.
    """
    duration_ns = round(duration_s * NS_PER_S)
    events = mix_events(names, seed, scale, duration_ns)
    templates = build_templates()
    labels_path, meta_path = sidecar_paths(out)
    kind_templates = [[templates.get((kind, 4)), templates.get((kind, 16))] for kind in Kind]
    prefixes = [f",{name},{SCENARIOS[name].klass}," for name in names]
    packets = [0] * len(names)
    clients: list[set[int]] = [set() for _ in names]
    sources: list[set[bytes]] = [set() for _ in names]
    v6_sums: dict[bytes, int] = {}
    epoch_s, epoch_sub_ns = divmod(CAPTURE_EPOCH_NS, NS_PER_S)
    index = 0
    with open(out, "wb") as pcap_file, open(labels_path, "w", encoding="ascii") as labels_file:
        writer = PcapWriter(pcap_file)
        lines = [LABELS_HEADER + "\n"]
        for t_ns, tag, client, kind, src, port, ttl in events:
            if len(src) == 4:
                address = int.from_bytes(src, "big")
                src_sum = (address >> 16) + (address & 0xFFFF)
                template = kind_templates[kind][0]
            else:
                src_sum = v6_sums.get(src, -1)
                if src_sum < 0:
                    src_sum = v6_sums[src] = word_sum(src)
                template = kind_templates[kind][1]
            seconds, sub_ns = divmod(t_ns + epoch_sub_ns, NS_PER_S)
            # An NTP timestamp of the capture time; the low 16 bits of the fraction carry
            # the client number so that two clients' requests in one instant differ.
            xmt = ((((epoch_s + seconds + NTP_UNIX_OFFSET_S) & 0xFFFF_FFFF) << 32)
                   | (((sub_ns << 32) // NS_PER_S) & 0xFFFF_0000) | (client & 0xFFFF))
            assert template is not None
            writer.write(CAPTURE_EPOCH_NS + t_ns, template.build(src, src_sum, port, xmt, ttl))
            lines.append(f"{index}{prefixes[tag]}{client}\n")
            packets[tag] += 1
            clients[tag].add(client)
            sources[tag].add(src)
            index += 1
            if not index % PROGRESS_EVERY:
                labels_file.write("".join(lines))
                lines.clear()
                if progress:
                    progress(index, t_ns)
        labels_file.write("".join(lines))
        writer.flush()
    if progress:
        progress(index, duration_ns)
    meta = {
        "format": FORMAT,
        "generator": f"guardntp {__version__}",
        "seed": seed,
        "scale": scale,
        "duration_s": duration_s,
        "start_unix_ns": CAPTURE_EPOCH_NS,
        "destination": {"ipv4": SERVER_V4, "ipv6": SERVER_V6, "port": SERVER_PORT},
        "packets": index,
        "scenarios": [
            {"name": name, "class": SCENARIOS[name].klass, "summary": SCENARIOS[name].summary,
             "networks": list(SCENARIOS[name].networks), "packets": packets[tag],
             "clients": len(clients[tag]), "sources": len(sources[tag])}
            for tag, name in enumerate(names)],
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta
