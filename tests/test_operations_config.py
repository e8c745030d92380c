"""The operator's configuration: [server] user/group, [metrics], [log]; check-config
errors naming file, line and key; command-line flags over the file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from guardntp import cli
from guardntp.cli import build_parser
from guardntp.commands.serve import build_config
from guardntp.config import ConfigError, default_config_text, load_config, parse_config
from guardntp.netaddr import ListenSpec

GOOD = """\
[server]
listen = ["127.0.0.1:12300"]
user = "nobody"

[metrics]
listen = "127.0.0.1:9976"

[log]
format = "json"
level = "warning"
repeat_limit = 20
repeat_interval_s = 30
"""

#: (file text, line number, key, words of the message)
BAD_FILES = [
    ('[server]\nlisten = ["127.0.0.1:12300"]\n\n[metrics]\nlisten = "127.0.0.1"\n',
     5, "metrics.listen", "needs a port"),
    ('[metrics]\nlisten = "localhost:9976"\n', 2, "metrics.listen", "not an IP address"),
    ('[metrics]\nport = 9976\n', 2, "metrics.port", "unknown setting"),
    ('[log]\nformat = "xml"\n', 2, "log.format", "must be one of text, json"),
    ('[log]\n# how many\nrepeat_limit = 0\n', 3, "log.repeat_limit", "whole number"),
    ('[log]\nlevel = "verbose"\n', 2, "log.level", "must be one of"),
    ('[log]\nrepeat_interval_s = -5\n', 2, "log.repeat_interval_s", "> 0"),
    ('[server]\nuser = 65534\n', 2, "server.user", "must be a string"),
    ('[server]\nlisten = "127.0.0.1:12300"\n\n[filter.labels.sntpv1]\nrate = 0\n',
     5, "filter.labels.sntpv1.rate", "> 0"),
    ('metrics = 3\n', 1, "metrics", "must be a table"),
]


def test_the_embedded_default_is_a_loopback_lab_server_without_metrics() -> None:
    config = load_config(None)
    assert config.server.listen == (ListenSpec("127.0.0.1", 12300),)
    assert config.clock.source == "local"
    assert config.server.user == "" and config.server.group == ""
    assert config.extra["metrics"].get("listen") is None
    # The commented examples in the file are valid when uncommented.
    text = default_config_text()
    uncommented = "\n".join(re.sub(r"^# ?(listen|user|group) = ", r"\1 = ", line)
                            for line in text.splitlines())
    example = parse_config(uncommented, "example")
    assert example.extra["metrics"]["listen"] == ListenSpec("127.0.0.1", 9976)
    assert example.server.user == "guardntp"


def test_operations_settings_are_checked_and_kept() -> None:
    config = parse_config(GOOD, "good.toml")
    assert config.server.user == "nobody"
    assert config.extra["metrics"]["listen"] == ListenSpec("127.0.0.1", 9976)
    assert config.extra["log"] == {"format": "json", "level": "warning", "repeat_limit": 20,
                                   "repeat_interval_s": 30.0}


@pytest.mark.parametrize(("text", "line", "key", "words"), BAD_FILES)
def test_check_config_names_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              text: str, line: int, key: str,
                                              words: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    status = cli.main(["check-config", str(path)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"guardntp: {path}:{line}: {key}: ")
    assert words in err


def test_check_config_accepts_a_good_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    assert cli.main(["check-config", str(path)]) == 0
    assert ": OK" in capsys.readouterr().out


def _serve_args(*argv: str) -> object:
    return build_parser().parse_args(["serve", *argv])


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "guardntp.toml"
    path.write_text(GOOD)
    config = build_config(_serve_args(  # type: ignore[arg-type]
        "-c", str(path), "--user", "daemon", "--group", "nogroup",
        "--metrics", "[::1]:9100", "--log-format", "text", "--log-level", "debug"))
    assert (config.server.user, config.server.group) == ("daemon", "nogroup")
    assert config.extra["metrics"]["listen"] == ListenSpec("::1", 9100)
    assert config.extra["log"]["format"] == "text"
    assert config.extra["log"]["level"] == "debug"
    assert config.extra["log"]["repeat_limit"] == 20  # untouched keys stay
    off = build_config(_serve_args("-c", str(path), "--metrics", "off"))  # type: ignore[arg-type]
    assert off.extra["metrics"]["listen"] is None
    plain = build_config(_serve_args("-c", str(path)))  # type: ignore[arg-type]
    assert plain.server.user == "nobody"
    assert plain.extra["log"]["format"] == "json"


@pytest.mark.parametrize(("flag", "words"), [
    ("127.0.0.1", "needs a port"), ("metrics.example:9100", "not an IP address"),
    ("127.0.0.1:99999", "port must be")])
def test_bad_metrics_flag_is_a_one_line_usage_error(flag: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(_serve_args("--metrics", flag))  # type: ignore[arg-type]
    assert words in str(caught.value)


def test_serve_refuses_an_unknown_user_before_binding(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["serve", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:1",
                       "--user", "no-such-user-guardntp"])
    err = capsys.readouterr().err
    assert status == 2
    assert "no such user" in err and "Traceback" not in err


def test_group_without_user_is_refused(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["serve", "--state-dir", str(tmp_path), "--group", "nogroup"])
    assert status == 2
    assert "--group needs --user" in capsys.readouterr().err


def test_default_file_is_valid_toml_with_the_documented_sections() -> None:
    data = tomllib.loads(default_config_text())
    assert {"server", "clock", "filter", "metrics", "log"} <= set(data)


def test_set_reaches_the_operations_sections() -> None:
    config = build_config(_serve_args(  # type: ignore[arg-type]
        "--set", "log.level=debug", "--set", "metrics.listen=127.0.0.1:9100"))
    assert config.extra["log"]["level"] == "debug"
    assert config.extra["log"]["format"] == "text"  # the rest of [log] stays
    assert config.extra["metrics"]["listen"] == ListenSpec("127.0.0.1", 9100)
    with pytest.raises(ConfigError, match=r"^--set log.level: must be one of"):
        build_config(_serve_args("--set", "log.level=loud"))  # type: ignore[arg-type]


def test_set_reaches_the_label_policies_over_the_file(tmp_path: Path) -> None:
    """``--set filter.labels.LABEL.KEY=...`` changes that label's bucket (it used to be
    accepted and then replaced by the file's label policies); the file's other label
    settings, and the embedded defaults, stay."""
    path = tmp_path / "guardntp.toml"
    path.write_text(GOOD + "\n[clock]\npoll = 64\n\n[filter.labels.sntpv1]\nrate = 0.125\n"
                    "burst = 6\n")
    config = build_config(_serve_args(  # type: ignore[arg-type]
        "-c", str(path), "--set", "filter.labels.sntpv1.burst=3",
        "--set", "filter.labels.netgear-sntpv1-23457.rate=0.5",
        "--set", "filter.labels.ntpv4.send_kod=false"))
    labels = config.filter.label_policies
    assert (labels["sntpv1"].rate, labels["sntpv1"].burst) == (0.125, 3)  # file, then --set
    assert labels["netgear-sntpv1-23457"].rate == 0.5
    assert labels["netgear-sntpv1-23457"].burst == 2          # the embedded default's
    assert labels["ntpv4"].send_kod is False
    # An unrelated --set leaves the file's label policies exactly as they were.
    plain = build_config(_serve_args("-c", str(path),  # type: ignore[arg-type]
                                     "--set", "filter.source_rate=1"))
    assert plain.filter.label_policies == build_config(
        _serve_args("-c", str(path))).filter.label_policies  # type: ignore[arg-type]
    assert plain.filter.label_policies["sntpv1"].rate == 0.125


@pytest.mark.parametrize(("setting", "words"), [
    ("filter.labels.nope.rate=1", "filter.labels.nope: unknown label"),
    ("filter.labels.sntpv1.bogus=1", "filter.labels.sntpv1.bogus: unknown setting"),
    ("filter.labels.sntpv1.rate=0", "filter.labels.sntpv1.rate: must be a number > 0"),
    ("filter.labels.sntpv1=1", "expected filter.labels.LABEL.KEY=VALUE"),
    ("filter.labels.sntpv1.rate.x=1", "expected filter.labels.LABEL.KEY=VALUE"),
])
def test_a_bad_label_override_is_one_line(setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(_serve_args("--set", setting))  # type: ignore[arg-type]
    message = str(caught.value)
    assert words in message and "\n" not in message and message.startswith("--set ")


def test_set_over_a_file_that_leaves_whole_float_defaults_alone(tmp_path: Path) -> None:
    """A file without [clock] keeps ClockConfig's defaults (poll = 64.0, a float); --set
    re-checks every value, and used to refuse that default as "not a whole number"."""
    path = tmp_path / "guardntp.toml"
    path.write_text(GOOD)
    config = build_config(_serve_args("-c", str(path),  # type: ignore[arg-type]
                                      "--set", "filter.source_rate=1"))
    assert config.filter.source_rate == 1.0
    assert config.clock.poll == build_config(_serve_args("-c", str(path))).clock.poll  # type: ignore[arg-type]
