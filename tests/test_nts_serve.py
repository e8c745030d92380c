"""NTS in ``guardntp serve``: a real chronyd 4.3 runs NTS-KE against the server and
accepts its NTS-authenticated time; plain clients are still served; a reload takes a
new certificate, and a bad one is refused with the running one kept."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    free_tcp_port,
    free_udp_port,
    guardntp_server,
    needs_chronyd,
    parse_chronyd_offset,
)
from test_nts_chronyd import run_chronyd
from test_nts_ke import make_certs

from guardntp import client

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certs(tmp_path_factory.mktemp("nts-serve-certs"))


def stats(state_dir: Path) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-m", "guardntp", "stats", "--json",
                             "--state-dir", str(state_dir)], capture_output=True, text=True,
                            timeout=30, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


@needs_chronyd
@pytest.mark.peers
def test_chronyd_accepts_nts_time_from_guardntp_serve(
        tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    ke_port = free_tcp_port()
    with guardntp_server(tmp_path, "--nts-cert", str(cert), "--nts-key", str(key),
                         "--nts-ke-listen", f"127.0.0.1:{ke_port}") as server:
        log = run_chronyd(tmp_path / "chrony", ca, server.port, ke_port, 15)
        offset = parse_chronyd_offset(log)
        assert offset is not None, log
        assert abs(offset) < 0.001, log
        report = stats(server.state_dir)
        nts = report["nts"]
        assert isinstance(nts, dict)
        assert nts["ke"]["ke_ok"] >= 1 and nts["ke"]["ke_cookies_issued"] >= 8, nts
        assert nts["ntp"]["nts_answered"] >= 1, nts
        assert nts["master_keys"] >= 1
        # NTS requests carry their own fingerprint label (so [filter.labels.nts] applies).
        assert report["labels"]["nts"] >= nts["ntp"]["nts_answered"]  # type: ignore[index]
        # The same filter and counters as any request; plain clients still get time.
        assert report["verdicts"]["time"] >= nts["ntp"]["nts_answered"]  # type: ignore[index]
        client.exchange("127.0.0.1", server.port, timeout_s=2)
        keys = server.state_dir / "nts-keys"
        assert keys.stat().st_mode & 0o777 == 0o600
        assert "Traceback" not in server.log()


def test_a_reload_takes_a_new_certificate_and_refuses_a_bad_one(
        tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    config = tmp_path / "guardntp.toml"
    ke_port = free_tcp_port()
    config.write_text(f'[nts]\ncert = "{cert}"\nkey = "{key}"\n'
                      f'ke_listen = "127.0.0.1:{ke_port}"\n')
    with guardntp_server(tmp_path, "-c", str(config)) as server:
        config.write_text(f'[nts]\ncert = "{tmp_path / "missing.pem"}"\nkey = "{key}"\n'
                          f'ke_listen = "127.0.0.1:{ke_port}"\n'
                          "[filter]\nsource_burst = 99\n")
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload rejected" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reload rejected" in server.log() and "missing.pem" in server.log()
        assert "Traceback" not in server.log()
        # Nothing of the refused file applied, and the KE server still runs.
        assert stats(server.state_dir)["nts"]["ke"].get("ke_cert_reloaded", 0) == 0  # type: ignore[index]
        config.write_text(f'[nts]\ncert = "{cert}"\nkey = "{key}"\n'
                          f'ke_listen = "127.0.0.1:{ke_port}"\n')
        before = server.log().count("reloaded ")
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while server.log().count("reloaded ") == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats(server.state_dir)["nts"]["ke"]["ke_cert_reloaded"] == 1  # type: ignore[index]


@pytest.mark.parametrize(("args", "words"), [
    (["--nts-cert", "/no/such/cert.pem", "--nts-key", "/no/such/key.pem"], "NTS certificate"),
    (["--nts-cert", "/no/such/cert.pem"], "nts.cert and nts.key go together"),
])
def test_bad_nts_settings_are_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guardntp", "serve", "--listen",
         f"127.0.0.1:{free_udp_port()}", "--state-dir", str(tmp_path / "state"), *args],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert result.returncode != 0
    assert words in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_check_config_loads_the_nts_certificate_and_key(
        tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    _, cert, key = certs
    good = tmp_path / "good.toml"
    good.write_text(f'[nts]\ncert = "{cert}"\nkey = "{key}"\n')
    missing = tmp_path / "missing.toml"
    missing.write_text(f'[nts]\ncert = "{cert}"\nkey = "{tmp_path / "no-such-key.pem"}"\n')
    swapped = tmp_path / "swapped.toml"   # a certificate where the key should be
    swapped.write_text(f'[nts]\ncert = "{cert}"\nkey = "{cert}"\n')
    run = [sys.executable, "-m", "guardntp", "check-config"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, timeout=30,
                        cwd=REPO, check=False)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stderr
    for path, words in ((missing, "No such file or directory"), (swapped, "NTS key")):
        bad = subprocess.run([*run, str(path)], capture_output=True, text=True, timeout=30,
                             cwd=REPO, check=False)
        assert bad.returncode == 1 and words in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_the_key_file_goes_to_the_user_the_server_becomes(
        shared_dir: Path, tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    _, cert, key = certs
    state = shared_dir / "state"
    with guardntp_server(tmp_path, "--nts-cert", str(cert), "--nts-key", str(key),
                         "--nts-ke-listen", f"127.0.0.1:{free_tcp_port()}",
                         "--user", "nobody", "--state-dir", str(state)) as server:
        assert "running as user nobody" in server.log()
        for name in ("nts-keys", "nts-keys.lock"):
            info = (state / name).stat()
            assert (info.st_uid, info.st_mode & 0o777) == (65534, 0o600), name
        client.exchange("127.0.0.1", server.port, timeout_s=2)
