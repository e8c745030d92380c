"""Computing and checking NTP MACs. No I/O, no clocks.

A MAC is a 4-byte key id followed by a digest over everything before it (the
48-byte header and any extension fields, RFC 5905 §7.3 / RFC 7822):

=============  ==============================  ============  ================================
type           digest                          full length   accepted on the wire
=============  ==============================  ============  ================================
MD5            MD5(key || packet)              16            16
SHA1           SHA1(key || packet)             20            20
SHA256         SHA256(key || packet)           32            32, or the first 20
SHA384/512     SHA384/512(key || packet)       48/64         48/64, or the first 20
AES128/256     AES-CMAC(key, packet), RFC 8573 16            16
HMAC-SHA256    HMAC-SHA256(key, packet)        32            32, or the first 20
=============  ==============================  ============  ================================

Why "or the first 20": chrony 4.3 (``ntp_auth.c`` ``generate_symmetric_auth``) cuts
MACs in NTPv4 packets to ``NTP_MAX_V4_MAC_LENGTH`` = 4 + 20 bytes so that extension
fields parse deterministically (RFC 7822 §7.5), and accepts a digest only if its
length is ``min(full, 20)`` in NTPv4 or ``full`` otherwise (``keys.c`` ``check_ntp_auth``).
In practice chronyd sends SHA256 keys as NTPv3 with the full 32 bytes
(``NAU_GetSuggestedNtpVersion``); NTPsec's ntpd cuts digests to 20 bytes
(``MAX_BARE_MAC_LENGTH``, "digest ... will be truncated"); NTPsec 1.2's ntpdig sends
and expects the full digest. Shorter cuts are refused: they would weaken the MAC.
A reply is signed with the request's key id and digest length, so every client
gets back exactly the form it sent.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import TYPE_CHECKING

from .keys import Key, KeyType

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.cmac import CMAC

KEY_ID_LEN = 4
#: chrony NTP_MAX_V4_MAC_LENGTH - 4, NTPsec MAX_BARE_MAC_LENGTH: the NTPv4 digest cut.
TRUNCATED_DIGEST_LEN = 20

_HASH_NAMES = {
    KeyType.MD5: "md5", KeyType.SHA1: "sha1", KeyType.SHA256: "sha256",
    KeyType.SHA384: "sha384", KeyType.SHA512: "sha512",
}
DIGEST_LEN = {
    KeyType.MD5: 16, KeyType.SHA1: 20, KeyType.SHA256: 32, KeyType.SHA384: 48,
    KeyType.SHA512: 64, KeyType.AES128: 16, KeyType.AES256: 16, KeyType.HMAC_SHA256: 32,
}


def full_digest(key: Key, data: bytes) -> bytes:
    """The untruncated digest of ``data`` under ``key``."""
    key_type = key.key_type
    if key_type is KeyType.HMAC_SHA256:
        return hmac.digest(key.secret, data, "sha256")
    if key_type.is_cmac:
        return aes_cmac(key.secret, data)
    return hashlib.new(_HASH_NAMES[key_type], key.secret + data).digest()


def aes_cmac(secret: bytes, data: bytes) -> bytes:
    """AES-CMAC (RFC 4493; NTP use in RFC 8573) with a 16- or 32-byte key."""
    mac = _cmac_initialised(secret).copy()
    mac.update(data)
    return mac.finalize()


@functools.lru_cache(maxsize=1024)
def _cmac_initialised(secret: bytes) -> CMAC:
    """A keyed CMAC context to copy: copying costs 0.4 us, a fresh context ~1.5 us,
    and the per-call imports that keep ``cryptography`` optional cost ~8 us more."""
    # Imported here: ``cryptography`` is an optional dependency (the ``auth`` extra)
    # and key loading already refused CMAC keys when it is missing.
    from cryptography.hazmat.primitives.ciphers.algorithms import AES
    from cryptography.hazmat.primitives.cmac import CMAC

    return CMAC(AES(secret))


def accepted_digest_lengths(key_type: KeyType) -> tuple[int, ...]:
    """Digest lengths a MAC with this key type may have (see the module table)."""
    full = DIGEST_LEN[key_type]
    return (full, TRUNCATED_DIGEST_LEN) if full > TRUNCATED_DIGEST_LEN else (full,)


def digest_len_for(key_type: KeyType, version: int) -> int:
    """The digest length guardntp's client sends: cut to 20 in NTPv4, as chrony does."""
    full = DIGEST_LEN[key_type]
    return min(full, TRUNCATED_DIGEST_LEN) if version == 4 else full


def sign(key: Key, data: bytes, digest_len: int) -> bytes:
    """``data`` + key id + digest cut to ``digest_len`` (one of the accepted lengths)."""
    return data + key.key_id.to_bytes(KEY_ID_LEN, "big") + full_digest(key, data)[:digest_len]


def check(key: Key, signed: bytes, digest: bytes) -> bool:
    """Does ``digest`` authenticate ``signed`` under ``key``? Constant-time comparison."""
    if len(digest) not in accepted_digest_lengths(key.key_type):
        return False
    return hmac.compare_digest(full_digest(key, signed)[: len(digest)], digest)
