"""No configuration value the server cannot run gets through ``config.py``: every
number is finite and in range, every refusal is one ``file:line: key: why`` line,
and a file that cannot be read or decoded is a ConfigError too, never a traceback."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from guardntp.cli import CommandError
from guardntp.commands import check_config
from guardntp.config import (
    ConfigError,
    apply_overrides,
    default_config_text,
    load_config,
    parse_config,
)
from guardntp.filter.acl import Action
from guardntp.netaddr import BadAddress, ListenSpec, parse_listen

DEFAULT = default_config_text()
NON_FINITE = ("nan", "inf", "-inf", "+nan")


def numeric_keys(table: dict[str, Any], prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, is a list) of every number, or list of numbers, in a parsed TOML table."""
    found = []
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            found += numeric_keys(value, dotted + ".")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found.append((dotted, False))
        elif isinstance(value, list) and value and all(
                isinstance(item, int | float) and not isinstance(item, bool) for item in value):
            found.append((dotted, True))
    return found


DEFAULT_NUMBERS = numeric_keys(tomllib.loads(DEFAULT))


def with_value(text: str, dotted: str, value: str) -> str:
    """``text`` with the line that sets ``dotted`` (under its [section]) set to ``value``."""
    section, _, key = dotted.rpartition(".")
    header = None
    lines = text.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            header = stripped.strip("[]")
            continue
        match = re.match(rf"^(\s*{re.escape(key)}\s*=\s*)(.*?)(\s*#.*)?$", line)
        if header == section and match:
            lines[number] = match.group(1) + value + (match.group(3) or "")
            return "\n".join(lines) + "\n"
    raise AssertionError(f"{dotted} not found")


def line_of(text: str, dotted: str) -> int:
    marked = with_value(text, dotted, "MARK").splitlines()
    return next(n for n, line in enumerate(marked, 1) if "MARK" in line)


def test_the_walk_covers_every_section_with_numbers() -> None:
    keys = {dotted for dotted, _ in DEFAULT_NUMBERS}
    # Not vacuous: the rates, intervals, prefixes and sizes of [filter], the label
    # tables, [clock], [log] and [blocklist] (validated by its own feature) are all in.
    assert {"filter.source_rate", "filter.kod_interval_s", "filter.ipv6_source_prefix",
            "filter.labels.sntpv1.rate", "clock.lost_after", "clock.poll",
            "log.repeat_interval_s", "blocklist.auto_after", "blocklist.auto_min_rate",
            "filter.reflection_ports"} <= keys
    assert len(keys) >= 30


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize(("dotted", "is_list"), DEFAULT_NUMBERS,
                         ids=[dotted for dotted, _ in DEFAULT_NUMBERS])
def test_every_number_of_the_default_refuses_nan_and_infinity(dotted: str, is_list: bool,
                                                              bad: str) -> None:
    for value in (bad, f"[{bad}]") if is_list else (bad,):
        text = with_value(DEFAULT, dotted, value)
        with pytest.raises(ConfigError) as caught:
            parse_config(text, "guardntp.toml")
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"guardntp.toml:{line_of(DEFAULT, dotted)}: {dotted}"), message


@pytest.mark.parametrize("bad", ("nan", "inf", "-inf"))
@pytest.mark.parametrize(("dotted", "is_list"), DEFAULT_NUMBERS,
                         ids=[dotted for dotted, _ in DEFAULT_NUMBERS])
def test_every_number_refuses_nan_and_infinity_from_set_too(dotted: str, is_list: bool,
                                                            bad: str) -> None:
    base = parse_config(DEFAULT, "guardntp.toml")
    section, _, key = dotted.partition(".")
    with pytest.raises(ConfigError) as caught:
        apply_overrides(base, [f"{section}.{key}={bad}"])
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--set ")


@pytest.mark.parametrize(("setting", "words"), [
    ("[filter]\nsource_rate = nan", "filter.source_rate: must be a finite number > 0"),
    ("[filter]\nsource_rate = 1e400", "filter.source_rate: must be a finite number"),
    ("[filter]\nsource_rate = 2e9", "at most 1000000000"),
    ("[filter]\nkod_interval_s = nan", "filter.kod_interval_s: must be a finite number >= 0"),
    ("[filter]\nkod_interval_s = -1.0", "filter.kod_interval_s: must be a number >= 0"),
    ("[filter]\nkod_interval_s = 1e12", "at most 86400"),
    ("[filter]\nglobal_reply_rate = -inf", "filter.global_reply_rate: must be a finite"),
    ("[filter]\nkod_rate = 0", "filter.kod_rate: must be a number > 0"),
    ("[filter]\nkod_rate = \"fast\"", "filter.kod_rate: must be a number > 0"),
    ("[filter]\nsource_burst = 1e3", "filter.source_burst: must be a whole number"),
    ("[filter]\nmax_sources = 100000000000000000000000000000",
     "filter.max_sources: must be a whole number"),
    ("[clock]\nlost_after = 100000000000000000000000000000",
     "clock.lost_after: must be a number > 0 and at most 2592000 (seconds)"),
    ("[clock]\nlost_after = nan", "clock.lost_after: must be a finite number > 0"),
    ("[clock]\npoll = inf", "clock.poll: must be a whole number"),
    ("[log]\nrepeat_interval_s = inf", "log.repeat_interval_s: must be a finite number"),
    ("[filter.labels.ntpv4]\nrate = nan", "filter.labels.ntpv4.rate: must be a finite"),
    ("[blocklist]\nauto_after = nan", "blocklist.auto_after: must be a finite number"),
    ("[auth]\nrequire = [inf]", "auth.require[0]: must be a finite number"),
])
def test_refusals_name_the_key_and_say_what_is_wanted(setting: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)) as caught:
        parse_config(setting + "\n", "g.toml")
    assert str(caught.value).startswith("g.toml:2: ")


def test_a_bucket_that_would_take_over_ten_years_to_refill_is_refused() -> None:
    # Each value is in range alone; together they are a bucket the filter cannot keep
    # (its time would overflow the compiled loop's 64-bit integers): compile_policy says so.
    with pytest.raises(ConfigError, match=r"^g.toml:2: filter.prefix_rate: .*ten years"):
        parse_config("[filter]\nprefix_rate = 1e-9\nprefix_burst = 16\n", "g.toml")
    with pytest.raises(ConfigError, match=r"^g.toml:2: filter.labels.sntpv1.rate: .*ten years"):
        parse_config("[filter.labels.sntpv1]\nrate = 1e-9\n", "g.toml")


def test_check_config_refuses_nan_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "guardntp.toml"
    path.write_text("[filter]\nsource_burst = 100\nkod_interval_s = nan\n")
    with pytest.raises(CommandError) as caught:
        check_config.run(type("Args", (), {"file": str(path)})())
    assert str(caught.value) == (f"{path}:3: filter.kod_interval_s: must be a finite number "
                                 ">= 0 and at most 86400 (seconds)")


# ----------------------------------------------------------------------------- prefixes

@pytest.mark.parametrize("bits", [60, 63, 65, 9])
def test_an_ipv6_source_prefix_that_is_not_whole_bytes_is_refused(bits: int) -> None:
    with pytest.raises(ConfigError, match=rf"^g.toml:2: filter.ipv6_source_prefix: must be a "
                       rf"multiple of 8 .*: {bits // 8 * 8} or {bits // 8 * 8 + 8}\?$"):
        parse_config(f"[filter]\nipv6_source_prefix = {bits}\n", "g.toml")


def test_whole_byte_source_prefixes_and_any_bucket_prefix_are_taken() -> None:
    policy = parse_config("[filter]\nipv6_source_prefix = 56\nipv4_prefix = 22\n"
                          "ipv6_prefix = 60\n").filter
    assert (policy.ipv6_source_prefix, policy.ipv4_prefix, policy.ipv6_prefix) == (56, 22, 60)


# ----------------------------------------------------------------------------- access list

def test_an_ipv4_mapped_acl_entry_becomes_the_ipv4_network() -> None:
    config = parse_config('[[acl]]\ncidr = "::ffff:192.0.2.0/120"\naction = "drop"\n'
                          '[[acl]]\ncidr = "::ffff:198.51.100.7"\naction = "exempt"\n')
    assert [(entry.network, entry.action) for entry in config.filter.acl] == [
        (ipaddress.IPv4Network("192.0.2.0/24"), Action.DROP),
        (ipaddress.IPv4Network("198.51.100.7/32"), Action.EXEMPT)]


def test_a_mapped_entry_with_host_bits_suggests_the_ipv4_form() -> None:
    with pytest.raises(ConfigError, match=r"acl\[0\]\.cidr: .*did you mean 192\.0\.2\.0/24\?"):
        parse_config('[[acl]]\ncidr = "::ffff:192.0.2.1/120"\n')


def test_a_scoped_acl_entry_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^g.toml:2: acl\[0\]\.cidr: 'fe80::1%eth0/128': "
                       r"a network has no scope \(%eth0\); write fe80::1/128$"):
        parse_config('[[acl]]\ncidr = "fe80::1%eth0/128"\n', "g.toml")


def test_an_acl_reason_must_be_text() -> None:
    with pytest.raises(ConfigError, match=r"acl\[0\]\.reason: must be a string"):
        parse_config('[[acl]]\ncidr = "192.0.2.0/24"\nreason = nan\n')


# ----------------------------------------------------------------------------- reading the file

def test_a_file_that_is_not_utf8_is_one_line_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[server]\n# caf\u00e9\nstate_dir = ""\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == (f"{path}:2: not UTF-8 text (byte 0xe9); "
                                 "a TOML file must be UTF-8")


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[filter]\nsource_burst = 20\n")
    assert load_config(str(path)).filter.source_burst == 20


def test_a_missing_file_a_directory_and_an_empty_name_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(missing))}: cannot read: "
                       "No such file or directory$"):
        load_config(str(missing))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot read: "
                       "Is a directory$"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match="file name is empty"):
        load_config("")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("bad\0name.toml")


def test_a_file_without_end_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    # `guardntp check-config /dev/zero` read until the memory ran out.
    from guardntp import config

    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 1 << 20)
    with pytest.raises(ConfigError, match=r"^/dev/zero: larger than 1 MiB: not a "
                       "configuration file$"):
        load_config("/dev/zero")


# ----------------------------------------------------------------------------- clock

@pytest.mark.parametrize(("value", "message"), [
    ('"TOOLONG"', "refid 'TOOLONG': an IPv4 address or up to 4 ASCII letters"),
    ('"\u00e9"', "an IPv4 address or up to 4 ASCII letters"),
    ("5", "must be a string"),
])
def test_a_refid_the_system_clock_cannot_serve_is_refused_at_check(value: str,
                                                                   message: str) -> None:
    # It passed check-config and every reload, then failed the next start.
    with pytest.raises(ConfigError, match=rf"^g.toml:3: clock.refid: .*{re.escape(message)}$"):
        parse_config(f'[clock]\nsource = "system"\nrefid = {value}\n', "g.toml")


def test_good_refids_are_taken() -> None:
    for refid in ("GPS", "PPS", "192.0.2.1", ""):
        assert parse_config(f'[clock]\nrefid = "{refid}"\n').clock.refid == refid


@pytest.mark.parametrize(("server", "message"), [
    ("pool.ntp.org:abc", "'pool.ntp.org:abc': port must be 1-65535"),
    ("pool.ntp.org:0", "'pool.ntp.org:0': port must be 1-65535"),
    ("pool.ntp.org:99999", "'pool.ntp.org:99999': port must be 1-65535"),
    ("", "'': expected HOST, HOST:PORT or [IPV6]:PORT"),
    (":123", "':123': expected HOST, HOST:PORT or [IPV6]:PORT"),
    ("[::1", "'[::1': expected [IPV6]:PORT"),
    ("[::1]x", "'[::1]x': expected [IPV6]:PORT"),
    ("a b", "'a b': expected HOST, HOST:PORT or [IPV6]:PORT"),
])
def test_an_upstream_that_cannot_be_polled_is_refused_at_check(server: str,
                                                               message: str) -> None:
    # "host:abc" passed check-config and reloads, then stopped the next start with
    # "invalid literal for int() with base 10: 'abc'"; "" polled a server named "".
    with pytest.raises(ConfigError, match=rf"^g.toml:2: clock.upstreams: "
                       rf"{re.escape(message)}$"):
        parse_config(f'[clock]\nupstreams = ["{server}"]\n', "g.toml")


def test_good_upstreams_are_taken_as_written() -> None:
    servers = ["pool.ntp.org", "127.0.0.1:1123", "[::1]:99", "2001:db8::1", "[2001:db8::2]"]
    listed = ", ".join(f'"{server}"' for server in servers)
    assert parse_config(f"[clock]\nupstreams = [{listed}]\n").clock.upstreams == tuple(servers)


def test_the_upstream_clock_needs_an_upstream_at_check() -> None:
    with pytest.raises(ConfigError, match=r'^g.toml:3: clock.upstreams: needs at least one '
                       r'server for source = "upstream"$'):
        parse_config('[clock]\nsource = "upstream"\nupstreams = []\n', "g.toml")


def test_an_unreadable_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.toml"
    path.write_text("[filter]\n")

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    if os.geteuid() == 0:   # root reads a file of mode 000: refuse the open instead
        monkeypatch.setattr(Path, "open", refuse)
    else:
        path.chmod(0)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: cannot read: "
                       "Permission denied$"):
        load_config(str(path))


# ----------------------------------------------------------------------------- listen addresses

@pytest.mark.parametrize("text", ["", "   ", "\t", ":123", " :123", "[]:123", "[ ]", ":"])
def test_an_empty_listen_host_is_refused_not_every_address(text: str) -> None:
    with pytest.raises(BadAddress) as caught:
        parse_listen(text)
    message = str(caught.value)
    assert "\n" not in message and "0.0.0.0" in message and "[::]" in message


@pytest.mark.parametrize(("text", "spec"), [
    ("0.0.0.0", ListenSpec("0.0.0.0", 123)), ("0.0.0.0:12300", ListenSpec("0.0.0.0", 12300)),
    ("[::]", ListenSpec("::", 123)), ("[::]:123", ListenSpec("::", 123)),
    ("  127.0.0.1:5 ", ListenSpec("127.0.0.1", 5))])
def test_every_address_stays_available_when_written_out(text: str, spec: ListenSpec) -> None:
    assert parse_listen(text) == spec


def test_an_empty_listen_entry_in_the_file_names_its_line() -> None:
    with pytest.raises(ConfigError, match=r"^g.toml:3: server.listen: empty listen address"):
        parse_config('[server]\n# where\nlisten = ["127.0.0.1:12300", ""]\n', "g.toml")
