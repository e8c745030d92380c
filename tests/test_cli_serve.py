"""`guardntp serve` start-up errors and the README's embedded default."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    REPO,
    free_udp_port,
    guardntp_server,
    run_guardntp_as_nobody,
    wait_until_answering,
)

from guardntp.cli import main


def test_port_in_use_is_one_clear_line(tmp_path: Path, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        status = main(["serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1 and "address already in use" in err and "Traceback" not in err


def test_bad_listen_address(tmp_path: Path, capsys):
    assert main(["serve", "--listen", "not-an-ip:123", "--state-dir", str(tmp_path)]) == 2
    assert "is not an IP address" in capsys.readouterr().err


def test_bad_set_override(tmp_path: Path, capsys):
    assert main(["serve", "--set", "filter.source_rate=-1", "--state-dir", str(tmp_path)]) == 2
    assert "filter.source_rate" in capsys.readouterr().err
    assert main(["serve", "--set", "filter.nonsense=1", "--state-dir", str(tmp_path)]) == 2
    assert "unknown setting" in capsys.readouterr().err


@pytest.mark.parametrize(("upstream", "message"), [
    ("pool.ntp.org:abc", "guardntp: --upstream 'pool.ntp.org:abc': port must be 1-65535\n"),
    ("", "guardntp: --upstream '': expected HOST, HOST:PORT or [IPV6]:PORT\n"),
])
def test_a_bad_upstream_flag_is_one_clear_line(tmp_path: Path, capsys, upstream: str,
                                               message: str):
    # It was "guardntp: invalid literal for int() with base 10: 'abc'", and "" was
    # polled as a server named "". (Checked without starting: a server that did
    # start would serve until killed.)
    from guardntp.cli import CommandError, build_parser
    from guardntp.commands.serve import build_config
    from guardntp.config import ConfigError

    args = build_parser().parse_args(["serve", "--clock", "upstream", "--upstream", upstream,
                                      "--listen", "127.0.0.1:1", "--state-dir", str(tmp_path)])
    with pytest.raises(ConfigError) as caught:
        build_config(args)
    assert f"guardntp: {caught.value}\n" == message
    with pytest.raises(CommandError):   # and serve says it in one line, exit status 2
        args.func(args)


def test_privileged_port_without_privilege_is_explained():
    import tempfile

    state = tempfile.mkdtemp(prefix="guardntp-nobody-")
    if os.geteuid() == 0:   # user nobody must own its state dir (others may not write it)
        os.chown(state, 65534, 65534)
    config = Path(state) / "guardntp.toml"   # readable by nobody, unlike a private checkout
    config.write_text('[server]\nlisten = ["127.0.0.1:123"]\n')
    config.chmod(0o644)
    result = run_guardntp_as_nobody(["serve", "--config", str(config), "--state-dir", state])
    assert result.returncode == 1, result.stderr
    assert "permission denied" in result.stderr and "Traceback" not in result.stderr


def test_embedded_default_serves_loopback_12300_with_local_clock(tmp_path: Path):
    """The README's first command: `guardntp serve` with nothing else."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("127.0.0.1", 12300))
    except OSError:
        import pytest
        pytest.skip("port 12300 busy on this machine")
    probe.close()
    process = subprocess.Popen([sys.executable, "-m", "guardntp", "serve"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                    "GUARDNTP_STATE_DIR": str(tmp_path / "state")})
    try:
        wait_until_answering(12300)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert process.returncode == 0, output
    assert "NOT synchronised" in output and "127.0.0.1:12300" in output


def test_sigterm_stops_cleanly_and_reports_counts(tmp_path: Path):
    with guardntp_server(tmp_path) as server:
        pass
    assert server.process.returncode == 0
    assert "stopped:" in server.log()


def test_free_port_helper_gives_distinct_ports():
    assert free_udp_port() > 1023


@pytest.mark.parametrize("argv", [["check-config"], ["query", "--help"]])
def test_a_closed_stdout_ends_any_command_quietly(argv: list[str]) -> None:
    process = subprocess.Popen([sys.executable, "-m", "guardntp", *argv], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()   # the reader is gone before the command writes
    err = process.stderr.read().decode()
    assert process.wait(timeout=30) in (0, 141)
    assert "Traceback" not in err and "BrokenPipe" not in err
