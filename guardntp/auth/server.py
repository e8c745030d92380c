"""The pipeline's auth stage: verify a request's MAC, hand back a signer for the reply.

Rule: pure. :class:`KeyAuthenticator` holds the keys and the per-CIDR policy and
implements :class:`guardntp.filter.pipeline.Authenticator`:

* ``verify(data, request)`` -> a signer, or None for an unknown key id, a digest of
  a length the key type does not allow, or a digest that does not match (the
  pipeline counts ``Reason.AUTH_FAILED`` and sends nothing: RFC 5905 §9.2 "crypto-NAK"
  replies are not sent, as chrony and NTPsec do not send them to clients either);
* the signer appends the request's key id and a digest of the request's length to
  the finished reply (transmit timestamp already stamped), so a reply is 48 bytes +
  the request's MAC and never longer than the request;
* ``required_for(packed)``: longest-prefix match over ``require`` and ``optional``
  networks; default (no match) is to serve unauthenticated clients too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import partial

from ..filter.acl import AccessList, AclEntry, Action
from ..filter.reference import Signer
from ..responder import Request
from . import mac
from .keys import Key

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The access-list table does the longest-prefix match; its actions stand for:
_REQUIRE = Action.DROP   # an unauthenticated request from here is dropped
_OPTIONAL = Action.ALLOW  # a more specific exception inside a required range


class KeyAuthenticator:
    """Keys by id plus the "require authentication" policy."""

    __slots__ = ("keys", "require", "optional", "_policy")

    def __init__(self, keys: Mapping[int, Key], require: Iterable[Network] = (),
                 optional: Iterable[Network] = ()) -> None:
        self.keys = dict(keys)
        self.require = tuple(require)
        self.optional = tuple(optional)
        entries = ([AclEntry(net, _REQUIRE, "auth") for net in self.require]
                   + [AclEntry(net, _OPTIONAL, "auth") for net in self.optional])
        # None when nothing is required: the common case costs one attribute test.
        self._policy = AccessList(entries) if self.require else None

    def verify(self, data: bytes, request: Request) -> Signer | None:
        key_id = request.mac_key_id
        key = self.keys.get(key_id) if key_id is not None else None
        if key is None:
            return None
        offset = request.mac_offset
        digest = data[offset + mac.KEY_ID_LEN:]
        if not mac.check(key, data[:offset], digest):
            return None
        return partial(mac.sign, key, digest_len=len(digest))

    def requires_any(self) -> bool:
        return self._policy is not None

    def required_for(self, packed: bytes) -> bool:
        policy = self._policy
        if policy is None:
            return False
        entry = policy.lookup(packed, 0)
        return entry is not None and entry.action is _REQUIRE
