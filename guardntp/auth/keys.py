"""The key file, in chrony's format: ``ID [TYPE] KEY`` per line.

Rule: parsing is pure (text in, keys or one :class:`KeyFileError` out, naming the
file and line: ``keys.txt:3: ...``); only :func:`load_key_file` touches the disk.

The format follows chrony 4.3 (``keys.c`` ``KEY_Reload``, ``cmdparse.c`` ``CPS_ParseKey``)
so one file serves both chronyd and guardntp:

* a line whose first non-blank character is one of ``# ! ; %`` is a comment;
* two or three words: ``ID KEY`` (type MD5, as chrony) or ``ID TYPE KEY``;
* ``KEY`` is ``HEX:`` + an even number of hex digits, ``ASCII:`` + text, or bare text
  (taken as ASCII, as chrony does; NTPsec instead reads a bare key of more than 20
  characters as hex, so write ``HEX:`` to be unambiguous);
* types: MD5, SHA1, SHA256, SHA384, SHA512 (keyed hashes), AES128 and AES256
  (CMAC, RFC 8573; the key must be exactly 16 or 32 bytes, as chrony requires),
  and guardntp's own HMAC-SHA256. Type names are case-insensitive, and NTPsec's
  ``AES`` / ``AES128CMAC`` mean AES128.

Where chrony skips a bad line with a warning, guardntp refuses the whole file: a
server that silently loses a key drops every client using it.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError

log = logging.getLogger("guardntp.auth")

#: chrony ``CPS_NormalizeLine``: these characters start a comment line.
COMMENT_CHARS = "#!;%"
#: chrony ``keys.c`` MIN_SECURE_KEY_LENGTH: it warns below 80 bits of key.
MIN_SECURE_KEY_BYTES = 10
MAX_KEY_ID = 0xFFFF_FFFF
#: A key file longer than this is refused unread (a million keys fit).
MAX_KEY_FILE_BYTES = 64 << 20


class KeyFileError(ConfigError):
    """A key file (or key text) cannot be used; the message names the file and line."""


class KeyType(enum.Enum):
    """Key types, named as in chrony's key file. The value is the canonical name."""

    MD5 = "MD5"
    SHA1 = "SHA1"
    SHA256 = "SHA256"
    SHA384 = "SHA384"
    SHA512 = "SHA512"
    AES128 = "AES128"
    AES256 = "AES256"
    HMAC_SHA256 = "HMAC-SHA256"

    @property
    def is_cmac(self) -> bool:
        return self in (KeyType.AES128, KeyType.AES256)


#: What a type name in the file may be spelled as (upper-cased before lookup).
_TYPE_NAMES: dict[str, KeyType] = {
    **{key_type.value: key_type for key_type in KeyType},
    "SHA-1": KeyType.SHA1,
    "SHA-256": KeyType.SHA256,
    "AES": KeyType.AES128,          # NTPsec
    "AES128CMAC": KeyType.AES128,   # ntpd classic, NTPsec
    "AES-128": KeyType.AES128,
    "AES-256": KeyType.AES256,
    "HMACSHA256": KeyType.HMAC_SHA256,
    "HMAC_SHA256": KeyType.HMAC_SHA256,
}

#: RFC 8573 / chrony ``cmac_*.c``: an AES-CMAC key is exactly the cipher's key size.
CMAC_KEY_BYTES = {KeyType.AES128: 16, KeyType.AES256: 32}


@dataclass(frozen=True, slots=True)
class Key:
    """One symmetric key. ``secret`` is kept out of ``repr`` so it never reaches a log."""

    key_id: int
    key_type: KeyType
    secret: bytes = field(repr=False)
    source: str = ""   # "keys.txt:3" or "NTP_SECRET_KEY", for messages

    @property
    def is_short(self) -> bool:
        """Shorter than chrony's 80-bit minimum (chrony warns "Key N is too short")."""
        return len(self.secret) < MIN_SECURE_KEY_BYTES


def parse_key_type(name: str) -> KeyType:
    """A type name as written in a key file. Raises ``ValueError`` naming the known ones."""
    key_type = _TYPE_NAMES.get(name.upper())
    if key_type is None:
        raise ValueError(f"unknown key type {name!r} (known: "
                         + ", ".join(t.value for t in KeyType) + ")")
    return key_type


def decode_secret(text: str) -> bytes:
    """``HEX:...``, ``ASCII:...`` or bare ASCII -> key bytes. Raises ``ValueError``."""
    if text.startswith("HEX:"):
        digits = text[4:]
        if not digits:
            raise ValueError("HEX: key has no digits")
        if len(digits) % 2:
            raise ValueError(f"HEX: key has an odd number of digits ({len(digits)})")
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise ValueError("HEX: key has a character that is not a hex digit") from None
    ascii_text = text[6:] if text.startswith("ASCII:") else text
    if not ascii_text:
        raise ValueError("key is empty")
    try:
        return ascii_text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("ASCII key has a non-ASCII character (use HEX:)") from None


def check_key(key_type: KeyType, secret: bytes) -> None:
    """Rules a key must meet whatever its origin. Raises ``ValueError``."""
    needed = CMAC_KEY_BYTES.get(key_type)
    if needed is not None:
        if len(secret) != needed:
            raise ValueError(f"an {key_type.value} key must be exactly {needed} bytes "
                             f"({needed * 2} hex digits), this one is {len(secret)} bytes")
        if importlib.util.find_spec("cryptography") is None:
            raise ValueError(f"{key_type.value} keys need the 'cryptography' package "
                             "(pip install 'guardntp[auth]')")


def parse_key_line(line: str) -> Key | None:
    """One line -> a :class:`Key`, or None for a blank or comment line. Raises ``ValueError``."""
    words = line.split()
    if not words or words[0][0] in COMMENT_CHARS:
        return None
    if len(words) not in (2, 3):
        raise ValueError(f"expected 'ID [TYPE] KEY', found {len(words)} words "
                         "(comments must be on a line of their own)")
    id_text = words[0]
    if not (id_text.isascii() and id_text.isdigit()) or int(id_text) > MAX_KEY_ID:
        raise ValueError(f"key id {id_text!r} is not a whole number from 0 to {MAX_KEY_ID}")
    key_type = parse_key_type(words[1]) if len(words) == 3 else KeyType.MD5
    secret = decode_secret(words[-1])
    check_key(key_type, secret)
    return Key(int(id_text), key_type, secret)


def parse_key_file(text: str, path: str = "<keys>") -> dict[int, Key]:
    """Every key in a key file, by id. Raises :class:`KeyFileError` (``path:line: why``)."""
    keys: dict[int, Key] = {}
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        try:
            key = parse_key_line(line)
        except ValueError as error:
            raise KeyFileError(f"{where}: {error}") from None
        if key is None:
            continue
        if key.key_id in keys:
            raise KeyFileError(f"{where}: key {key.key_id} is already defined at "
                               f"{keys[key.key_id].source}")
        keys[key.key_id] = Key(key.key_id, key.key_type, key.secret, where)
    return keys


def key_from_text(key_id: int, key_type: KeyType, text: str, source: str) -> Key:
    """A key given outside a file (``NTP_SECRET_KEY``). Raises :class:`KeyFileError`."""
    try:
        secret = decode_secret(text.strip())
        check_key(key_type, secret)
    except ValueError as error:
        raise KeyFileError(f"{source}: {error}") from None
    return Key(key_id, key_type, secret, source)


# ----------------------------------------------------------------------------- edge

def load_key_file(path: str | os.PathLike[str]) -> dict[int, Key]:
    """Read and parse a key file. Raises :class:`KeyFileError`; warns when others can read it."""
    name = str(path)
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_KEY_FILE_BYTES + 1)   # bounded: /dev/zero is no key file
            mode = os.fstat(file.fileno()).st_mode
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{name}: larger than {MAX_KEY_FILE_BYTES >> 20} MiB: not a "
                               "key file")
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise KeyFileError(f"{name}: not a text file (keys are ASCII; use HEX: for "
                           "binary keys)") from None
    except OSError as error:
        raise KeyFileError(f"{name}: cannot read: {error.strerror}") from None
    except ValueError as error:   # a NUL in the name (auth.key_file = "\u0000")
        raise KeyFileError(f"{name!r}: cannot read: {error}") from None
    if mode & stat.S_IROTH:
        log.warning("%s: the key file is readable by every user (chmod 600 or 640)", name)
    keys = parse_key_file(text, name)
    if not keys:
        raise KeyFileError(f"{name}: no keys in the file")
    return keys


def describe(keys: Mapping[int, Key]) -> str:
    """``3 keys (1 SHA256, 5 AES128, 9 HMAC-SHA256)`` for a log line; never the secrets."""
    listed = ", ".join(f"{key_id} {keys[key_id].key_type.value}" for key_id in sorted(keys))
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''} ({listed})"
