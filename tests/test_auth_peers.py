"""Symmetric-key authentication against real peers: chronyd 4.3, NTPsec ntpdig, and
guardntp's own client. The peers are the judges: a MAC they accept is a MAC that
interoperates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    InProcessServer,
    chronyd_query,
    guardntp_server,
    needs_chronyd,
    needs_netns,
    needs_ntpdig,
    parse_chronyd_offset,
    run_in_netns,
)

from guardntp.auth.keys import load_key_file
from guardntp.auth.server import KeyAuthenticator
from guardntp.filter.reference import Signer
from guardntp.responder import Request
from guardntp.verdicts import Reason

pytestmark = pytest.mark.peers

# Fixed test keys (never use these anywhere else).
AES128_HEX = "2b7e151628aed2a6abf7158809cf4f3c"
SHA256_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
CHRONY_KEYS = f"""# chrony format: shared by chronyd and guardntp
5 AES128 HEX:{AES128_HEX}
1 SHA256 HEX:{SHA256_HEX}
"""


class RecordingAuthenticator:
    """Wraps the real authenticator and notes the form of every MAC'd request."""

    def __init__(self, inner: KeyAuthenticator) -> None:
        self.inner = inner
        self.seen: list[tuple[int, int | None, int, bool]] = []  # version, key, MAC len, ok

    def verify(self, data: bytes, request: Request) -> Signer | None:
        signer = self.inner.verify(data, request)
        self.seen.append((request.version, request.mac_key_id, request.mac_len,
                          signer is not None))
        return signer

    def required_for(self, packed: bytes) -> bool:
        return self.inner.required_for(packed)


def keyed_server(key_file: Path) -> tuple[InProcessServer, RecordingAuthenticator]:
    server = InProcessServer()
    recorder = RecordingAuthenticator(KeyAuthenticator(load_key_file(key_file)))
    server.pipeline.authenticator = recorder
    return server, recorder


@needs_chronyd
@pytest.mark.parametrize(("key_id", "key_type"), [(5, "AES128"), (1, "SHA256")])
def test_chronyd_syncs_with_a_key(tmp_path: Path, key_id: int, key_type: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(CHRONY_KEYS)
    keys.chmod(0o600)
    server, recorder = keyed_server(keys)
    with server:
        result = chronyd_query(server.port, conf_dir=tmp_path / "chrony", extra=f"key {key_id}",
                               extra_config=f"keyfile {keys}")
    output = result.stdout + result.stderr
    offset = parse_chronyd_offset(output)
    assert offset is not None and abs(offset) < 0.001, output
    # chronyd sent only signed requests, with our key, and every one verified.
    assert recorder.seen and all(kid == key_id and ok for _, kid, _, ok in recorder.seen), \
        recorder.seen
    counts = server.pipeline.counters.by_reason()
    assert counts.get("answered", 0) == len(recorder.seen) and "auth_failed" not in counts
    # chrony 4.3: AES128 -> NTPv4 with a 16-byte CMAC (RFC 8573); SHA256 -> NTPv3 with
    # the full 32-byte digest (NAU_GetSuggestedNtpVersion avoids the NTPv4 cut to 20).
    expected_form = {"AES128": (4, 4 + 16), "SHA256": (3, 4 + 32)}[key_type]
    assert {(v, length) for v, _, length, _ in recorder.seen} == {expected_form}


@needs_chronyd
def test_chronyd_with_the_wrong_key_gets_no_reply_and_is_counted(tmp_path: Path) -> None:
    server_keys = tmp_path / "server-keys"
    server_keys.write_text(CHRONY_KEYS)
    server_keys.chmod(0o600)
    client_keys = tmp_path / "client-keys"
    client_keys.write_text("5 AES128 HEX:" + "ff" * 16 + "\n")
    server, recorder = keyed_server(server_keys)
    with server:
        result = chronyd_query(server.port, conf_dir=tmp_path / "chrony", timeout_s=4,
                               extra="key 5", extra_config=f"keyfile {client_keys}")
    output = result.stdout + result.stderr
    assert parse_chronyd_offset(output) is None, output
    counts = server.pipeline.counters.by_reason()
    assert counts.get("auth_failed", 0) >= 1 and "answered" not in counts, counts
    assert counts["auth_failed"] == len(recorder.seen)
    assert all(not ok for *_, ok in recorder.seen)
    assert all(reason is Reason.AUTH_FAILED for reason in server.reasons_from())


def _ntpdig_script(tmp_path: Path, key_id: int, keyfile: Path) -> str:
    return f"""
{sys.executable} -m guardntp serve --listen 127.0.0.1:123 --clock local --stratum 9 \\
    --key-file {tmp_path}/chrony-keys --state-dir {tmp_path}/state > {tmp_path}/server.log 2>&1 &
# ntpdig's -t takes whole seconds only ("-t 0.2" is a usage error).
for i in $(seq 20); do ntpdig -t 1 127.0.0.1 >/dev/null 2>&1 && break; sleep 0.1; done
ntpdig -t 2 -j -k {keyfile} -a {key_id} 127.0.0.1
echo "rc=$?"
kill %1; wait
"""


def _write_ntpsec_keys(tmp_path: Path, aes_hex: str = AES128_HEX) -> Path:
    (tmp_path / "chrony-keys").write_text(CHRONY_KEYS)
    # NTPsec's format: "ID TYPE KEY", a key longer than 20 characters is hex.
    ntpsec = tmp_path / "ntpsec-keys"
    ntpsec.write_text(f"5 aes {aes_hex}\n1 sha256 {SHA256_HEX}\n")
    return ntpsec


@needs_ntpdig
@needs_netns
@pytest.mark.netns
@pytest.mark.parametrize("key_id", [5, 1], ids=["AES128", "SHA256"])
def test_ntpdig_accepts_a_signed_reply_on_port_123(tmp_path: Path, key_id: int) -> None:
    ntpsec_keys = _write_ntpsec_keys(tmp_path)
    result = run_in_netns(_ntpdig_script(tmp_path, key_id, ntpsec_keys))
    log = (tmp_path / "server.log").read_text()
    assert "rc=0" in result.stdout, result.stdout + result.stderr + log
    report = json.loads(result.stdout.strip().splitlines()[-2])
    assert report["stratum"] == 9 and abs(report["offset"]) < 0.01
    assert "MAC verification" not in result.stderr and "untrusted" not in result.stderr


@needs_ntpdig
@needs_netns
@pytest.mark.netns
def test_ntpdig_with_the_wrong_key_gets_no_reply(tmp_path: Path) -> None:
    ntpsec_keys = _write_ntpsec_keys(tmp_path, aes_hex="ff" * 16)
    result = run_in_netns(_ntpdig_script(tmp_path, 5, ntpsec_keys))
    assert result.stdout.strip() == "rc=1", result.stdout + result.stderr
    assert "no eligible servers" in result.stderr, result.stderr


def _query(port: int, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardntp", "query", f"127.0.0.1:{port}",
                           "--json", *args], capture_output=True, text=True, timeout=30,
                          check=False, env={**os.environ, **env})


def test_guardntp_client_round_trips_hmac_sha256_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "guardntp.toml"
    config.write_text("[auth]\nhmac_sha256_key_id = 42\n")
    secret = {"NTP_SECRET_KEY": "HEX:" + "5a" * 32}
    with guardntp_server(tmp_path, "--config", str(config), env=secret) as server:
        started = time.monotonic()
        good = _query(server.port, "--key-id", "42", env=secret)
        wrong = _query(server.port, "--key-id", "42", "--timeout", "1",
                       env={"NTP_SECRET_KEY": "HEX:" + "a5" * 32})
        unknown = _query(server.port, "--key-id", "43", "--timeout", "1", env=secret)
        plain = _query(server.port, env={})
        elapsed = time.monotonic() - started
    assert good.returncode == 0, good.stderr + server.log()
    report = json.loads(good.stdout)
    assert report["stratum"] == 10 and abs(report["offset"]) < 0.01
    assert "authentication: 1 key (42 HMAC-SHA256)" in server.log()
    assert "5a5a" not in server.log()  # the secret never reaches the log
    for refused in (wrong, unknown):
        assert refused.returncode == 4   # no reply
        assert refused.stderr.strip() == f"guardntp: no reply from 127.0.0.1:{server.port} " \
                                          "within 1 s"
    assert plain.returncode == 0  # unauthenticated clients are still served by default
    assert elapsed < 20


def test_guardntp_client_round_trips_every_chrony_key_type(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(CHRONY_KEYS + "2 MD5 ASCII:md5-secret-key-1\n3 SHA1 HEX:" + "11" * 20 + "\n")
    keys.chmod(0o600)
    # Nine queries in a row from one address: more than one client's burst of 8.
    with guardntp_server(tmp_path, "--key-file", str(keys),
                         "--set", "filter.source_burst=16") as server:
        for key_id in (1, 2, 3, 5):
            for version in ("3", "4"):
                result = _query(server.port, "--key-file", str(keys), "--key-id", str(key_id),
                                "--ntp-version", version, env={})
                assert result.returncode == 0, (key_id, version, result.stderr)
                assert json.loads(result.stdout)["version"] == int(version)


def test_sighup_rotates_keys_and_a_broken_file_keeps_the_old_ones(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"5 AES128 HEX:{AES128_HEX}\n")
    keys.chmod(0o600)
    client_keys = tmp_path / "client-keys"
    client_keys.write_text(f"5 AES128 HEX:{AES128_HEX}\n6 SHA1 HEX:{'66' * 20}\n")

    def signed_by(port: int, key_id: int) -> bool:
        result = _query(port, "--key-file", str(client_keys), "--key-id", str(key_id),
                        "--timeout", "1", env={})
        return result.returncode == 0

    def reload_and_wait(server, expected: str) -> None:
        before = server.log().count(expected)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while server.log().count(expected) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.log().count(expected) > before, server.log()

    with guardntp_server(tmp_path, "--key-file", str(keys)) as server:
        assert signed_by(server.port, 5) and not signed_by(server.port, 6)
        keys.write_text(f"6 SHA1 HEX:{'66' * 20}\n")
        reload_and_wait(server, "authentication: 1 key (6 SHA1)")
        assert signed_by(server.port, 6) and not signed_by(server.port, 5)
        keys.write_text("6 SHA1 HEX:66\n7 AES128 HEX:00\n")
        reload_and_wait(server, f"{keys}:2: an AES128 key must be exactly 16 bytes")
        assert signed_by(server.port, 6)  # the running keys stay
