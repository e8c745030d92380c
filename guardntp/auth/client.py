"""Sign requests and verify replies for ``guardntp query --key-file FILE --key-id N``.

Rule: pure apart from :func:`client_key`, which reads the key file or the environment.
The callables plug into :func:`guardntp.client.exchange` (``sign``/``verify``).

A reply is accepted only if it carries a MAC with our key id and the digest length
we sent, and the digest verifies; anything else raises
:class:`~guardntp.client.BogusReply` with the reason. An unsigned reply (including
an unsigned Kiss-o'-Death) to a signed request is rejected, as chrony does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from ..client import BogusReply
from ..wire import HEADER_LEN
from . import mac
from .keys import Key, KeyFileError, load_key_file
from .settings import SECRET_ENV, hmac_key_from_env

Transform = Callable[[bytes], bytes]


def client_signing(key: Key, version: int = 4) -> tuple[Transform, Transform]:
    """(sign, verify) for requests of NTP ``version`` under ``key``."""
    digest_len = mac.digest_len_for(key.key_type, version)
    expected_len = HEADER_LEN + mac.KEY_ID_LEN + digest_len

    def sign(request: bytes) -> bytes:
        return mac.sign(key, request, digest_len)

    def verify(reply: bytes) -> bytes:
        """The reply's 48-byte header, once its MAC checks out."""
        if len(reply) == HEADER_LEN:
            raise BogusReply(f"reply is not authenticated (no MAC), expected one with "
                             f"key {key.key_id}")
        if len(reply) != expected_len:
            raise BogusReply(f"reply is {len(reply)} bytes, expected {expected_len} (48 + a "
                             f"{expected_len - HEADER_LEN}-byte MAC with key {key.key_id})")
        reply_key_id = int.from_bytes(reply[HEADER_LEN:HEADER_LEN + mac.KEY_ID_LEN], "big")
        if reply_key_id != key.key_id:
            raise BogusReply(f"reply is signed with key {reply_key_id}, expected key "
                             f"{key.key_id}")
        if not mac.check(key, reply[:HEADER_LEN], reply[HEADER_LEN + mac.KEY_ID_LEN:]):
            raise BogusReply(f"reply MAC does not verify with key {key.key_id} "
                             f"({key.key_type.value}): wrong key on one side, or a forged "
                             "or corrupted reply")
        return reply[:HEADER_LEN]

    return sign, verify


def client_key(key_file: str | None, key_id: int,
               environ: Mapping[str, str] = os.environ) -> Key:
    """Key ``key_id`` from ``key_file``; without a file, the HMAC-SHA256 key in
    ``$NTP_SECRET_KEY`` (guardntp's own scheme). Raises :class:`KeyFileError`."""
    if key_file:
        keys = load_key_file(key_file)
        if key_id not in keys:
            raise KeyFileError(f"{key_file}: no key {key_id} (the file has "
                               + ", ".join(str(k) for k in sorted(keys)) + ")")
        return keys[key_id]
    if not environ.get(SECRET_ENV, "").strip():
        raise KeyFileError(f"--key-id {key_id} needs --key-file FILE, or {SECRET_ENV} "
                           "set for a guardntp HMAC-SHA256 key")
    return hmac_key_from_env(key_id, environ)
