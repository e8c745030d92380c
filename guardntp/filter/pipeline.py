"""One call decides a packet's fate: ``Pipeline.decide`` -> (reason, reply, signer).

Rule: pure with respect to I/O. Time comes in as arguments: ``recv_ns`` (wall
clock, for the reply and for access-list expiry) and ``now_ns`` (monotonic, for
buckets, so a clock step cannot open or shut every bucket at once). Every packet
is counted exactly once, by (NTP version, :class:`~guardntp.verdicts.Reason`).

Stages, in order; the first that decides ends the packet:

1. sanity      length, alignment, version, mode, tail (``responder.inspect_request``)
2. reflection  source port 0 or a well-known service port -> drop
3. access      longest-prefix access list and blocklist -> drop / DENY KoD / exempt
4. auth        a MAC must verify (``authenticator``); policy may require one
5. buckets     per source (label policy), per prefix, then the global reply budget
6. over limit  random leak -> time; else RATE KoD if the source's guard time and
               the global KoD budget allow; else drop
7. respond     the stateless responder builds the reply
"""

from __future__ import annotations

import random
from collections.abc import Callable, MutableSequence
from typing import Any, Protocol

from ..responder import NTP_PORT, Request, Responder, inspect_request
from ..timestamps import NS_PER_S
from ..verdicts import N_REASONS, Counters, Reason
from ..wire import HEADER_LEN
from . import fingerprint
from .acl import AccessList, AclEntry, Action
from .buckets import BucketTable, Limit, NewcomerTable
from .policy import FilterPolicy

Signer = Callable[[bytes], bytes]
Decision = tuple[Reason, bytes | None, Signer | None]

# Per-source record layout (a list: one dict probe finds the bucket and the counters).
TAT = 0            # GCRA theoretical arrival time, monotonic ns
REQUESTS = 1
TIME_REPLIES = 2
KODS = 3
DROPS = 4
FIRST_SEEN = 5     # monotonic ns
LAST_SEEN = 6      # monotonic ns
LAST_KOD = 7       # monotonic ns of the last KoD sent, for the per-source guard
LABEL = 8          # packet label of the latest request
ACL_GENERATION = 9 # access-list generation the cached entry below belongs to
ACL_ENTRY = 10     # cached access-list match (AclEntry or None)
PORT = 11          # latest source port
RECORD_LEN = 12

_NEVER = -(1 << 62)

#: A record is indexed like a list. Where the compiled module is built it is a
#: ``_fastlane.Record``: the same 12 items in one compact object whose integers are
#: kept unboxed, which the compiled loop updates in place (``guardntp/_fastlane.c``).
SourceRecord = MutableSequence[Any]
try:
    from .._fastlane import Record as _Record
except ImportError:  # no C compiler at install: plain lists
    _Record = None  # type: ignore[assignment, misc]

# Hot-path aliases: a module global is one cached load, an enum class attribute is not.
_ANSWERED = Reason.ANSWERED
_REFLECTION_PORT = Reason.REFLECTION_PORT
_GLOBAL_CAP = Reason.GLOBAL_CAP

KOD_RATE = b"RATE"
KOD_DENY = b"DENY"


class Authenticator(Protocol):
    """What the auth stage needs (``guardntp/auth``): verify a MAC'd request."""

    def verify(self, data: bytes, request: Request) -> Signer | None:
        """A signer for the reply if the MAC verifies, else None (dropped, counted)."""

    def required_for(self, packed: bytes) -> bool:
        """Does policy require authentication from this source?

        Optionally an authenticator also has ``requires_any() -> bool``: False there
        lets the compiled loop (``fastlane``) answer plain requests without asking."""


def new_record(now_ns: int, label: str, port: int) -> SourceRecord:
    # TAT = now: a newcomer starts with a full bucket.
    items = [now_ns, 0, 0, 0, 0, now_ns, now_ns, _NEVER, label, -1, None, port]
    return items if _Record is None else _Record(items)


def new_prefix_record(now_ns: int) -> SourceRecord:
    """A prefix's record: its TAT alone (a one-cell Record where compiled)."""
    return [now_ns] if _Record is None else _Record((now_ns,))


class Pipeline:
    def __init__(self, policy: FilterPolicy, responder: Responder,
                 authenticator: Authenticator | None = None) -> None:
        self.responder = responder
        #: Bumped whenever something the compiled loop copies (``fast_lane_config``)
        #: changes: settings, the authenticator.
        self.config_version = 0
        self._authenticator = authenticator
        self.counters = Counters()
        self.label_counts: dict[str, int] = dict.fromkeys(fingerprint.PACKET_LABELS, 0)
        self.table_full = 0   # second requests that found no room among established sources
        self.sources = BucketTable(policy.max_sources)
        self.prefixes = BucketTable(policy.max_prefixes)
        self.newcomers = NewcomerTable(policy.max_newcomers)
        self.acl = AccessList(list(policy.acl))
        self._config_acl: list[AclEntry] = list(policy.acl)
        self._blocklist: list[AclEntry] = []
        self._global_tat = 0
        self._kod_tat = 0
        self.apply_policy(policy)

    # ------------------------------------------------------------------ configuration

    @property
    def authenticator(self) -> Authenticator | None:
        return self._authenticator

    @authenticator.setter
    def authenticator(self, authenticator: Authenticator | None) -> None:
        self._authenticator = authenticator
        self.config_version += 1

    def apply_policy(self, policy: FilterPolicy) -> None:
        """Take new settings (reload) keeping every bucket and counter."""
        self.config_version += 1
        self.policy = policy
        self.source_limit = Limit.per_second(policy.source_rate, policy.source_burst)
        self.prefix_limit = Limit.per_second(policy.prefix_rate, policy.prefix_burst)
        self.label_limits = {
            label: Limit.per_second(p.rate, p.burst) for label, p in policy.label_policies.items()}
        self.label_kod = {label: p.send_kod for label, p in policy.label_policies.items()}
        self.global_limit = (Limit.per_second(policy.global_reply_rate, policy.global_reply_burst)
                             if policy.global_reply_rate > 0 else None)
        self.kod_limit = Limit.per_second(policy.kod_rate, policy.kod_burst)
        self.kod_interval_ns = round(policy.kod_interval_s * NS_PER_S)  # 1.001 s, not 1000999999
        self.leak_share = 1.0 / policy.leak_one_in if policy.leak_one_in > 0 else 0.0
        self.random = random.Random(policy.random_seed)
        self.reflection_ports = policy.reflection_ports
        self.v6_source_bytes = policy.ipv6_source_prefix // 8
        self.v4_prefix_bits = policy.ipv4_prefix
        self.v6_prefix_bits = policy.ipv6_prefix
        self.sources.max_entries = policy.max_sources
        self.prefixes.max_entries = policy.max_prefixes
        if list(policy.acl) != self._config_acl:
            self._config_acl = list(policy.acl)
            self._rebuild_acl()
        self.newcomers.resize(policy.max_newcomers)
        self._prefix_overflow = [0]
        # A 48-byte request's sanity verdict and packet label depend on its first byte
        # alone, except NTPv1 (mode 0 and the Netgear label look at the source port):
        # those entries are None and take the full path. Shared Requests are immutable.
        padding = bytes(HEADER_LEN - 1)
        self._sanity_48: list[Request | Reason | None] = [
            None if (first >> 3) & 7 == 1 and first & 7 == 0
            else inspect_request(bytes((first,)) + padding, 0, policy.answer_symmetric)
            for first in range(256)]
        self._label_of_first: list[str | None] = [
            None if (first >> 3) & 7 == 1 else fingerprint.packet_label(first, 0)
            for first in range(256)]
        # IPv4 prefix keys on a byte boundary are a slice (the default /24).
        self._v4_prefix_bytes = self.v4_prefix_bits // 8 if self.v4_prefix_bits % 8 == 0 else 0

    def fast_lane_config(self) -> dict[str, Any]:
        """What the compiled packet loop (``guardntp/fastlane.py``) needs to decide the
        common cases exactly as :meth:`decide` does: the objects it reads and updates in
        place, and per first byte of a 48-byte request the sanity verdict, label, reply
        mode and bucket limit. Valid until ``config_version`` changes.

        NTPv1 is the exception where the source port matters: mode 0 from port 123
        is dropped (``drop_reason_ntp_port``), and the label (so the limit and the
        KoD choice) is the Netgear one from port 23457, else SNTPv1. Labels, limits
        and KoD choices are therefore given per *label slot*: 256 first bytes, then
        NTPv1 from the Netgear port, then NTPv1 from any other port."""
        padding = bytes(HEADER_LEN - 1)
        answer_symmetric = self.policy.answer_symmetric
        drop_reason = bytearray(b"\xff" * 256)
        drop_reason_ntp_port = bytearray(b"\xff" * 256)
        eligible = bytearray(256)
        reply_mode = bytearray(256)
        for first in range(256):
            packet = bytes((first,)) + padding
            sane = self._sanity_48[first]
            if sane is None:   # NTPv1 mode 0: decided by the port; this is any port but 123
                sane = inspect_request(packet, 0, answer_symmetric)
            at_ntp_port = inspect_request(packet, NTP_PORT, answer_symmetric)
            if isinstance(at_ntp_port, Reason):
                drop_reason_ntp_port[first] = at_ntp_port
            if isinstance(sane, Reason):
                drop_reason[first] = sane
            elif sane.mac_key_id is None and sane.whole_tail_mac is None:
                eligible[first] = 1
                reply_mode[first] = sane.reply_mode
        labels = (*self._label_of_first, fingerprint.NETGEAR, fingerprint.SNTPV1)
        limits = [self.label_limits.get(label, self.source_limit) if label
                  else self.source_limit for label in labels]
        kod_of_first = bytearray(
            1 if label is not None and self.label_kod.get(label, True) else 0
            for label in labels)
        reflection = bytearray(8192)
        for port in self.reflection_ports:
            if 0 <= port < 65536:
                reflection[port >> 3] |= 1 << (port & 7)
        authenticator = self._authenticator
        requires_any = getattr(authenticator, "requires_any", None)
        enabled = authenticator is None or (requires_any is not None and not requires_any())
        global_limit = self.global_limit
        return {
            "pipeline": self, "decide": self.decide, "index": self.sources.index,
            "prefix_index": self.prefixes.index, "counts": self.counters.counts,
            "label_counts": self.label_counts, "acl": self.acl, "responder": self.responder,
            "labels": labels, "netgear_port": fingerprint.NETGEAR_PORT,
            "drop_reason": bytes(drop_reason),
            "drop_reason_ntp_port": bytes(drop_reason_ntp_port), "eligible": bytes(eligible),
            "reply_mode": bytes(reply_mode), "reflection": bytes(reflection),
            "interval": tuple(limit.interval_ns for limit in limits),
            "tolerance": tuple(limit.tolerance_ns for limit in limits),
            "layout": (TAT, REQUESTS, TIME_REPLIES, DROPS, LAST_SEEN, LABEL, ACL_GENERATION,
                       ACL_ENTRY, PORT, KODS, LAST_KOD),
            "record_len": RECORD_LEN,
            "global": ((1, global_limit.interval_ns, global_limit.tolerance_ns)
                       if global_limit is not None else (0, 0, 0)),
            "prefix_interval": self.prefix_limit.interval_ns,
            "prefix_tolerance": self.prefix_limit.tolerance_ns,
            "v4_prefix_bits": self.v4_prefix_bits,
            "v6_source_bytes": self.v6_source_bytes, "v6_prefix_bits": self.v6_prefix_bits,
            "n_reasons": N_REASONS, "reason_reflection": int(Reason.REFLECTION_PORT),
            "reason_global_cap": int(Reason.GLOBAL_CAP),
            "last_time_reason": int(Reason.LEAKED), "reason_leaked": int(Reason.LEAKED),
            "reason_rate_kod": int(Reason.RATE_KOD),
            "reason_rate_limited": int(Reason.RATE_LIMITED),
            # A cached access-list entry whose action is a silent drop is decided in C.
            "action_drop": Action.DROP, "reason_acl_deny": int(Reason.ACL_DENY),
            "reason_blocklisted": int(Reason.BLOCKLISTED),
            # Over the limit (_over_limit): the leak draws from this pipeline's own stream.
            "random": self.random.random, "leak_share": self.leak_share,
            "send_kod": int(self.policy.send_kod), "kod_of_first": bytes(kod_of_first),
            "kod": (self.kod_interval_ns, self.kod_limit.interval_ns,
                    self.kod_limit.tolerance_ns, self.policy.kod_min_poll),
            "enabled": int(enabled),
        }

    def set_blocklist(self, entries: list[AclEntry]) -> None:
        """Replace the blocklist entries (from ``guardntp/blocklist``); takes effect at once."""
        self._blocklist = list(entries)
        self._rebuild_acl()

    def _rebuild_acl(self) -> None:
        # Blocklist entries are added last, so on an identical prefix they win.
        self.acl.replace(self._config_acl + self._blocklist)

    # ------------------------------------------------------------------ the decision

    def decide(self, data: bytes, packed: bytes, port: int, recv_ns: int, now_ns: int
               ) -> Decision:
        """The fate of one datagram from ``packed``:``port`` (packed address bytes)."""
        sane: Request | Reason | None
        if len(data) == HEADER_LEN:
            first = data[0]
            sane = self._sanity_48[first]
            if sane is None:
                sane = inspect_request(data, port, self.policy.answer_symmetric)
        else:
            sane = inspect_request(data, port, self.policy.answer_symmetric)
            first = data[0] if data else 0
        counts = self.counters.counts
        base = ((first >> 3) & 7) * N_REASONS
        if isinstance(sane, Reason):
            counts[base + sane] += 1
            return sane, None, None
        request = sane
        if port in self.reflection_ports:
            counts[base + _REFLECTION_PORT] += 1
            return _REFLECTION_PORT, None, None

        label = self._label_of_first[first] or fingerprint.packet_label(first, port)
        self.label_counts[label] += 1
        v4 = len(packed) == 4
        key = packed if v4 else packed[: self.v6_source_bytes]
        sources = self.sources
        record = sources.records.get(key)
        newcomer = False
        if record is None:
            record = new_record(now_ns, label, port)
            remembered_tat = self.newcomers.tats.get(key)
            if remembered_tat is None:
                # A first request: straight in while there is room; once the table is
                # full, first sightings are remembered by TAT only, in the newcomer ring.
                if len(sources.records) < sources.max_entries:
                    sources.insert(key, record)
                else:
                    newcomer = True
            else:
                record[TAT] = remembered_tat
                record[REQUESTS] = 1
                if sources.admit(key, record, now_ns):
                    del self.newcomers.tats[key]
                else:
                    newcomer = True   # no room among established sources: stays a newcomer
                    self.table_full += 1
        record[REQUESTS] += 1
        record[LAST_SEEN] = now_ns
        record[LABEL] = label
        record[PORT] = port

        # -- access list (cached per record while the list and the entry stand)
        acl = self.acl
        entry = record[ACL_ENTRY]
        if (record[ACL_GENERATION] != acl.generation
                or (entry is not None and not entry.active(recv_ns))
                or not v4):
            entry = acl.lookup(packed, recv_ns)
            record[ACL_GENERATION] = acl.generation
            record[ACL_ENTRY] = entry
        exempt = False
        if entry is not None:
            action = entry.action
            if action is Action.EXEMPT:
                exempt = True
            elif action is not Action.ALLOW:
                reason = Reason.ACL_DENY if entry.origin == "config" else Reason.BLOCKLISTED
                if (action is Action.DENY
                        and (not newcomer or self._establish(key, record, now_ns))
                        and self._kod_allowed(record, now_ns)):
                    return self._kod(data, request, record, base, KOD_DENY, Reason.DENY_KOD, None)
                counts[base + reason] += 1
                record[DROPS] += 1
                return reason, None, None

        # -- authentication
        signer: Signer | None = None
        authenticator = self._authenticator
        if request.whole_tail_mac is not None and authenticator is not None:
            signer = authenticator.verify(data, request.whole_tail_mac)
            if signer is not None:
                request = request.whole_tail_mac
        if signer is None and request.mac_key_id is not None:
            signer = authenticator.verify(data, request) if authenticator else None
            if signer is None:
                counts[base + Reason.AUTH_FAILED] += 1
                record[DROPS] += 1
                return Reason.AUTH_FAILED, None, None
        elif authenticator is not None and authenticator.required_for(packed):
            counts[base + Reason.AUTH_REQUIRED] += 1
            record[DROPS] += 1
            return Reason.AUTH_REQUIRED, None, None

        # -- buckets
        if not exempt:
            limit = self.label_limits.get(label, self.source_limit)
            tat = record[TAT]
            if tat < now_ns:
                tat = now_ns
            prefix_key = (packed[: self._v4_prefix_bytes] if v4 and self._v4_prefix_bytes
                          else self._prefix_key(packed, v4))
            prefixes = self.prefixes
            prefix_record = prefixes.records.get(prefix_key)
            if prefix_record is None:
                prefix_record = new_prefix_record(now_ns)
                if not prefixes.admit(prefix_key, prefix_record, now_ns):
                    prefix_record = self._prefix_overflow
            prefix_tat = prefix_record[TAT]
            if prefix_tat < now_ns:
                prefix_tat = now_ns
            prefix_limit = self.prefix_limit
            if (tat - now_ns > limit.tolerance_ns
                    or prefix_tat - now_ns > prefix_limit.tolerance_ns):
                return self._over_limit(data, request, record, base, label, recv_ns, now_ns,
                                        signer, key if newcomer else None)
            record[TAT] = tat + limit.interval_ns
            prefix_record[TAT] = prefix_tat + prefix_limit.interval_ns
            if newcomer:
                self.newcomers.remember(key, record[TAT])
        global_limit = self.global_limit
        if global_limit is not None:  # _global_allows, inlined on the answer path
            global_tat = self._global_tat if self._global_tat > now_ns else now_ns
            if global_tat - now_ns > global_limit.tolerance_ns:
                counts[base + _GLOBAL_CAP] += 1
                record[DROPS] += 1
                return _GLOBAL_CAP, None, None
            self._global_tat = global_tat + global_limit.interval_ns
        counts[base] += 1  # Reason.ANSWERED == 0
        record[TIME_REPLIES] += 1
        return _ANSWERED, self.responder.time_reply_at(data, request, recv_ns), signer

    # ------------------------------------------------------------------ helpers

    def _prefix_key(self, packed: bytes, v4: bool) -> bytes:
        """IPv4 /24 -> 3 bytes; IPv6 /56 -> b"6" + 7 bytes (the tag keeps families apart)."""
        bits = self.v4_prefix_bits if v4 else self.v6_prefix_bits
        if bits % 8 == 0:
            return packed[: bits // 8] if v4 else b"6" + packed[: bits // 8]
        width = len(packed) * 8
        masked = (int.from_bytes(packed, "big") >> (width - bits)).to_bytes(len(packed), "big")
        return masked if v4 else b"6" + masked

    def _global_allows(self, now_ns: int) -> bool:
        limit = self.global_limit
        if limit is None:
            return True
        tat = self._global_tat if self._global_tat > now_ns else now_ns
        if tat - now_ns > limit.tolerance_ns:
            return False
        self._global_tat = tat + limit.interval_ns
        return True

    def _kod_allowed(self, record: SourceRecord, now_ns: int) -> bool:
        if now_ns - record[LAST_KOD] < self.kod_interval_ns:
            return False
        limit = self.kod_limit
        tat = self._kod_tat if self._kod_tat > now_ns else now_ns
        if tat - now_ns > limit.tolerance_ns or not self._global_allows(now_ns):
            return False
        self._kod_tat = tat + limit.interval_ns
        record[LAST_KOD] = now_ns
        return True

    def _kod(self, data: bytes, request: Request, record: SourceRecord, base: int, code: bytes,
             reason: Reason, signer: Signer | None) -> Decision:
        self.counters.counts[base + reason] += 1
        record[KODS] += 1
        return reason, self.responder.kod_reply(data, request, code, self.policy.kod_min_poll), \
            signer

    def _establish(self, key: bytes, record: SourceRecord, now_ns: int) -> bool:
        """Move a newcomer into the established table (a KoD's guard time must be kept)."""
        if not self.sources.admit(key, record, now_ns):
            return False
        self.newcomers.tats.pop(key, None)
        return True

    def _over_limit(self, data: bytes, request: Request, record: SourceRecord, base: int,
                    label: str, recv_ns: int, now_ns: int, signer: Signer | None,
                    newcomer_key: bytes | None = None) -> Decision:
        counts = self.counters.counts
        if self.leak_share and self.random.random() < self.leak_share \
                and self._global_allows(now_ns):
            counts[base + Reason.LEAKED] += 1
            record[TIME_REPLIES] += 1
            responder = self.responder
            return (Reason.LEAKED,
                    responder.time_reply(data, request, responder.served_ntp(recv_ns)), signer)
        if (self.policy.send_kod and self.label_kod.get(label, True)
                and (newcomer_key is None or self._establish(newcomer_key, record, now_ns))
                and self._kod_allowed(record, now_ns)):
            return self._kod(data, request, record, base, KOD_RATE, Reason.RATE_KOD, signer)
        counts[base + Reason.RATE_LIMITED] += 1
        record[DROPS] += 1
        return Reason.RATE_LIMITED, None, None
