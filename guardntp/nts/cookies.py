"""Stateless NTS cookies under rotating master keys, and the file that keeps the keys.

A cookie (RFC 8915 §6) carries the client's session keys to whichever server gets
the next request, so no server keeps per-client state. Its layout (104 bytes for
AEAD_AES_SIV_CMAC_256, 168 for the 512 variant; both multiples of 4)::

    key id (4) | nonce (16) | AES-SIV(master key, nonce, AD = key id)(
        AEAD id (2) | 0 (2) | C2S key | S2C key)

The master keys are 64 bytes (AES-256-SIV) with a random 32-bit id. The newest
key makes new cookies; the ``keep`` keys before it still open old ones, so a
cookie stays good for between ``keep`` and ``keep + 1`` rotation periods (by
default daily and 2: two to three days, while chrony renews its cookies on every
exchange).

The pure part (:class:`MasterKeys`, :func:`make_cookie`, :func:`open_cookie`,
:func:`rotate`) takes time and randomness as arguments. :class:`KeyStore` is the
edge: the keys live in ``<state_dir>/nts-keys`` (mode 0600), read through
:mod:`guardntp.statedir` (never through a symlink, never a hard-linked file),
rewritten atomically (temporary file, fsync, rename, fsync of the directory)
under an ``flock`` on ``nts-keys.lock``, so several servers on one host can share
the file and any of them may rotate it; servers on other hosts get a copy of the
file (``rotate=False``) and pick up every change.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ..statedir import StateDirError, hand_over_fd, open_state_file, prepare_state_dir
from . import aead
from .settings import DEFAULT_KEEP, DEFAULT_PERIOD_S

MASTER_KEY_LEN = 64
COOKIE_NONCE_LEN = 16
KEY_FILE_NAME = "nts-keys"
LOCK_FILE_NAME = "nts-keys.lock"
#: More keys than this in a file is a broken file, not a rotation schedule.
MAX_KEYS = 64


class KeyStoreError(Exception):
    """A key file that cannot be used; one line naming it and why."""


@dataclass(frozen=True, slots=True)
class MasterKey:
    id: int
    key: bytes
    created_s: int

    def __post_init__(self) -> None:
        if len(self.key) != MASTER_KEY_LEN or not 0 <= self.id <= 0xFFFFFFFF:
            raise ValueError("a master key is 64 bytes with a 32-bit id")


@dataclass(frozen=True, slots=True)
class MasterKeys:
    """The keys in force: ``current`` makes cookies, any of ``by_id`` opens them."""

    current: MasterKey
    by_id: Mapping[int, bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, keys: tuple[MasterKey, ...]) -> MasterKeys:
        if not keys:
            raise ValueError("no master key")
        newest = max(keys, key=lambda k: (k.created_s, k.id))
        return cls(newest, MappingProxyType({k.id: k.key for k in keys}))


@dataclass(frozen=True, slots=True)
class CookieContents:
    algorithm: int
    c2s: bytes
    s2c: bytes


def cookie_length(algorithm: int) -> int:
    return 4 + COOKIE_NONCE_LEN + aead.TAG_LENGTH + 4 + 2 * aead.KEY_LENGTH[algorithm]


def make_cookie(keys: MasterKeys, contents: CookieContents, nonce: bytes) -> bytes:
    """A cookie for ``contents`` under the current master key (``nonce``: 16 random bytes)."""
    key_id = struct.pack("!I", keys.current.id)
    plaintext = struct.pack("!HH", contents.algorithm, 0) + contents.c2s + contents.s2c
    return key_id + nonce + aead.seal(aead.master_cipher(keys.current.key), plaintext,
                                      key_id, nonce)


class CookieRejected(ValueError):
    """A cookie that does not open; ``reason`` is a counter name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def open_cookie(keys: MasterKeys, cookie: bytes) -> CookieContents:
    """The session keys in ``cookie``, or :class:`CookieRejected` (``cookie_malformed``,
    ``cookie_unknown_key`` for an expired or foreign key, ``cookie_invalid``)."""
    if len(cookie) < 4 + COOKIE_NONCE_LEN + aead.TAG_LENGTH + 4:
        raise CookieRejected("cookie_malformed")
    key_id = cookie[:4]
    master = keys.by_id.get(struct.unpack("!I", key_id)[0])
    if master is None:
        raise CookieRejected("cookie_unknown_key")
    nonce = cookie[4:4 + COOKIE_NONCE_LEN]
    plaintext = aead.open_sealed(aead.master_cipher(master), cookie[4 + COOKIE_NONCE_LEN:],
                                 key_id, nonce)
    if plaintext is None:
        raise CookieRejected("cookie_invalid")
    algorithm, _ = struct.unpack_from("!HH", plaintext)
    key_len = aead.KEY_LENGTH.get(algorithm)
    if key_len is None or len(plaintext) != 4 + 2 * key_len:
        raise CookieRejected("cookie_invalid")
    return CookieContents(algorithm, plaintext[4:4 + key_len], plaintext[4 + key_len:])


def rotate(keys: tuple[MasterKey, ...], now_s: int, period_s: int, keep: int,
           random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> tuple[MasterKey, ...]:
    """``keys`` after a rotation at ``now_s`` if one is due (none yet, or the newest is
    ``period_s`` old), trimmed to the newest ``keep + 1``; else ``keys`` unchanged."""
    ordered = tuple(sorted(keys, key=lambda k: (k.created_s, k.id)))
    if ordered and now_s < ordered[-1].created_s + period_s:
        return keys
    used = {k.id for k in ordered}
    while True:
        new_id = int.from_bytes(random_bytes(4), "big")
        if new_id not in used:
            break
    fresh = MasterKey(new_id, random_bytes(MASTER_KEY_LEN), now_s)
    return (*ordered, fresh)[-(keep + 1):]


def format_keys(keys: tuple[MasterKey, ...]) -> str:
    lines = ["# guardntp NTS master keys: id (hex), created (Unix seconds), key (hex).",
             "# Secret. Share it only with the servers that answer for the same name."]
    lines += [f"{k.id:08x} {k.created_s} {k.key.hex()}" for k in keys]
    return "\n".join(lines) + "\n"


def parse_keys(text: str, where: str) -> tuple[MasterKey, ...]:
    """The keys of a key file's ``text``; :class:`KeyStoreError` naming ``where:line``."""
    keys: list[MasterKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) != 3:
                raise ValueError
            key = MasterKey(int(parts[0], 16), bytes.fromhex(parts[2]), int(parts[1]))
        except ValueError:
            raise KeyStoreError(f"{where}:{number}: expected `ID CREATED KEY` with an 8-digit "
                                "hex id, Unix seconds and a 128-digit hex key") from None
        if any(k.id == key.id for k in keys):
            raise KeyStoreError(f"{where}:{number}: key id {key.id:08x} appears twice")
        keys.append(key)
    if len(keys) > MAX_KEYS:
        raise KeyStoreError(f"{where}: {len(keys)} keys, more than {MAX_KEYS}")
    return tuple(keys)


class KeyStore:
    """``<state_dir>/nts-keys`` for a running server (the edge).

    :meth:`refresh` is cheap when nothing changed (one ``fstat``); call it from a
    timer (say every 10 s) and hand :attr:`keys` to :func:`guardntp.nts.responder.answer`
    and the KE server. With ``rotate=False`` this server never writes the file (a
    copy distributed from the one host that rotates)."""

    def __init__(self, state_dir: Path, period_s: int = DEFAULT_PERIOD_S,
                 keep: int = DEFAULT_KEEP, rotate: bool = True) -> None:
        if period_s < 60 or keep < 1:
            raise KeyStoreError("NTS key rotation needs a period of at least 60 s and "
                                "at least one previous key kept")
        self.state_dir = state_dir
        self.path = state_dir / KEY_FILE_NAME
        self.period_s = period_s
        self.keep = keep
        self.may_rotate = rotate
        self._seen: tuple[int, int, int, int] | None = None
        self._keys: MasterKeys | None = None
        self.rotations = 0

    @property
    def keys(self) -> MasterKeys:
        if self._keys is None:
            raise KeyStoreError(f"{self.path}: not loaded yet")
        return self._keys

    def refresh(self, now_s: float) -> MasterKeys:
        """The keys in force at ``now_s``: re-read when the file changed, rotated (and
        written) when due and allowed. Raises :class:`KeyStoreError` or
        :class:`~guardntp.statedir.StateDirError`; the keys already held stay valid."""
        now = int(now_s)
        if (self._keys is not None and self._identity() == self._seen
                and (not self.may_rotate
                     or now < self._keys.current.created_s + self.period_s)):
            return self._keys
        if not self.may_rotate:
            prepare_state_dir(self.state_dir, create=False)
            keys = self._read()
            if not keys:
                raise KeyStoreError(f"{self.path}: no NTS master key (and this server does "
                                    "not rotate keys)")
            return self._adopt(keys)
        prepare_state_dir(self.state_dir)
        with _Locked(self.state_dir / LOCK_FILE_NAME):
            keys = self._read()
            new = rotate(keys, now, self.period_s, self.keep)
            if new != keys:
                self._write(new)
                self.rotations += 1
            return self._adopt(new)

    def _adopt(self, keys: tuple[MasterKey, ...]) -> MasterKeys:
        self._keys = MasterKeys.of(keys)
        self._seen = self._identity()
        return self._keys

    def _identity(self) -> tuple[int, int, int, int] | None:
        try:
            fd = open_state_file(self.path)
        except FileNotFoundError:
            return None
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)

    def _read(self) -> tuple[MasterKey, ...]:
        try:
            fd = open_state_file(self.path)
        except FileNotFoundError:
            return ()
        try:
            info = os.fstat(fd)
            if stat.S_IMODE(info.st_mode) & 0o077:
                raise KeyStoreError(f"{self.path} is readable or writable by others (mode "
                                    f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
            if info.st_size > 64 * 1024:
                raise KeyStoreError(f"{self.path} is {info.st_size} bytes; not a key file")
            with open(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC),
                      encoding="ascii", errors="replace") as handle:
                text = handle.read(64 * 1024)
        except OSError as error:
            raise KeyStoreError(f"{self.path}: {error.strerror}") from None
        finally:
            os.close(fd)
        return parse_keys(text, str(self.path))

    def _write(self, keys: tuple[MasterKey, ...]) -> None:
        directory = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                            | os.O_CLOEXEC)
        try:
            owner = os.fstat(directory)
            temp = f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
            try:
                # O_EXCL | O_NOFOLLOW: a planted name (symlink or file) fails, never followed.
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=directory)
            except OSError as error:
                raise KeyStoreError(f"{self.state_dir / temp}: cannot create it: "
                                    f"{error.strerror}") from None
            try:
                try:
                    if os.geteuid() == 0 and owner.st_uid != 0:
                        hand_over_fd(fd, owner.st_uid, owner.st_gid, 0o600)
                    os.write(fd, format_keys(keys).encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temp, KEY_FILE_NAME, src_dir_fd=directory, dst_dir_fd=directory)
            except OSError as error:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=directory)
                raise KeyStoreError(f"{self.path}: cannot write it: {error.strerror}") from None
            os.fsync(directory)
        finally:
            os.close(directory)


class _Locked:
    """An exclusive ``flock`` on a lock file in the state directory, opened safely."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _Locked:
        handle = open_state_file(self.path, create=True)
        try:
            owner = os.lstat(self.path.parent)
            if os.geteuid() == 0 and owner.st_uid != 0:
                # root (before the privilege drop) makes it the service user's, as the key file
                hand_over_fd(handle, owner.st_uid, owner.st_gid, 0o600)
            self.fd = os.open(f"/proc/self/fd/{handle}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise StateDirError(f"{self.path}: {error.strerror}") from None
        finally:
            os.close(handle)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock
