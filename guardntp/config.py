"""The configuration file (TOML) and its validation.

Rule: reading and checking the file happens here and nowhere else; the rest
of the program gets a frozen :class:`Config`. Every error names the key and,
where the file says it, its line: ``config.toml:12: filter.source_rate: must be > 0``.
``guardntp/data/default.toml`` is the embedded default and the annotated example.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .filter import fingerprint
from .filter.acl import AclEntry, Action, parse_network
from .filter.buckets import MAX_RATE, is_finite_number
from .filter.pipeline import compile_policy
from .filter.policy import MAX_KOD_INTERVAL_S, BadPolicy, FilterPolicy, LabelPolicy
from .netaddr import BadAddress, ListenSpec, parse_host_port, parse_listen
from .wire import refid_bytes

DEFAULT_STATE_DIR = Path("/var/lib/guardntp")
#: A configuration file longer than this is refused unread (an access list of
#: 100,000 entries is about 6 MiB).
MAX_CONFIG_BYTES = 64 << 20


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, line and key."""


@dataclass(frozen=True)
class ClockConfig:
    source: str = "local"
    stratum: int = 10
    refid: str = ""
    precision: int = -20
    upstreams: tuple[str, ...] = ("pool.ntp.org",)
    poll: float = 64.0
    samples: int = 1
    lost_after: float = 1024.0
    allow_step: bool = False
    chronyc_socket: str = ""
    #: upstream: addresses used per name (a pool), like chrony's maxsources.
    max_sources: int = 4
    #: upstream: sources with a larger root distance (s) are not used (chrony's maxdistance).
    max_distance: float = 3.0
    #: upstream: how long (s) a majority must report a jump beyond 128 ms before we follow.
    stepout: float = 300.0
    #: upstream: follow offsets of 1000 s or more (ntpd's panic threshold) at all.
    allow_panic: bool = False
    #: upstream: four quick exchanges per source at start-up.
    iburst: bool = True


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[ListenSpec, ...] = (ListenSpec("127.0.0.1", 12300),)
    state_dir: str = ""
    workers: int = 1
    #: Drop to this user (and group) after binding; empty: stay as started.
    user: str = ""
    group: str = ""


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    filter: FilterPolicy = field(default_factory=FilterPolicy)
    #: Sections owned by other features (auth, control, metrics, log), validated there.
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str = "<embedded default>"
    #: ``--state-dir`` on the command line: beats GUARDNTP_STATE_DIR and the file.
    state_dir_flag: str = ""

    @property
    def state_dir(self) -> Path:
        if self.state_dir_flag:
            return Path(self.state_dir_flag).expanduser()
        return resolve_state_dir(self.server.state_dir)


def resolve_state_dir(configured: str = "") -> Path:
    """``GUARDNTP_STATE_DIR`` beats the file; the default is /var/lib/guardntp when we may
    write there, else ``$XDG_STATE_HOME/guardntp`` (a non-root quick start still works)."""
    chosen = os.environ.get("GUARDNTP_STATE_DIR") or configured
    if chosen:
        return Path(chosen).expanduser()
    if os.access(DEFAULT_STATE_DIR, os.W_OK) or (
            not DEFAULT_STATE_DIR.exists() and os.access(DEFAULT_STATE_DIR.parent, os.W_OK)):
        return DEFAULT_STATE_DIR
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "guardntp"


# ---------------------------------------------------------------------------- checking

_Check = Callable[[Any], Any]


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


def _number(low: float, high: float, *, above_low: bool = False, unit: str = "") -> _Check:
    """A finite number from ``low`` (or, with ``above_low``, more than ``low``) to ``high``."""
    wanted = (f"number {'>' if above_low else '>='} {_plain(low)} and at most {_plain(high)}"
              + (f" ({unit})" if unit else ""))

    def check(value: Any) -> float:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite {wanted}")
        if not is_finite_number(value) or not low <= value <= high or (above_low and value == low):
            raise ValueError(f"must be a {wanted}")
        return float(value)
    return check


_rate = _number(0, MAX_RATE, above_low=True, unit="requests per second")


def _int_in(low: int, high: int) -> _Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return value
    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _choice(*choices: str) -> _Check:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return str(value)
    return check


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def _listen(value: Any) -> tuple[ListenSpec, ...]:
    specs = tuple(parse_listen(item) for item in _strings(value))
    if not specs:
        raise ValueError("needs at least one address")
    return specs


def _upstreams(value: Any) -> tuple[str, ...]:
    """Servers to poll, each checked as the upstream clock will read it (a name or an
    address, and a port): a reload, which keeps the running clock, must not take a
    value the next start would refuse."""
    servers = _strings(value)
    for server in servers:
        parse_host_port(server)
    return servers


def _refid(value: Any) -> str:
    text = _string(value)
    refid_bytes(text)
    return text


def _ports(value: Any) -> frozenset[int]:
    if not isinstance(value, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 65535 for p in value):
        raise ValueError("must be a list of port numbers 0-65535")
    if 123 in value:
        raise ValueError("must not contain 123: ntpd and NTPsec clients send from port 123")
    return frozenset(value)


def _deny_action(value: Any) -> Action:
    return {"drop": Action.DROP, "kod": Action.DENY}[_choice("drop", "kod")(value)]


_SERVER_KEYS: dict[str, _Check] = {
    "listen": _listen, "state_dir": _string, "workers": _int_in(1, 64),
    "user": _string, "group": _string}
_CLOCK_KEYS: dict[str, _Check] = {
    "source": _choice("system", "upstream", "local"), "stratum": _int_in(1, 15),
    "refid": _refid, "precision": _int_in(-32, 0), "upstreams": _upstreams,
    "poll": _int_in(16, 65536), "samples": _int_in(1, 16),
    "lost_after": _number(0, 30 * 86_400, above_low=True, unit="seconds"),
    "allow_step": _bool, "chronyc_socket": _string,
    "max_sources": _int_in(1, 16),
    "max_distance": _number(0, 16, above_low=True, unit="seconds"),
    "stepout": _number(0, 86_400, unit="seconds"), "allow_panic": _bool, "iburst": _bool}
_FILTER_KEYS: dict[str, _Check] = {
    "answer_symmetric": _bool, "reflection_ports": _ports,
    "source_rate": _rate, "source_burst": _int_in(1, 1 << 20),
    "ipv6_source_prefix": _int_in(8, 128),   # whole bytes only: compile_policy says so
    "prefix_rate": _rate, "prefix_burst": _int_in(1, 1 << 24),
    "ipv4_prefix": _int_in(8, 32), "ipv6_prefix": _int_in(8, 128),
    "global_reply_rate": _number(0, MAX_RATE, unit="replies per second; 0: no cap"),
    "global_reply_burst": _int_in(1, 1 << 24),
    "leak_one_in": _int_in(0, 1 << 20), "send_kod": _bool,
    "max_crowd": _int_in(1, 1 << 16), "ttl_classes": _bool,
    "kod_interval_s": _number(0, MAX_KOD_INTERVAL_S, unit="seconds"), "kod_rate": _rate,
    "kod_burst": _int_in(1, 1 << 24), "kod_min_poll": _int_in(0, 17),
    "deny_action": _deny_action,
    "max_sources": _int_in(1, 1 << 26), "max_prefixes": _int_in(1, 1 << 26),
    "max_newcomers": _int_in(1, 1 << 26),
    "random_seed": _int_in(0, (1 << 63) - 1)}
_LABEL_KEYS: dict[str, _Check] = {
    "rate": _rate, "burst": _int_in(1, 1 << 20), "send_kod": _bool}
_ACL_ACTIONS = ("allow", "exempt", "deny", "drop", "deny-kod")

#: Sections other features validate themselves (they must be tables).
EXTRA_SECTIONS = ("auth", "control", "metrics", "log", "blocklist", "nts")


def _metrics_listen(value: Any) -> ListenSpec | None:
    text = _string(value).strip()
    if not text:
        return None  # no metrics endpoint
    spec = parse_listen(text, default_port=0)
    if spec.port == 0:
        raise ValueError(f"{text!r}: needs a port, e.g. \"127.0.0.1:9976\"")
    return spec


#: Extra sections whose keys are checked here (with line numbers); the values in
#: ``Config.extra`` are then the checked ones. Others pass through as read.
_EXTRA_KEYS: dict[str, dict[str, _Check]] = {
    "metrics": {"listen": _metrics_listen},
    "log": {"format": _choice("text", "json"),
            "level": _choice("debug", "info", "warning", "error"),
            "repeat_limit": _int_in(1, 1 << 20),
            "repeat_interval_s": _number(0, 86_400, above_low=True, unit="seconds")},
}


class _Reader:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, dotted: str) -> str:
        """``:N`` for the line that sets the last part of ``dotted``, if it can be found;
        looked for first under its ``[section]`` header (``listen`` is in several)."""
        section, _, leaf = dotted.rpartition(".")
        leaf = leaf.split("[")[0]
        pattern = re.compile(rf"^\s*\"?{re.escape(leaf)}\"?\s*=")
        start, end = 0, len(self.lines)
        headers = [n for n, line in enumerate(self.lines) if line.lstrip().startswith("[")]
        for n in headers:
            if section and self.lines[n].strip() == f"[{section}]":
                start = n
                end = next((later for later in headers if later > n), len(self.lines))
                break
        for number in [*range(start, end), *range(len(self.lines))]:
            if pattern.match(self.lines[number]) or self.lines[number].strip() == f"[{leaf}]":
                return f":{number + 1}"
        return ""

    def fail(self, dotted: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}{self.line_of(dotted)}: {dotted}: {message}")

    def section(self, data: dict[str, Any], name: str, schema: dict[str, _Check]
                ) -> dict[str, Any]:
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise self.fail(name, "must be a table ([" + name + "])")
        checked: dict[str, Any] = {}
        for key, value in table.items():
            if isinstance(value, dict) and name == "filter" and key == "labels":
                continue
            if key not in schema:
                raise self.fail(f"{name}.{key}", "unknown setting (known: "
                                + ", ".join(sorted(schema)) + ")")
            try:
                checked[key] = schema[key](value)
            except (ValueError, BadAddress) as error:
                raise self.fail(f"{name}.{key}", str(error)) from None
        return checked


def parse_config(text: str, path: str = "<config>") -> Config:
    """Parse and validate TOML text. Raises :class:`ConfigError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    reader = _Reader(path, text)
    known = {"server", "clock", "filter", "acl", *EXTRA_SECTIONS}
    for key in data:
        if key not in known:
            raise reader.fail(key, "unknown section (known: " + ", ".join(sorted(known)) + ")")
    server = ServerConfig(**reader.section(data, "server", _SERVER_KEYS))
    clock_values = reader.section(data, "clock", _CLOCK_KEYS)
    clock = ClockConfig(**clock_values)
    if clock.source == "local" and "stratum" not in clock_values:
        clock = replace(clock, stratum=10)
    if clock.source == "upstream" and not clock.upstreams:
        raise reader.fail("clock.upstreams", 'needs at least one server for source = "upstream"')
    filter_values = reader.section(data, "filter", _FILTER_KEYS)
    filter_values["label_policies"] = _labels(reader, data.get("filter", {}).get("labels", {}))
    filter_values["acl"] = _acl(reader, data.get("acl", []),
                                filter_values.get("deny_action", Action.DROP))
    policy = FilterPolicy(**filter_values)
    try:  # what the filter itself refuses (a reload would): e.g. a bucket that never refills
        compile_policy(policy)
    except BadPolicy as error:
        key = error.key if error.key.startswith("acl") else f"filter.{error.key}"
        raise reader.fail(key, error.message) from None
    extra = {}
    for name in EXTRA_SECTIONS:
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise reader.fail(name, f"must be a table ([{name}])")
        if name in _EXTRA_KEYS:
            table = reader.section(data, name, _EXTRA_KEYS[name])
        else:  # checked by its feature; no setting anywhere is nan or infinite
            _refuse_non_finite(reader, name, table)
        extra[name] = table
    return Config(server=server, clock=clock, filter=policy, extra=extra, path=path)


def _refuse_non_finite(reader: _Reader, dotted: str, value: Any) -> None:
    """TOML reads ``nan`` and ``inf`` as floats: refuse them in a section whose own
    checks live elsewhere, here where the line can still be named."""
    if isinstance(value, float) and not math.isfinite(value):
        raise reader.fail(dotted, "must be a finite number (nan and inf are not settings)")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_non_finite(reader, f"{dotted}.{key}", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_non_finite(reader, f"{dotted}[{index}]", item)


def _labels(reader: _Reader, table: Any) -> dict[str, LabelPolicy]:
    policies = dict(FilterPolicy().label_policies)
    if not isinstance(table, dict):
        raise reader.fail("filter.labels", "must be a table of label tables")
    for label, values in table.items():
        if label not in fingerprint.PACKET_LABELS:
            raise reader.fail(f"filter.labels.{label}", "unknown label (known: "
                              + ", ".join(fingerprint.PACKET_LABELS) + ")")
        where = f"filter.labels.{label}"  # errors name the full key, not a placeholder
        checked = reader.section({where: values}, where, _LABEL_KEYS)
        base = policies.get(label, LabelPolicy(FilterPolicy.source_rate,
                                               FilterPolicy.source_burst))
        policies[label] = replace(base, **checked)
    return policies


def _acl(reader: _Reader, items: Any, deny_action: Action) -> tuple[AclEntry, ...]:
    if not isinstance(items, list):
        raise reader.fail("acl", "must be an array of tables ([[acl]])")
    entries = []
    for index, item in enumerate(items):
        where = f"acl[{index}]"
        if not isinstance(item, dict) or set(item) - {"cidr", "action", "reason"} \
                or "cidr" not in item:
            raise reader.fail(where, "each [[acl]] needs cidr = \"...\" and action = \"...\" "
                              "(and optionally reason)")
        try:
            network = parse_network(_string(item["cidr"]))
        except (ValueError, BadAddress) as error:
            raise reader.fail(f"{where}.cidr", str(error)) from None
        action_text = item.get("action", "deny")
        if action_text not in _ACL_ACTIONS:
            raise reader.fail(f"{where}.action", "must be one of " + ", ".join(_ACL_ACTIONS))
        action = {"allow": Action.ALLOW, "exempt": Action.EXEMPT, "drop": Action.DROP,
                  "deny-kod": Action.DENY, "deny": deny_action}[action_text]
        try:
            reason = _string(item.get("reason", ""))
        except ValueError as error:
            raise reader.fail(f"{where}.reason", str(error)) from None
        entries.append(AclEntry(network, action, "config", reason))
    return tuple(entries)


def default_config_text() -> str:
    """The embedded default; a broken install is a one-line ConfigError."""
    try:
        return resources.files("guardntp").joinpath("data/default.toml").read_text(
            encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"the embedded default configuration cannot be read ({error}): "
                          "reinstall guardntp") from None


def load_config(path: str | None) -> Config:
    """The file at ``path``, or the embedded default. Raises :class:`ConfigError`."""
    if path is None:
        return parse_config(default_config_text(), "<embedded default>")
    return parse_config(read_config_text(path), path)


def read_config_text(path: str) -> str:
    """The text of a configuration file: UTF-8, as TOML requires (a leading BOM is
    skipped). Raises :class:`ConfigError` naming the file, and the line for a bad byte."""
    if not path.strip():
        raise ConfigError("the configuration file name is empty")
    try:
        # Bounded: /dev/zero, or a log given by mistake, must not fill the memory.
        with Path(path).open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except ValueError as error:   # a NUL in the name
        raise ConfigError(f"{path!r}: cannot read: {error}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a "
                          "configuration file")
    try:
        # A leading byte-order mark is allowed; stripped by hand, as the utf-8-sig codec
        # is imported lazily and a server that dropped privileges may not read it.
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); "
                          "a TOML file must be UTF-8") from None


def apply_overrides(config: Config, assignments: list[str]) -> Config:
    """``--set section.key=VALUE`` (VALUE in TOML syntax) over a loaded configuration."""
    if not assignments:
        return config
    lines = []
    for assignment in assignments:
        dotted, equals, value = assignment.partition("=")
        if not equals or "." not in dotted:
            raise ConfigError(f"--set {assignment!r}: expected SECTION.KEY=VALUE")
        section, _, key = dotted.strip().partition(".")
        if section == "filter" and key.split(".")[0] == "labels" and key.count(".") != 2:
            raise ConfigError(f"--set {dotted.strip()}: expected filter.labels.LABEL.KEY=VALUE "
                              "(labels: " + ", ".join(fingerprint.PACKET_LABELS) + "; keys: "
                              + ", ".join(_LABEL_KEYS) + ")")
        value = value.strip()
        try:
            tomllib.loads(f"x = {value}")
        except tomllib.TOMLDecodeError:
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append((section, key, value))
    # Rebuild as TOML over the current values so the same checks apply.
    base = _to_toml_tables(config)
    for section, key, value in lines:
        base.setdefault(section, {})[key] = value
    text = "\n".join(f"[{section}]\n" + "\n".join(f"{k} = {v}" for k, v in table.items())
                     for section, table in base.items())
    try:
        merged = parse_config(text, "--set")
    except ConfigError as error:
        # The line numbers are of the text built above, meaningless to the user.
        raise ConfigError(re.sub(r"^--set(:\d+)?: ", "--set ", str(error))) from None
    # --set metrics.listen=... and the like: the checked keys over the file's section.
    extra = {name: {**table, **(merged.extra.get(name, {}) if name in base else {})}
             for name, table in config.extra.items()}
    # The label policies went through the text (the file's, then --set filter.labels.*).
    return replace(merged, filter=replace(merged.filter, acl=config.filter.acl),
                   extra=extra, path=config.path)


def _to_toml_tables(config: Config) -> dict[str, dict[str, str]]:
    import json

    def literal(value: Any) -> str:
        if isinstance(value, Action):
            return '"kod"' if value is Action.DENY else '"drop"'
        if isinstance(value, frozenset):
            value = sorted(value)
        if isinstance(value, tuple):
            value = [str(v) for v in value]
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value.is_integer():
            # A whole float (ClockConfig.poll = 64.0) as an integer: the number checks take
            # it and return floats, and the whole-number checks refuse "64.0".
            return str(int(value))
        return json.dumps(value)

    tables: dict[str, dict[str, str]] = {}
    for name, obj, schema in (("server", config.server, _SERVER_KEYS),
                              ("clock", config.clock, _CLOCK_KEYS),
                              ("filter", config.filter, _FILTER_KEYS)):
        table = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name in schema and value is not None and value != "":
                table[f.name] = literal(value)
        tables[name] = table
    # Per-label policies as dotted keys of [filter] (``labels.sntpv1.rate = ...``), the
    # spelling ``--set filter.labels.sntpv1.rate=...`` gives, so that one replaces it.
    for label, policy in config.filter.label_policies.items():
        for f in fields(policy):
            tables["filter"][f"labels.{label}.{f.name}"] = literal(getattr(policy, f.name))
    return tables
