"""The ``[nts]`` section and the ``--nts-*`` flags, checked.

Rule: NTS is on when a certificate and its key are given. Every other key has
a default sized for a public server; the KE limits are those of
:class:`~guardntp.nts.limits.KeLimits`. Errors are one line naming the key.

This module needs neither ``cryptography`` nor ``pyOpenSSL`` (the ``nts`` extra):
``check-config`` and a server without NTS import it on a plain install.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..netaddr import BadAddress, ListenSpec, parse_listen
from .limits import KeLimits

#: RFC 8915 §4: the NTS-KE service's well-known port.
DEFAULT_KE_PORT = 4460
#: Cookies handed out by NTS-KE (RFC 8915 §4.1.6 suggests 8).
DEFAULT_COOKIES = 8
#: A new master key a day; the previous two still open cookies.
DEFAULT_PERIOD_S = 86_400
DEFAULT_KEEP = 2


class NtsError(Exception):
    """NTS cannot start: a bad certificate or key, key file, KE address, or a missing
    library; the message is one line."""


class BadNtsSettings(ValueError):
    """An ``[nts]`` setting that cannot be used; the message names the key."""


@dataclass(frozen=True)
class NtsSettings:
    cert: Path | None = None
    key: Path | None = None
    ke_listen: ListenSpec = ListenSpec("0.0.0.0", DEFAULT_KE_PORT)
    #: The name clients should use for NTP (Server Negotiation record); empty: the
    #: name they reached NTS-KE by.
    ntp_server: str = ""
    cookies: int = DEFAULT_COOKIES
    #: Master key rotation: a new key every ``key_period_s``, ``keys_kept`` old ones.
    key_period_s: int = DEFAULT_PERIOD_S
    keys_kept: int = DEFAULT_KEEP
    #: False on servers that read a key file another host rotates.
    rotate_keys: bool = True
    limits: KeLimits = field(default_factory=KeLimits)

    @property
    def enabled(self) -> bool:
        return self.cert is not None and self.key is not None


_LIMIT_FIELDS = {f.name: f.type for f in fields(KeLimits)}
_KNOWN = ("cert", "key", "ke_listen", "ntp_server", "cookies", "key_period_s", "keys_kept",
          "rotate_keys", *_LIMIT_FIELDS)


def parse_nts_settings(table: Mapping[str, Any], config_path: str = "") -> NtsSettings:
    """``[nts]`` as a checked :class:`NtsSettings`; raises :class:`BadNtsSettings`.

    Relative ``cert``/``key`` paths are relative to the configuration file.
    """
    for name in table:
        if name not in _KNOWN:
            raise BadNtsSettings(f"nts.{name}: unknown setting (known: {', '.join(_KNOWN)})")
    base = Path(config_path).parent if config_path and not config_path.startswith("<") \
        else Path.cwd()
    settings = NtsSettings()
    cert, key = table.get("cert"), table.get("key")
    for name, value in (("cert", cert), ("key", key)):
        if value is not None and (not isinstance(value, str) or not value):
            raise BadNtsSettings(f"nts.{name}: must be a file path")
    if (cert is None) != (key is None):
        raise BadNtsSettings("nts.cert and nts.key go together: give both or neither")
    if cert is not None and key is not None:
        settings = replace(settings, cert=base / cert, key=base / key)
    if "ke_listen" in table:
        value = table["ke_listen"]
        if not isinstance(value, str):
            raise BadNtsSettings("nts.ke_listen: must be HOST[:PORT]")
        try:
            settings = replace(settings, ke_listen=parse_listen(value, DEFAULT_KE_PORT))
        except BadAddress as error:
            raise BadNtsSettings(f"nts.ke_listen: {error}") from None
    if "ntp_server" in table:
        value = table["ntp_server"]
        if not isinstance(value, str) or len(value) > 255:
            raise BadNtsSettings("nts.ntp_server: must be a host name or address")
        settings = replace(settings, ntp_server=value)
    settings = replace(
        settings,
        cookies=_whole(table, "cookies", 1, 8, settings.cookies),
        key_period_s=_whole(table, "key_period_s", 60, 366 * 86_400, settings.key_period_s),
        keys_kept=_whole(table, "keys_kept", 1, 64, settings.keys_kept),
        rotate_keys=_flag(table, "rotate_keys", settings.rotate_keys))
    limits: dict[str, Any] = {}
    for name, kind in _LIMIT_FIELDS.items():
        if name in table:
            limits[name] = _limit(name, table[name], kind)
    try:
        return replace(settings, limits=replace(settings.limits, **limits))
    except (TypeError, ValueError) as error:
        raise BadNtsSettings(f"nts: {error}") from None


def _whole(table: Mapping[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadNtsSettings(f"nts.{name}: must be a whole number from {low} to {high}")
    return value


def _flag(table: Mapping[str, Any], name: str, default: bool) -> bool:
    value = table.get(name, default)
    if not isinstance(value, bool):
        raise BadNtsSettings(f"nts.{name}: must be true or false")
    return value


def _limit(name: str, value: Any, kind: Any) -> int | float:
    whole = kind in (int, "int")
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or (whole and not isinstance(value, int)):
        raise BadNtsSettings(f"nts.{name}: must be a {'whole ' if whole else ''}number")
    if not math.isfinite(value) or value <= 0 or value > 1e9:
        raise BadNtsSettings(f"nts.{name}: must be a finite number > 0 and at most 1e9")
    if name in ("ipv4_prefix",) and not 8 <= value <= 32:
        raise BadNtsSettings("nts.ipv4_prefix: must be 8-32")
    if name in ("ipv6_prefix",) and not 16 <= value <= 128:
        raise BadNtsSettings("nts.ipv6_prefix: must be 16-128")
    return value
