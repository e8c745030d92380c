"""Symmetric-key authentication without real peers: vectors, key files, the auth stage.

Real chronyd / ntpdig against guardntp are in ``test_auth_peers.py``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import free_udp_port
from hypothesis import given, settings
from hypothesis import strategies as st

from guardntp import cli, client
from guardntp.auth import mac
from guardntp.auth.client import client_key, client_signing
from guardntp.auth.keys import (
    Key,
    KeyFileError,
    KeyType,
    decode_secret,
    load_key_file,
    parse_key_file,
)
from guardntp.auth.server import KeyAuthenticator
from guardntp.auth.settings import authenticator_for, parse_auth_section, resolve_key_file
from guardntp.clock import ClockState
from guardntp.config import Config, ConfigError, parse_config
from guardntp.filter.pipeline import Pipeline
from guardntp.filter.policy import FilterPolicy
from guardntp.responder import Responder, inspect_request
from guardntp.timestamps import NS_PER_S
from guardntp.verdicts import Reason
from guardntp.wire import ExtensionField, Mode, NtpPacket, Tail, encode, parse

WALL = 1_800_000_000 * NS_PER_S
CLOCK = ClockState(synchronized=True, stratum=2, refid=b"\xc0\0\2\1", precision=-20,
                   root_delay_ns=0, root_dispersion_ns=0, reference_unix_ns=WALL)

AES128_KEY = Key(5, KeyType.AES128, bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"))
SHA256_KEY = Key(1, KeyType.SHA256, bytes(range(32)))
MD5_KEY = Key(2, KeyType.MD5, b"hello-world-123")
SHA1_KEY = Key(3, KeyType.SHA1, b"sha1-secret-key-20bb")
HMAC_KEY = Key(9, KeyType.HMAC_SHA256, b"guardntp-only-secret")
ALL_KEYS = {k.key_id: k for k in (AES128_KEY, SHA256_KEY, MD5_KEY, SHA1_KEY, HMAC_KEY)}


def request(version: int = 4, xmt: int = 0x1111_2222_3333_4444, poll: int = 6,
            mode: Mode = Mode.CLIENT) -> bytes:
    return encode(NtpPacket(version=version, mode=mode, transmit_ts=xmt, poll=poll))


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


# ----------------------------------------------------------------------------- vectors

# RFC 4493 §4: AES-128 key 2b7e1516 28aed2a6 abf71588 09cf4f3c and the NIST message.
RFC4493_MESSAGE = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710".replace(" ", ""))


@pytest.mark.parametrize(("length", "expected"), [
    (0, "bb1d6929e95937287fa37d129b756746"),
    (16, "070a16b46b4d4144f79bdd9dd04a287c"),
    (40, "dfa66747de9ae63030ca32611497c827"),
    (64, "51f0bebf7e3b9d92fc49741779363cfe"),
])
def test_aes128_cmac_rfc4493_vectors(length: int, expected: str) -> None:
    assert mac.full_digest(AES128_KEY, RFC4493_MESSAGE[:length]).hex() == expected


@pytest.mark.parametrize(("length", "expected"), [
    (0, "028962f61b7bf89efc6b551f4667d983"),
    (16, "28a7023f452e8f82bd4bf28d8c37c35c"),
])
def test_aes256_cmac_nist_sp800_38b_vectors(length: int, expected: str) -> None:
    key = Key(6, KeyType.AES256, bytes.fromhex(
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"))
    assert mac.full_digest(key, RFC4493_MESSAGE[:length]).hex() == expected


def test_hmac_sha256_rfc4231_case_2() -> None:
    key = Key(9, KeyType.HMAC_SHA256, b"Jefe")
    assert mac.full_digest(key, b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_keyed_hashes_are_hash_of_key_then_packet() -> None:
    # RFC 5905 §7.3 / chrony HSH_Hash(key, packet): the digest of the key followed by
    # the packet; the MD5 of "" + "abc" is the RFC 1321 test vector.
    empty_md5 = Key(1, KeyType.MD5, b"")
    assert mac.full_digest(empty_md5, b"abc").hex() == "900150983cd24fb0d6963f7d28e17f72"
    sha1 = Key(1, KeyType.SHA1, b"ab")
    assert mac.full_digest(sha1, b"c").hex() == "a9993e364706816aba3e25717850c26c9cd0d89d"


NTPSEC_PYTHON = "/usr/bin/python3"
NTPSEC_TYPES = {KeyType.MD5: "md5", KeyType.SHA1: "sha1", KeyType.SHA256: "sha256",
                KeyType.SHA512: "sha512", KeyType.AES128: "aes"}


@pytest.mark.skipif(subprocess.run([NTPSEC_PYTHON, "-c", "import ntp.ntpc"],
                                   capture_output=True, check=False).returncode != 0
                    if os.path.exists(NTPSEC_PYTHON) else True,
                    reason="NTPsec's Python bindings (ntpsec-ntpdig) are not installed")
@pytest.mark.parametrize("key_type", list(NTPSEC_TYPES))
def test_digests_match_ntpsec_libntp(key_type: KeyType) -> None:
    """An independent implementation (NTPsec's C ``do_mac``) computes the same digest."""
    secret = bytes(range(1, 17))
    packet = request()
    script = ("import sys, ntp.ntpc as c; sys.stdout.write(c.mac(bytes.fromhex(sys.argv[1]), "
              "bytes.fromhex(sys.argv[2]), sys.argv[3]).hex())")
    result = subprocess.run([NTPSEC_PYTHON, "-c", script, packet.hex(), secret.hex(),
                             NTPSEC_TYPES[key_type]], capture_output=True, text=True, check=True)
    assert result.stdout == mac.full_digest(Key(1, key_type, secret), packet).hex()


# ----------------------------------------------------------------------------- key files

def test_key_file_in_chrony_format() -> None:
    text = """# chrony keys
! another comment style
; and another
% and a fourth
1 SHA256 HEX:000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F
  2 MD5 ASCII:hello-world-123
3 sha1 plain-ascii-secret
4 bare-md5-key
5 AES HEX:2b7e151628aed2a6abf7158809cf4f3c
6 AES128CMAC HEX:2b7e151628aed2a6abf7158809cf4f3c
7 AES256 HEX:603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4
8 HMAC-SHA256 ASCII:x#y;z

4294967295 SHA512 HEX:ff
"""
    keys = parse_key_file(text, "keys.txt")
    assert sorted(keys) == [1, 2, 3, 4, 5, 6, 7, 8, 4294967295]
    assert keys[1].key_type is KeyType.SHA256 and keys[1].secret == bytes(range(32))
    assert keys[2].secret == b"hello-world-123" and keys[2].key_type is KeyType.MD5
    assert keys[3].key_type is KeyType.SHA1 and keys[3].secret == b"plain-ascii-secret"
    assert keys[4].key_type is KeyType.MD5 and keys[4].secret == b"bare-md5-key"  # chrony default
    assert keys[5].key_type is keys[6].key_type is KeyType.AES128
    assert keys[7].key_type is KeyType.AES256
    assert keys[8].secret == b"x#y;z"  # a comment character inside a key is key material
    assert keys[1].source == "keys.txt:5"
    assert keys[4294967295].is_short and not keys[1].is_short


def test_a_key_never_shows_its_secret_in_repr() -> None:
    assert "hello" not in repr(MD5_KEY) and "hello" not in str(MD5_KEY)


@pytest.mark.parametrize(("line", "message"), [
    ("1 SHA256 HEX:00 # note", "expected 'ID [TYPE] KEY', found 5 words"),
    ("one MD5 HEX:00", "key id 'one' is not a whole number"),
    ("-1 MD5 HEX:00", "key id '-1' is not a whole number"),
    ("\u0661 MD5 HEX:00", "is not a whole number"),
    ("4294967296 MD5 HEX:00", "key id '4294967296'"),
    ("1 SHA3 HEX:00", "unknown key type 'SHA3' (known: MD5, SHA1, SHA256"),
    ("1 MD5 HEX:abc", "odd number of digits (3)"),
    ("1 MD5 HEX:zz", "not a hex digit"),
    ("1 MD5 HEX:", "HEX: key has no digits"),
    ("1 MD5 ASCII:", "key is empty"),
    ("1 MD5 ASCII:caf\u00e9", "non-ASCII character"),
    ("1 AES128 HEX:00112233", "AES128 key must be exactly 16 bytes (32 hex digits), "
                              "this one is 4 bytes"),
    ("1 AES128 0123456789abcdef0123456789abcdef", "this one is 32 bytes"),
])
def test_key_file_errors_name_the_file_and_line(line: str, message: str) -> None:
    text = "# keys\n2 MD5 HEX:00112233445566778899\n" + line + "\n"
    with pytest.raises(KeyFileError) as caught:
        parse_key_file(text, "keys.txt")
    assert str(caught.value).startswith("keys.txt:3: "), caught.value
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_duplicate_key_id_names_both_lines() -> None:
    with pytest.raises(KeyFileError, match=r"^keys\.txt:3: key 2 is already defined at "
                                           r"keys\.txt:1$"):
        parse_key_file("2 MD5 HEX:00\n\n2 SHA1 HEX:01\n", "keys.txt")


def test_load_key_file_edge_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read: No such file"):
        load_key_file(tmp_path / "missing")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(KeyFileError, match="not a text file"):
        load_key_file(binary)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(KeyFileError, match="no keys in the file"):
        load_key_file(empty)
    # auth.key_file = "\u0000": TOML can spell a NUL that no file name can hold.
    with pytest.raises(KeyFileError, match=r"^'keys\\x00': cannot read: embedded null byte$"):
        load_key_file("keys\0")


def test_a_nul_in_auth_key_file_is_one_line_for_check_config(tmp_path: Path) -> None:
    from guardntp.commands import check_config

    path = tmp_path / "guardntp.toml"
    path.write_text('[auth]\nkey_file = "\\u0000"\n')
    with pytest.raises(cli.CommandError, match="cannot read: embedded null byte$"):
        check_config.run(type("Args", (), {"file": str(path)})())


def test_a_key_file_without_end_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardntp.auth import keys

    monkeypatch.setattr(keys, "MAX_KEY_FILE_BYTES", 1 << 20)
    with pytest.raises(KeyFileError, match=r"^/dev/zero: larger than 1 MiB: not a key file$"):
        load_key_file("/dev/zero")


def test_world_readable_key_file_is_loaded_with_a_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "keys"
    path.write_text("1 MD5 HEX:00112233445566778899\n")
    path.chmod(0o644)
    assert 1 in load_key_file(path)
    assert "readable by every user" in caplog.text
    caplog.clear()
    path.chmod(0o600)
    load_key_file(path)
    assert "readable" not in caplog.text


def test_decode_secret_forms() -> None:
    assert decode_secret("HEX:0aFF") == b"\x0a\xff"
    assert decode_secret("ASCII:HEX:00") == b"HEX:00"
    assert decode_secret("abc") == b"abc"


# ----------------------------------------------------------------------------- MAC rules

def test_accepted_digest_lengths_follow_chrony_and_ntpsec() -> None:
    assert mac.accepted_digest_lengths(KeyType.MD5) == (16,)
    assert mac.accepted_digest_lengths(KeyType.SHA1) == (20,)
    assert mac.accepted_digest_lengths(KeyType.SHA256) == (32, 20)
    assert mac.accepted_digest_lengths(KeyType.AES128) == (16,)
    assert mac.accepted_digest_lengths(KeyType.HMAC_SHA256) == (32, 20)
    assert mac.digest_len_for(KeyType.SHA256, 4) == 20  # chrony's NTPv4 cut
    assert mac.digest_len_for(KeyType.SHA256, 3) == 32


@pytest.mark.parametrize("key", list(ALL_KEYS.values()), ids=lambda k: k.key_type.value)
def test_check_accepts_exact_and_refuses_altered_or_shortened(key: Key) -> None:
    packet = request()
    for length in mac.accepted_digest_lengths(key.key_type):
        signed = mac.sign(key, packet, length)
        digest = signed[52:]
        assert len(digest) == length
        assert mac.check(key, packet, digest)
        flipped = bytes([digest[0] ^ 1]) + digest[1:]
        assert not mac.check(key, packet, flipped)
        assert not mac.check(key, packet[:-1] + b"\x01", digest)
    assert not mac.check(key, packet, mac.full_digest(key, packet)[:12])  # cut too short
    assert not mac.check(key, packet, b"")


# ----------------------------------------------------------------------------- server side

class Harness:
    def __init__(self, authenticator: KeyAuthenticator | None, **policy: object) -> None:
        policy.setdefault("random_seed", 1)
        self.pipeline = Pipeline(FilterPolicy(**policy), Responder(CLOCK, WALL),
                                 authenticator=authenticator)
        self.now = 10 * NS_PER_S

    def send(self, data: bytes, source: str = "192.0.2.7", port: int = 40000
             ) -> tuple[Reason, bytes | None]:
        reason, reply, signer = self.pipeline.decide(data, ip(source), port, WALL + self.now,
                                                     self.now)
        if reply is not None and signer is not None:
            reply = signer(reply)
        return reason, reply

    def count(self, reason: Reason) -> int:
        return self.pipeline.counters.by_reason().get(reason.name.lower(), 0)


@pytest.mark.parametrize("key", list(ALL_KEYS.values()), ids=lambda k: k.key_type.value)
@pytest.mark.parametrize("version", [3, 4])
def test_signed_request_gets_a_reply_signed_the_same_way(key: Key, version: int) -> None:
    harness = Harness(KeyAuthenticator(ALL_KEYS))
    sign, verify = client_signing(key, version)
    data = sign(request(version))
    reason, reply = harness.send(data)
    assert reason is Reason.ANSWERED and reply is not None
    assert len(reply) == len(data)  # same key id and MAC length, never longer
    assert reply[48:52] == data[48:52]
    header = verify(reply)
    packet = parse(header)
    assert packet.origin_ts == 0x1111_2222_3333_4444 and packet.version == version


def test_wrong_key_or_unknown_id_gets_nothing_and_is_counted() -> None:
    harness = Harness(KeyAuthenticator(ALL_KEYS))
    impostor = Key(AES128_KEY.key_id, KeyType.AES128, bytes(16))
    sign, _ = client_signing(impostor)
    assert harness.send(sign(request())) == (Reason.AUTH_FAILED, None)
    stranger = Key(77, KeyType.MD5, b"whatever-secret")
    assert harness.send(client_signing(stranger)[0](request())) == (Reason.AUTH_FAILED, None)
    assert harness.count(Reason.AUTH_FAILED) == 2
    assert harness.count(Reason.ANSWERED) == 0


def test_truncated_and_full_sha256_both_accepted_other_cuts_refused() -> None:
    harness = Harness(KeyAuthenticator(ALL_KEYS))
    for length in (32, 20):
        data = mac.sign(SHA256_KEY, request(), length)
        reason, reply = harness.send(data)
        assert reason is Reason.ANSWERED and reply is not None and len(reply) == 52 + length
    assert harness.send(mac.sign(SHA256_KEY, request(), 16))[0] is Reason.AUTH_FAILED


def test_mac_after_an_extension_field_covers_it_and_reply_is_shorter() -> None:
    packet = NtpPacket(version=4, transmit_ts=42,
                       tail=Tail(extension_fields=(ExtensionField(0x2005, bytes(28)),)))
    data = mac.sign(AES128_KEY, encode(packet), 16)
    inspected = inspect_request(data, 40000)
    assert not isinstance(inspected, Reason) and inspected.mac_offset == 80
    harness = Harness(KeyAuthenticator(ALL_KEYS))
    reason, reply = harness.send(data)
    assert reason is Reason.ANSWERED and reply is not None
    assert len(reply) == 48 + 20 < len(data)
    client_signing(AES128_KEY)[1](reply)
    # Altering the extension field breaks the MAC.
    tampered = data[:60] + b"\x01" + data[61:]
    assert harness.send(tampered)[0] is Reason.AUTH_FAILED


def test_rate_kod_to_a_signed_request_is_signed() -> None:
    harness = Harness(KeyAuthenticator(ALL_KEYS), source_burst=1, source_rate=0.01,
                      leak_one_in=0)
    sign, verify = client_signing(AES128_KEY)
    assert harness.send(sign(request()))[0] is Reason.ANSWERED
    reason, reply = harness.send(sign(request()))
    assert reason is Reason.RATE_KOD and reply is not None
    kod = parse(verify(reply))
    assert kod.stratum == 0 and kod.kiss_code == "RATE"
    # ... and an unsigned one gets an unsigned KoD (nothing to sign with).
    harness.now += 100 * NS_PER_S
    assert harness.send(request(), source="192.0.2.8")[0] is Reason.ANSWERED
    reason, reply = harness.send(request(), source="192.0.2.8")
    assert reason is Reason.RATE_KOD and reply is not None and len(reply) == 48


def test_require_policy_longest_prefix_wins() -> None:
    networks = ipaddress.ip_network
    authenticator = KeyAuthenticator(
        ALL_KEYS, require=[networks("10.0.0.0/8"), networks("2001:db8::/32")],
        optional=[networks("10.1.0.0/16")])
    harness = Harness(authenticator)
    sign, _ = client_signing(MD5_KEY)
    assert harness.send(request(), "10.2.3.4") == (Reason.AUTH_REQUIRED, None)
    assert harness.send(request(), "2001:db8::1")[0] is Reason.AUTH_REQUIRED
    assert harness.send(sign(request()), "10.2.3.4")[0] is Reason.ANSWERED
    assert harness.send(request(), "10.1.2.3")[0] is Reason.ANSWERED     # optional inside
    assert harness.send(request(), "192.0.2.1")[0] is Reason.ANSWERED    # default: serve
    assert harness.count(Reason.AUTH_REQUIRED) == 2
    assert not KeyAuthenticator(ALL_KEYS).required_for(ip("10.2.3.4"))


def test_without_an_authenticator_signed_requests_are_dropped() -> None:
    harness = Harness(None)
    assert harness.send(client_signing(MD5_KEY)[0](request()))[0] is Reason.AUTH_FAILED


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(list(ALL_KEYS.values())), version=st.integers(1, 4),
       mode=st.sampled_from([Mode.CLIENT, Mode.SYMMETRIC_ACTIVE]),
       xmt=st.integers(0, (1 << 64) - 1), poll=st.integers(-128, 127),
       corrupt=st.one_of(st.none(), st.integers(0, 200)))
def test_property_signed_replies_verify_and_never_exceed_the_request(
        key: Key, version: int, mode: Mode, xmt: int, poll: int, corrupt: int | None) -> None:
    harness = Harness(KeyAuthenticator(ALL_KEYS))
    sign, verify = client_signing(key, version)
    data = sign(request(version, xmt, poll, mode))
    if corrupt is not None:
        index = corrupt % len(data)
        data = data[:index] + bytes([data[index] ^ 0x80]) + data[index + 1:]
    reason, reply = harness.send(data)
    if reply is not None:
        assert len(reply) <= len(data)
    if corrupt is None:
        assert reason is Reason.ANSWERED and reply is not None
        assert parse(verify(reply)).origin_ts == xmt
    else:
        # One bit altered anywhere (header, key id or digest): never answered.
        assert reason in (Reason.AUTH_FAILED, Reason.MALFORMED), reason


# ----------------------------------------------------------------------------- client side

def test_client_verify_rejects_with_clear_reasons() -> None:
    sign, verify = client_signing(SHA1_KEY)
    reply = mac.sign(SHA1_KEY, request(), 20)
    assert verify(reply) == reply[:48]
    cases = {
        reply[:48]: "reply is not authenticated (no MAC), expected one with key 3",
        reply[:-4]: "reply is 68 bytes, expected 72",
        mac.sign(Key(4, KeyType.SHA1, SHA1_KEY.secret), request(), 20):
            "reply is signed with key 4, expected key 3",
        reply[:-1] + bytes([reply[-1] ^ 1]): "reply MAC does not verify with key 3 (SHA1)",
    }
    for bad, message in cases.items():
        with pytest.raises(client.BogusReply) as caught:
            verify(bad)
        assert str(caught.value).startswith(message), caught.value


def test_client_key_sources(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("5 AES128 HEX:2b7e151628aed2a6abf7158809cf4f3c\n")
    assert client_key(str(keys), 5).key_type is KeyType.AES128
    with pytest.raises(KeyFileError, match=r"no key 6 \(the file has 5\)"):
        client_key(str(keys), 6)
    env_key = client_key(None, 42, {"NTP_SECRET_KEY": "HEX:00112233445566778899aabbccddeeff"})
    assert env_key.key_type is KeyType.HMAC_SHA256 and env_key.secret[:2] == b"\0\x11"
    with pytest.raises(KeyFileError, match="needs --key-file FILE, or NTP_SECRET_KEY"):
        client_key(None, 42, {})
    with pytest.raises(KeyFileError, match="^NTP_SECRET_KEY: HEX: key has an odd number"):
        client_key(None, 42, {"NTP_SECRET_KEY": "HEX:abc"})


class ForgingServer:
    """A UDP responder on loopback that answers one request with a reply whose MAC was
    made with the wrong secret (what a spoofer without the key can do at best)."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", free_udp_port()))
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._answer_once, daemon=True)
        self.thread.start()

    def _answer_once(self) -> None:
        try:
            data, peer = self.sock.recvfrom(1024)
        except TimeoutError:
            return
        responder = Responder(CLOCK, WALL)
        inspected = inspect_request(data, peer[1])
        assert not isinstance(inspected, Reason)
        reply = responder.time_reply(data, inspected, responder.served_ntp(WALL),
                                     responder.served_ntp(WALL))
        self.sock.sendto(mac.sign(self.key, reply, len(data) - 52), peer)

    def close(self) -> None:
        self.thread.join(timeout=6)
        self.sock.close()


def test_query_rejects_a_reply_with_a_bad_mac(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    keys.write_text("5 AES128 HEX:2b7e151628aed2a6abf7158809cf4f3c\n")
    forger = ForgingServer(Key(5, KeyType.AES128, bytes(16)))
    try:
        status = cli.main(["query", f"127.0.0.1:{forger.port}", "--key-file", str(keys),
                           "--key-id", "5", "--timeout", "3"])
    finally:
        forger.close()
    err = capsys.readouterr().err
    assert status == 5   # rejected reply
    assert err.strip() == (f"guardntp: 127.0.0.1:{forger.port}: rejected reply: reply MAC does "
                           "not verify with key 5 (AES128): wrong key on one side, or a forged "
                           "or corrupted reply")


@pytest.mark.parametrize(("argv", "message"), [
    (["--key-file", "KEYS"], "--key-file needs --key-id N"),
    (["--key-file", "KEYS", "--key-id", "6"], "no key 6 (the file has 5)"),
    (["--key-file", "MISSING", "--key-id", "5"], "missing: cannot read: No such file"),
    (["--key-id", "5"], "--key-id 5 needs --key-file FILE, or NTP_SECRET_KEY"),
    (["--key-id", "-1"], "--key-id must be 0-4294967295"),
])
def test_query_key_errors_are_one_line(tmp_path: Path, capsys, monkeypatch, argv, message) -> None:
    monkeypatch.delenv("NTP_SECRET_KEY", raising=False)
    keys = tmp_path / "keys"
    keys.write_text("5 AES128 HEX:2b7e151628aed2a6abf7158809cf4f3c\n")
    argv = [str(keys) if a == "KEYS" else str(tmp_path / "missing") if a == "MISSING" else a
            for a in argv]
    status = cli.main(["query", "127.0.0.1:9", *argv])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- settings

def test_auth_section_validation() -> None:
    settings_ = parse_auth_section({"key_file": "keys", "require": ["10.0.0.0/8"],
                                    "optional": "10.1.0.0/16", "hmac_sha256_key_id": 7}, "g.toml")
    assert settings_.require == (ipaddress.ip_network("10.0.0.0/8"),)
    assert settings_.optional == (ipaddress.ip_network("10.1.0.0/16"),)
    bad = [
        ({"keyfile": "x"}, "g.toml: auth.keyfile: unknown setting (known: key_file"),
        ({"key_file": 3}, "auth.key_file: must be a string"),
        ({"key_file": "k", "require": ["10.0.0.1/8"]}, "has host bits set past the /8; did "
                                                       "you mean 10.0.0.0/8?"),
        ({"key_file": "k", "require": [1]}, "auth.require: must be a list of CIDRs"),
        ({"hmac_sha256_key_id": True}, "auth.hmac_sha256_key_id: must be a whole number"),
        ({"hmac_sha256_key_id": 1 << 32}, "auth.hmac_sha256_key_id: must be a whole number"),
        ({"require": ["10.0.0.0/8"]}, "auth.require: needs keys"),
    ]
    for table, message in bad:
        with pytest.raises(ConfigError) as caught:
            parse_auth_section(table, "g.toml")
        assert message in str(caught.value), (table, caught.value)


def test_relative_key_file_is_next_to_the_config() -> None:
    assert resolve_key_file("keys", "/etc/guardntp/guardntp.toml") == Path("/etc/guardntp/keys")
    assert resolve_key_file("/abs/keys", "/etc/g.toml") == Path("/abs/keys")
    assert resolve_key_file("keys", "<embedded default>") == Path("keys")


def test_authenticator_for_config_env_and_flag(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("5 AES128 HEX:2b7e151628aed2a6abf7158809cf4f3c\n")
    config_path = str(tmp_path / "g.toml")
    config = parse_config('[auth]\nkey_file = "keys"\nhmac_sha256_key_id = 9\n'
                          'require = ["10.0.0.0/8"]\n', config_path)
    env = {"NTP_SECRET_KEY": "guardntp-only-secret"}
    authenticator = authenticator_for(config, None, env)
    assert authenticator is not None
    assert sorted(authenticator.keys) == [5, 9]
    assert authenticator.keys[9].secret == b"guardntp-only-secret"
    assert authenticator.required_for(ip("10.9.9.9"))
    with pytest.raises(KeyFileError, match="NTP_SECRET_KEY is not set or empty"):
        authenticator_for(config, None, {})
    clash = parse_config('[auth]\nkey_file = "keys"\nhmac_sha256_key_id = 5\n', config_path)
    with pytest.raises(KeyFileError, match="key 5 is already defined at .*keys:1"):
        authenticator_for(clash, None, env)
    assert authenticator_for(Config(), None, env) is None  # no [auth]: no auth stage at all
    other = tmp_path / "other"
    other.write_text("1 SHA1 HEX:00112233445566778899\n")
    flagged = authenticator_for(Config(), str(other), env)
    assert flagged is not None and sorted(flagged.keys) == [1]


def test_serve_refuses_a_malformed_key_file_with_the_line(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("1 SHA256 HEX:00112233445566778899aabbccddeeff\n\n3 AES128 HEX:0011\n")
    port = free_udp_port()
    status = cli.main(["serve", "--listen", f"127.0.0.1:{port}", "--clock", "local",
                       "--state-dir", str(tmp_path / "state"), "--key-file", str(keys)])
    err = capsys.readouterr().err
    assert status == 2
    assert f"guardntp: {keys}:3: an AES128 key must be exactly 16 bytes" in err
    assert "Traceback" not in err


def test_check_config_validates_auth_and_the_key_file(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    keys.write_text("5 AES128 HEX:2b7e151628aed2a6abf7158809cf4f3c\n1 SHA1 HEX:" + "ab" * 20 + "\n")
    config = tmp_path / "g.toml"
    config.write_text('[auth]\nkey_file = "keys"\nhmac_sha256_key_id = 9\n'
                      'require = ["10.0.0.0/8"]\n')
    assert cli.main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert ("2 keys (1 SHA1, 5 AES128); key 9 HMAC-SHA256 from $NTP_SECRET_KEY; "
            "authentication required from 1 network)") in out
    keys.write_text("5 AES128 HEX:2b7e\n")
    assert cli.main(["check-config", str(config)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"guardntp: {keys}:1: an AES128 key must be exactly 16 bytes (32 hex digits), this "
        "one is 2 bytes")


@pytest.mark.parametrize("key_id", [16, 20, 36])
def test_ntpsec_style_full_sha256_mac_with_an_extension_field_like_key_id(key_id: int) -> None:
    key = Key(key_id, KeyType.SHA256, bytes(range(32)))
    harness = Harness(KeyAuthenticator({key_id: key}))
    reason, reply = harness.send(mac.sign(key, request(), 32))  # what ntpdig 1.2 sends
    assert reason is Reason.ANSWERED and reply is not None and len(reply) == 84
