"""The AEAD algorithms NTS negotiates (RFC 8915 §5.1, IANA "AEAD Algorithms") (pure).

AEAD_AES_SIV_CMAC_256 (15) is mandatory and the only one chrony 4.3 and NTPsec
offer; AEAD_AES_SIV_CMAC_512 (17) is the same construction with AES-256. Both are
``cryptography``'s :class:`AESSIV` (RFC 5297), whose nonce is the last associated
data component, as RFC 8915 §5.6 wants; its output is the 16-byte SIV followed by
the ciphertext, which is what goes on the wire.
"""

from __future__ import annotations

import functools

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

AES_SIV_CMAC_256 = 15
AES_SIV_CMAC_512 = 17

#: Numeric identifier -> key length in bytes (one key per direction).
KEY_LENGTH: dict[int, int] = {AES_SIV_CMAC_256: 32, AES_SIV_CMAC_512: 64}
#: Server preference, best first, when a client offers several.
PREFERENCE: tuple[int, ...] = (AES_SIV_CMAC_256, AES_SIV_CMAC_512)
TAG_LENGTH = 16


#: The master keys' ciphers, kept (their key schedule is a third of a cookie's cost);
#: session keys are used once or twice each and are not.
master_cipher = functools.lru_cache(maxsize=64)(AESSIV)


def seal(key: bytes | AESSIV, plaintext: bytes, associated: bytes, nonce: bytes) -> bytes:
    """SIV || ciphertext of ``plaintext`` under ``key``, authenticating ``associated``."""
    cipher = key if isinstance(key, AESSIV) else AESSIV(key)
    return cipher.encrypt(plaintext, [associated, nonce])


def open_sealed(key: bytes | AESSIV, sealed: bytes, associated: bytes, nonce: bytes
                ) -> bytes | None:
    """The plaintext, or None when ``sealed`` does not authenticate under ``key``."""
    if len(sealed) < TAG_LENGTH:
        return None
    try:
        cipher = key if isinstance(key, AESSIV) else AESSIV(key)
        return cipher.decrypt(sealed, [associated, nonce])
    except (InvalidTag, ValueError):
        return None
