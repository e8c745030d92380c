"""The reference model of the packet decision: an executable spec of each stage.

Rule: pure with respect to I/O. Time comes in as arguments: ``recv_ns`` (wall
clock, for the reply and for access-list expiry) and ``now_ns`` (monotonic, for
buckets, so a clock step cannot open or shut every bucket at once). Every packet
is counted exactly once, by (NTP version, :class:`~guardntp.verdicts.Reason`).

The compiled core (``guardntp/_fastlane.c``) is the implementation: it decides
every packet, on the same tables and records, exactly as :meth:`ReferenceModel.decide`
would. This module is what ``tests/test_fastlane.py`` and ``tools/fuzz_fastlane.py``
hold it to, packet by packet, and what decides where the core cannot run (no C
compiler at install; ``guardntp/fastlane.py``). :class:`~guardntp.filter.pipeline.Pipeline`
is the control plane around it: it holds the state this model reads and writes,
compiles the policy and hands the core its copy.

Stages, in order; the first that decides ends the packet:

1. sanity      length, alignment, version, mode, tail (``responder.inspect_request``)
2. reflection  source port 0 or a well-known service port -> drop
   (then the packet's label, and its source's record: found, new, or a newcomer)
3. access      longest-prefix access list and blocklist -> drop / DENY KoD / exempt
4. auth        NTS (the cookie must open) or a MAC (it must verify); policy may
               require one
5. buckets     per source (label policy, TTL class, crowd), per prefix, then the
               global reply budget
6. over limit  random leak -> time; else RATE KoD if the source's guard time and
               the global KoD budget allow; else drop
7. respond     the stateless responder builds the reply
"""

from __future__ import annotations

import random
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..responder import Request, Responder, inspect_request
from ..verdicts import N_REASONS, Counters, LabelCounts, Reason
from ..wire import HEADER_LEN
from . import crowd, fingerprint
from .acl import AccessList, Action, Match
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
ACL_ENTRY = 10     # cached access-list match (acl.Match or None)
PORT = 11          # latest source port
# Traffic classes and the crowd estimate (``crowd.py``):
HOME_TTL = 12      # the TTL / hop limit of the source's first request; -1: unknown
OTHER_TAT = 13     # the bucket of requests from another TTL class
PORT_SKETCH = 14   # source ports seen this window, one bit each (crowd.port_bit)
WINDOW_START = 15  # monotonic ns the sketch's window began
CROWD = 16         # the last complete window's estimate
GAP_MEAN = 17      # moving average of the gap between requests, ns; 0: none yet
GAP_DEV = 18       # moving average of |gap - mean|, ns
OTHER_TTL = 19     # the TTL of the latest request charged to OTHER_TAT; -1: none
LAST_CROWD = 20    # the crowd the latest request was charged with
RECORD_LEN = 21

# The budgets every source shares (``ReferenceModel.budgets``: one two-cell record,
# which the compiled core reads and writes in place, as it does a source's):
GLOBAL_TAT = 0     # the global reply budget's TAT, monotonic ns
KOD_TAT = 1        # the global KoD budget's TAT, monotonic ns
BUDGETS_LEN = 2

#: A monotonic time before anything: a record's "no KoD yet", "no other class".
NEVER = -(1 << 62)
#: The monotonic clock as the filter reads it: ``now_ns`` outside this range (73 years
#: either side of the clock's zero, which Linux sets at boot) counts as its nearer end.
#: Within it every sum and difference of the times the filter keeps (TATs at most two
#: refills ahead, NEVER behind) fits in 64 bits, so the compiled core, which keeps
#: them as int64, decides exactly as this module does for any clock reading.
EARLIEST_NS = -(1 << 61)
LATEST_NS = 1 << 61

KOD_RATE = b"RATE"
KOD_DENY = b"DENY"
#: RFC 8915 §5.7: the NTS NAK.
KOD_NTS_NAK = b"NTSN"

#: A record is indexed like a list. Where the compiled module is built it is a
#: ``_fastlane.Record``: the same 21 items in one compact object whose integers are
#: kept unboxed, which the compiled core updates in place (``guardntp/_fastlane.c``).
SourceRecord = MutableSequence[Any]
try:
    from .._fastlane import Record as _Record
except ImportError:  # no C compiler at install: plain lists
    _Record = None  # type: ignore[assignment, misc]

# Hot-path aliases: a module global is one cached load, an enum class attribute is not.
_ANSWERED = Reason.ANSWERED
_REFLECTION_PORT = Reason.REFLECTION_PORT
_GLOBAL_CAP = Reason.GLOBAL_CAP


class Authenticator(Protocol):
    """What the auth stage needs (``guardntp/auth``): verify a MAC'd request."""

    def verify(self, data: bytes, request: Request) -> Signer | None:
        """A signer for the reply if the MAC verifies, else None (dropped, counted)."""

    def required_for(self, packed: bytes) -> bool:
        """Does policy require authentication from this source?

        Optionally an authenticator also has ``requires_any() -> bool``: False there
        lets the compiled core (``fastlane``) answer plain requests without asking."""


class NtsStage(Protocol):
    """What the auth stage needs of NTS (``guardntp/nts``).

    ``claims(data)``: does the request carry an NTS Unique Identifier (cheap)?
    ``decide(data)``, for a request it claims: ``("reply", finish)``,
    ``("nak", finish)`` or ``("drop", None)``, where ``finish(header)`` completes
    a 48-byte reply header with the NTS fields.
    """

    def claims(self, request: bytes) -> bool: ...

    def decide(self, request: bytes) -> tuple[str, Signer | None]: ...


def new_record(now_ns: int, label: str, port: int, ttl: int = -1) -> SourceRecord:
    # TAT = now: a newcomer starts with a full bucket (and the other class's, NEVER,
    # is full too).
    items = [now_ns, 0, 0, 0, 0, now_ns, now_ns, NEVER, label, -1, None, port,
             ttl, NEVER, 0, now_ns, 1, 0, 0, -1, 1]
    return items if _Record is None else _Record(items)


def new_budgets() -> SourceRecord:
    """The shared budgets, both full (a two-cell Record where compiled)."""
    items = [0] * BUDGETS_LEN
    return items if _Record is None else _Record(items)


def new_prefix_record(now_ns: int) -> SourceRecord:
    """A prefix's record: its TAT alone (a one-cell Record where compiled)."""
    return [now_ns] if _Record is None else _Record((now_ns,))


def is_contested(record: SourceRecord, now_ns: int, charged_cell: int | None = None) -> bool:
    """Both of the source's TTL classes active (charged within ``crowd.CLASS_MEMORY_NS``;
    ``charged_cell``: the bucket the request at hand is charged to counts as active), from
    the same kind of sender at two distances: perhaps a spoofer in its owner's name."""
    since = now_ns - crowd.CLASS_MEMORY_NS
    return (crowd.same_initial_ttl(record[HOME_TTL], record[OTHER_TTL])
            and (charged_cell == OTHER_TAT or record[OTHER_TAT] > since)
            and (charged_cell == TAT or record[TAT] > since))


def prefix_key(packed: bytes, v4_prefix_bits: int, v6_prefix_bits: int) -> bytes:
    """The prefix bucket's key: IPv4 /24 -> 3 bytes; IPv6 /56 -> b"6" + 7 bytes (the
    tag keeps families apart); a prefix that is not whole bytes, masked bit by bit."""
    v4 = len(packed) == 4
    bits = v4_prefix_bits if v4 else v6_prefix_bits
    if bits % 8 == 0:
        return packed[: bits // 8] if v4 else b"6" + packed[: bits // 8]
    width = len(packed) * 8
    masked = (int.from_bytes(packed, "big") >> (width - bits)).to_bytes(len(packed), "big")
    return masked if v4 else b"6" + masked


@dataclass(frozen=True)
class CompiledPolicy:
    """What the stages read of a :class:`FilterPolicy`, all of it checked: built by
    ``pipeline.compile_policy`` before a reload touches the running pipeline, and
    swapped in whole."""

    policy: FilterPolicy
    source_limit: Limit
    prefix_limit: Limit
    label_limits: dict[str, Limit]
    label_kod: dict[str, bool]
    global_limit: Limit | None
    kod_limit: Limit
    kod_interval_ns: int
    leak_share: float
    random: random.Random
    reflection_ports: frozenset[int]
    v6_source_bytes: int
    v4_prefix_bits: int
    v6_prefix_bits: int
    #: A 48-byte request's sanity verdict and packet label depend on its first byte
    #: alone, except NTPv1 (mode 0 and the Netgear label look at the source port):
    #: those entries are None and take the full path. Shared Requests are immutable.
    sanity_48: list[Request | Reason | None]
    label_of_first: list[str | None]
    #: Crowd estimate per number of port-sketch bits set; max_crowd 1: no estimate.
    max_crowd: int
    crowd_of_bits: tuple[int, ...]
    ttl_classes: bool


class ReferenceModel:
    """:meth:`decide` and its stages, over the state a
    :class:`~guardntp.filter.pipeline.Pipeline` holds (declared below; the pipeline
    sets it from the compiled policy, ``pipeline.compile_policy``)."""

    # -- the state the stages read and write
    responder: Responder
    counters: Counters
    label_counts: LabelCounts
    sources: BucketTable
    prefixes: BucketTable
    newcomers: NewcomerTable
    acl: AccessList
    table_full: int
    _authenticator: Authenticator | None
    _nts: NtsStage | None
    #: The global reply and KoD budgets' TATs (GLOBAL_TAT, KOD_TAT).
    budgets: SourceRecord
    _prefix_overflow: SourceRecord
    #: The policy as the stages read it (swapped in whole by ``apply_policy``).
    compiled: CompiledPolicy

    @property
    def policy(self) -> FilterPolicy:
        """The settings in force."""
        return self.compiled.policy

    def decide(self, data: bytes, packed: bytes, port: int, recv_ns: int, now_ns: int,
               ttl: int = -1) -> Decision:
        """The fate of one datagram from ``packed``:``port`` (packed address bytes).

        ``ttl``: the IP TTL (IPv4) or hop limit (IPv6) it arrived with, -1 if unknown.
        ``now_ns`` is read within [EARLIEST_NS, LATEST_NS]."""
        if not EARLIEST_NS <= now_ns <= LATEST_NS:
            now_ns = EARLIEST_NS if now_ns < EARLIEST_NS else LATEST_NS
        first = data[0] if data else 0
        counts = self.counters.counts
        base = ((first >> 3) & 7) * N_REASONS
        # 1. sanity
        sane = self._sanity(data, first, port)
        if isinstance(sane, Reason):
            counts[base + sane] += 1
            return sane, None, None
        request = sane
        # 2. reflection
        if port in self.compiled.reflection_ports:
            counts[base + _REFLECTION_PORT] += 1
            return _REFLECTION_PORT, None, None
        label = self._label(data, first, port)
        self.label_counts[label] += 1
        key = packed if len(packed) == 4 else packed[: self.compiled.v6_source_bytes]
        record, newcomer = self._source(key, label, port, ttl, now_ns)
        gap_ns = now_ns - record[LAST_SEEN]
        record[LAST_SEEN] = now_ns
        record[LABEL] = label
        record[PORT] = port
        # 3. access list
        entry = self._access(record, packed, recv_ns)
        exempt = False
        if entry is not None:
            action = entry.action
            if action is Action.EXEMPT:
                exempt = True
            elif action is not Action.ALLOW:
                return self._listed(data, request, record, base, entry,
                                    key if newcomer else None, now_ns)
        # 4. authentication
        refused, request, signer = self._authenticate(data, request, record, base, label,
                                                      packed)
        if refused is not None:
            return refused
        if not exempt:
            # 5. buckets
            within, contested = self._charge(record, packed, label, port, ttl, gap_ns,
                                             now_ns, key if newcomer else None)
            if not within:
                # 6. over the limit
                return self._over_limit(data, request, record, base, label, recv_ns, now_ns,
                                        signer, key if newcomer else None, contested)
        if not self._global_allows(now_ns):
            counts[base + _GLOBAL_CAP] += 1
            record[DROPS] += 1
            return _GLOBAL_CAP, None, None
        # 7. respond
        counts[base] += 1  # Reason.ANSWERED == 0
        record[TIME_REPLIES] += 1
        return _ANSWERED, self.responder.time_reply_at(data, request, recv_ns), signer

    # ------------------------------------------------------------------ the stages

    def _sanity(self, data: bytes, first: int, port: int) -> Request | Reason:
        """1. The request as read, or the Reason it is dropped for. A 48-byte request's
        verdict depends on its first byte alone (NTPv1 mode 0 also on the port)."""
        if len(data) == HEADER_LEN:
            sane = self.compiled.sanity_48[first]
            if sane is not None:
                return sane
        return inspect_request(data, port, self.policy.answer_symmetric)

    def _label(self, data: bytes, first: int, port: int) -> str:
        """The packet's label (``fingerprint.py``): by first byte (NTPv1: by port), or
        NTS where the NTS stage claims the request."""
        nts = self._nts
        if nts is not None and len(data) > HEADER_LEN and nts.claims(data):
            return fingerprint.NTS
        return self.compiled.label_of_first[first] or fingerprint.packet_label(first, port)

    def _source(self, key: bytes, label: str, port: int, ttl: int, now_ns: int
                ) -> tuple[SourceRecord, bool]:
        """The source's record, counting this request: the table's; a new one, inserted
        while the table has room; once it is full a first request's, remembered only in
        the newcomer ring (by its TAT), and at the source's second request promoted into
        the table if it admits it. Returns (record, still a newcomer)."""
        sources = self.sources
        record = sources.records.get(key)
        newcomer = False
        if record is None:
            record = new_record(now_ns, label, port, ttl)
            remembered_tat = self.newcomers.get(key)
            if remembered_tat is None:
                if len(sources.records) < sources.max_entries:
                    sources.insert(key, record)
                else:
                    newcomer = True
            else:
                record[TAT] = remembered_tat
                record[REQUESTS] = 1
                if sources.admit(key, record, now_ns):
                    self.newcomers.forget(key)
                else:
                    newcomer = True   # no room among established sources: stays a newcomer
                    self.table_full += 1
        record[REQUESTS] += 1
        return record, newcomer

    def _access(self, record: SourceRecord, packed: bytes, recv_ns: int) -> Match | None:
        """3. The source's access-list entry: the record's cached one while the list and
        the entry stand (IPv4), else looked up (always for IPv6, whose source key may
        hold addresses with different entries) and cached."""
        acl = self.acl
        entry: Match | None = record[ACL_ENTRY]
        if (record[ACL_GENERATION] != acl.generation
                or (entry is not None and not entry.active(recv_ns))
                or len(packed) != 4):
            entry = acl.lookup(packed, recv_ns)
            record[ACL_GENERATION] = acl.generation
            record[ACL_ENTRY] = entry
        return entry

    def _listed(self, data: bytes, request: Request, record: SourceRecord, base: int,
                entry: Match, newcomer_key: bytes | None, now_ns: int) -> Decision:
        """3. A DROP or DENY entry: a DENY KoD where the source's guard and the KoD
        budget allow (a newcomer must find room among established sources first, to keep
        its guard time), else dropped, as ACL_DENY (the configuration's) or BLOCKLISTED."""
        reason = Reason.ACL_DENY if entry.origin == "config" else Reason.BLOCKLISTED
        if (entry.action is Action.DENY
                and (newcomer_key is None or self._establish(newcomer_key, record, now_ns))
                and self._kod_allowed(record, now_ns)):
            return self._kod(data, request, record, base, KOD_DENY, Reason.DENY_KOD, None)
        self.counters.counts[base + reason] += 1
        record[DROPS] += 1
        return reason, None, None

    def _authenticate(self, data: bytes, request: Request, record: SourceRecord, base: int,
                      label: str, packed: bytes
                      ) -> tuple[Decision | None, Request, Signer | None]:
        """4. NTS (RFC 8915) for a request the NTS stage claims, without a MAC: the cookie
        must open (else dropped, or an NTS NAK); else a MAC must verify; a source that
        must authenticate and did not is refused. Returns (the decision if refused, the
        request as authenticated, the signer that completes the reply)."""
        counts = self.counters.counts
        nts = self._nts
        if label == fingerprint.NTS and nts is not None and request.mac_key_id is None:
            kind, finish = nts.decide(data)
            if finish is None:   # malformed, or an authenticator that fails: no reply
                counts[base + Reason.NTS_REJECTED] += 1
                record[DROPS] += 1
                return (Reason.NTS_REJECTED, None, None), request, None
            if kind == "nak":    # a cookie that does not open: back to NTS-KE
                counts[base + Reason.NTS_NAK] += 1
                record[KODS] += 1
                return (Reason.NTS_NAK, self.responder.kod_reply(data, request, KOD_NTS_NAK, 0),
                        finish), request, None
            return None, request, finish
        authenticator = self._authenticator
        request, signer, refused = self._verify_mac(data, request)
        if refused is None and signer is None and authenticator is not None \
                and authenticator.required_for(packed):
            refused = Reason.AUTH_REQUIRED
        if refused is not None:
            counts[base + refused] += 1
            record[DROPS] += 1
            return (refused, None, None), request, None
        return None, request, signer

    def _verify_mac(self, data: bytes, request: Request
                    ) -> tuple[Request, Signer | None, Reason | None]:
        """The MAC check of the auth stage: (the request as read, a signer for the reply
        if its MAC verifies, the reason to refuse it if it fails). A tail of fields
        that may be one long MAC is tried as the MAC first; if that fails, the request
        is plain. No MAC at all: (request, None, None). Pure: only the authenticator
        is asked."""
        authenticator = self._authenticator
        if request.whole_tail_mac is not None and authenticator is not None:
            signer = authenticator.verify(data, request.whole_tail_mac)
            if signer is not None:
                return request.whole_tail_mac, signer, None
        if request.mac_key_id is None:
            return request, None, None
        signer = authenticator.verify(data, request) if authenticator else None
        return request, signer, Reason.AUTH_FAILED if signer is None else None

    def verify_mac(self, data: bytes, port: int) -> tuple[int | None, Signer | None]:
        """What the compiled core asks of a sane request with a MAC (it verifies no MAC
        itself): (the reason to refuse it, or None; a signer for the reply, or None)."""
        request = inspect_request(data, port, self.policy.answer_symmetric)
        if isinstance(request, Reason):   # the core asks only about sane requests
            return int(request), None
        _, signer, refused = self._verify_mac(data, request)
        return (None if refused is None else int(refused)), signer

    def _charge(self, record: SourceRecord, packed: bytes, label: str, port: int, ttl: int,
                gap_ns: int, now_ns: int, newcomer_key: bytes | None) -> tuple[bool, bool]:
        """5. The source's bucket (its label's limit, its TTL class's bucket, divided by
        its crowd) and its prefix's: both charged if both conform (a newcomer's TAT
        remembered in the ring), else neither. Returns (within both, the address is
        contested: :meth:`_observe`)."""
        compiled = self.compiled
        limit = compiled.label_limits.get(label, compiled.source_limit)
        tat_cell, crowd_size, contested = self._observe(record, port, ttl, gap_ns, now_ns)
        tat = record[tat_cell]
        if tat < now_ns:
            tat = now_ns
        key = prefix_key(packed, compiled.v4_prefix_bits, compiled.v6_prefix_bits)
        prefixes = self.prefixes
        prefix_record = prefixes.records.get(key)
        if prefix_record is None:
            prefix_record = new_prefix_record(now_ns)
            if not prefixes.admit(key, prefix_record, now_ns):
                prefix_record = self._prefix_overflow
        prefix_tat = prefix_record[TAT]
        if prefix_tat < now_ns:
            prefix_tat = now_ns
        prefix_limit = compiled.prefix_limit
        if tat - now_ns > limit.tolerance_ns or prefix_tat - now_ns > prefix_limit.tolerance_ns:
            return False, contested
        record[tat_cell] = tat + limit.interval_ns // crowd_size
        prefix_record[TAT] = prefix_tat + prefix_limit.interval_ns
        if newcomer_key is not None:
            self.newcomers.remember(newcomer_key, record[TAT])
        return True, contested

    def _observe(self, record: SourceRecord, port: int, ttl: int, gap_ns: int, now_ns: int
                 ) -> tuple[int, int, bool]:
        """Account one request to its source's traffic (``crowd.py``). Returns the cell
        of the bucket it is charged to (its TTL class's), the crowd that bucket's
        interval is divided by, and whether the address is *contested*: both classes
        active, from the same kind of sender at different distances (a spoofer?)."""
        tat_cell = TAT
        if self.compiled.ttl_classes and ttl >= 0:
            home = record[HOME_TTL]
            if home < 0:
                record[HOME_TTL] = ttl
            elif ttl - home > crowd.TTL_SLACK or home - ttl > crowd.TTL_SLACK:
                tat_cell = OTHER_TAT
                record[OTHER_TTL] = ttl
        contested = is_contested(record, now_ns, tat_cell)
        if self.compiled.max_crowd == 1:
            return tat_cell, 1, contested
        started = record[WINDOW_START]
        if now_ns - started >= crowd.CROWD_WINDOW_NS:
            # The window that just ended is kept only if it ended within a window.
            record[CROWD] = (self.compiled.crowd_of_bits[record[PORT_SKETCH].bit_count()]
                             if now_ns - started < 2 * crowd.CROWD_WINDOW_NS else 1)
            record[PORT_SKETCH] = 0
            record[WINDOW_START] = now_ns
        sketch = record[PORT_SKETCH] | crowd.port_bit(port)
        record[PORT_SKETCH] = sketch
        if gap_ns > 0:
            mean = record[GAP_MEAN]
            if mean == 0:   # a first gap: irregular until the gaps show otherwise
                record[GAP_MEAN] = gap_ns
                record[GAP_DEV] = gap_ns >> 1
            else:
                deviation = gap_ns - mean if gap_ns >= mean else mean - gap_ns
                dev = record[GAP_DEV]
                record[GAP_MEAN] = mean + ((gap_ns - mean) >> crowd.EWMA_SHIFT)
                record[GAP_DEV] = dev + ((deviation - dev) >> crowd.EWMA_SHIFT)
        size = 1
        if not contested and crowd.is_irregular(record[GAP_MEAN], record[GAP_DEV]):
            so_far = crowd.extrapolated(self.compiled.crowd_of_bits[sketch.bit_count()],
                                        now_ns - record[WINDOW_START])
            size = min(self.compiled.max_crowd, max(record[CROWD], so_far))
        last = record[LAST_CROWD]
        if size > last:
            # A bigger crowd keeps the requests it has used (its burst grows with it):
            # what it used at one client's price is repriced at the crowd's.
            tat = record[tat_cell]
            if tat > now_ns:
                record[tat_cell] = now_ns + (tat - now_ns) * last // size
        record[LAST_CROWD] = size
        return tat_cell, size, contested

    def _over_limit(self, data: bytes, request: Request, record: SourceRecord, base: int,
                    label: str, recv_ns: int, now_ns: int, signer: Signer | None,
                    newcomer_key: bytes | None, contested: bool) -> Decision:
        """6. Over a bucket: the random leak's time reply (within the global budget);
        else a RATE KoD where KoDs are on for the label, the address is not contested,
        and the source's guard and the KoD budget allow; else dropped."""
        counts = self.counters.counts
        if self.compiled.leak_share and self.compiled.random.random() < self.compiled.leak_share \
                and self._global_allows(now_ns):
            counts[base + Reason.LEAKED] += 1
            record[TIME_REPLIES] += 1
            responder = self.responder
            return (Reason.LEAKED,
                    responder.time_reply(data, request, responder.served_ntp(recv_ns)), signer)
        # A contested address: the limited class may be a spoofer, and a KoD would
        # reach (and slow down) the address's real owner.
        if (self.policy.send_kod and self.compiled.label_kod.get(label, True) and not contested
                and (newcomer_key is None or self._establish(newcomer_key, record, now_ns))
                and self._kod_allowed(record, now_ns)):
            return self._kod(data, request, record, base, KOD_RATE, Reason.RATE_KOD, signer)
        counts[base + Reason.RATE_LIMITED] += 1
        record[DROPS] += 1
        return Reason.RATE_LIMITED, None, None

    # ------------------------------------------------------------------ the budgets

    def _global_allows(self, now_ns: int) -> bool:
        """The global reply budget (none: every reply allowed), charged if it allows."""
        limit = self.compiled.global_limit
        if limit is None:
            return True
        budgets = self.budgets
        tat = budgets[GLOBAL_TAT] if budgets[GLOBAL_TAT] > now_ns else now_ns
        if tat - now_ns > limit.tolerance_ns:
            return False
        budgets[GLOBAL_TAT] = tat + limit.interval_ns
        return True

    def _kod_allowed(self, record: SourceRecord, now_ns: int) -> bool:
        """At most one KoD per source per guard interval, within the KoD budget and the
        global reply budget (all charged if they allow)."""
        if now_ns - record[LAST_KOD] < self.compiled.kod_interval_ns:
            return False
        limit = self.compiled.kod_limit
        budgets = self.budgets
        tat = budgets[KOD_TAT] if budgets[KOD_TAT] > now_ns else now_ns
        if tat - now_ns > limit.tolerance_ns or not self._global_allows(now_ns):
            return False
        budgets[KOD_TAT] = tat + limit.interval_ns
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
        self.newcomers.forget(key)
        return True
