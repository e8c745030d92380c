"""One call decides a packet's fate: ``Pipeline.decide`` -> (reason, reply, signer).

Rule: pure with respect to I/O. Time comes in as arguments: ``recv_ns`` (wall
clock, for the reply and for access-list expiry) and ``now_ns`` (monotonic, for
buckets, so a clock step cannot open or shut every bucket at once). Every packet
is counted exactly once, by (NTP version, :class:`~guardntp.verdicts.Reason`).

Where the compiled loop is built (``guardntp/_fastlane.c``) it decides every
packet itself, on these same tables: this method is then the reference model
``tests/test_fastlane.py`` and ``tools/fuzz_fastlane.py`` hold it to, and it decides
only where the core cannot run (no compiler at install, tables in Python, or a test
that disables the core; ``guardntp/fastlane.py``).

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

import ipaddress
import random
from collections.abc import Callable, Iterable, MutableSequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..responder import Request, Responder, inspect_request
from ..timestamps import NS_PER_S
from ..verdicts import N_REASONS, Counters, Reason
from ..wire import (
    CRYPTO_NAK_LEN,
    HEADER_LEN,
    MAX_MAC_LEN,
    MAX_V4_BARE_MAC_LEN,
    MIN_EXT_FIELD_LEN,
    MIN_MAC_LEN,
)
from . import crowd, fingerprint
from .acl import AccessList, AclEntry, Action, Network
from .buckets import (
    EVICTION_SCAN,
    BadLimit,
    BucketTable,
    Limit,
    NewcomerTable,
    is_finite_number,
    is_whole_number,
)
from .lane import (
    CrowdModel,
    LaneContract,
    LaneObjects,
    LanePolicy,
    LaneSettings,
    ReasonCodes,
    RecordCells,
    TailLengths,
)
from .policy import MAX_KOD_INTERVAL_S, BadPolicy, FilterPolicy, LabelPolicy

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

_NEVER = -(1 << 62)
#: The monotonic clock as the filter reads it: ``now_ns`` outside this range (73 years
#: either side of the clock's zero, which Linux sets at boot) counts as its nearer end.
#: Within it every sum and difference of the times the filter keeps (TATs at most two
#: refills ahead, _NEVER behind) fits in 64 bits, so the compiled core, which keeps
#: them as int64, decides exactly as this module does for any clock reading.
EARLIEST_NS = -(1 << 61)
LATEST_NS = 1 << 61

#: What the compiled loop and this module agree on whatever the policy (``lane.py``).
LANE_CONTRACT = LaneContract(
    cells=RecordCells(
        tat=TAT, requests=REQUESTS, time_replies=TIME_REPLIES, kods=KODS, drops=DROPS,
        first_seen=FIRST_SEEN, last_seen=LAST_SEEN, last_kod=LAST_KOD, label=LABEL,
        acl_generation=ACL_GENERATION, acl_entry=ACL_ENTRY, port=PORT, home_ttl=HOME_TTL,
        other_tat=OTHER_TAT, port_sketch=PORT_SKETCH, window_start=WINDOW_START,
        crowd=CROWD, gap_mean=GAP_MEAN, gap_dev=GAP_DEV, other_ttl=OTHER_TTL,
        last_crowd=LAST_CROWD),
    record_len=RECORD_LEN, never=_NEVER, earliest_ns=EARLIEST_NS, latest_ns=LATEST_NS,
    eviction_scan=EVICTION_SCAN,
    reasons=ReasonCodes(
        n_reasons=N_REASONS, reflection=int(Reason.REFLECTION_PORT),
        global_cap=int(Reason.GLOBAL_CAP), last_time_reason=int(Reason.LEAKED),
        leaked=int(Reason.LEAKED), rate_kod=int(Reason.RATE_KOD),
        rate_limited=int(Reason.RATE_LIMITED), acl_deny=int(Reason.ACL_DENY),
        blocklisted=int(Reason.BLOCKLISTED), deny_kod=int(Reason.DENY_KOD),
        malformed=int(Reason.MALFORMED), auth_required=int(Reason.AUTH_REQUIRED),
        auth_failed=int(Reason.AUTH_FAILED), crypto_nak=int(Reason.CRYPTO_NAK),
        nts_nak=int(Reason.NTS_NAK), nts_rejected=int(Reason.NTS_REJECTED)),
    action_allow=Action.ALLOW, action_exempt=Action.EXEMPT, action_drop=Action.DROP,
    action_deny=Action.DENY, netgear_port=fingerprint.NETGEAR_PORT,
    crowd=CrowdModel(
        sketch_bits=crowd.PORT_SKETCH_BITS, ewma_shift=crowd.EWMA_SHIFT,
        ttl_slack=crowd.TTL_SLACK, class_memory_ns=crowd.CLASS_MEMORY_NS,
        window_ns=crowd.CROWD_WINDOW_NS, irregular_num=crowd.IRREGULAR_NUM,
        irregular_den=crowd.IRREGULAR_DEN, initial_ttls=crowd.INITIAL_TTLS),
    tail=TailLengths(
        min_ext_field=MIN_EXT_FIELD_LEN, min_mac=MIN_MAC_LEN,
        max_bare_mac=MAX_V4_BARE_MAC_LEN, max_mac=MAX_MAC_LEN, crypto_nak=CRYPTO_NAK_LEN))

#: A record is indexed like a list. Where the compiled module is built it is a
#: ``_fastlane.Record``: the same 21 items in one compact object whose integers are
#: kept unboxed, which the compiled loop updates in place (``guardntp/_fastlane.c``).
SourceRecord = MutableSequence[Any]
try:
    from .._fastlane import Lane as _Lane
    from .._fastlane import Record as _Record
except ImportError:  # no C compiler at install: plain lists, and no compiled loop to configure
    _Lane = None  # type: ignore[assignment, misc]
    _Record = None  # type: ignore[assignment, misc]

# Hot-path aliases: a module global is one cached load, an enum class attribute is not.
_ANSWERED = Reason.ANSWERED
_REFLECTION_PORT = Reason.REFLECTION_PORT
_GLOBAL_CAP = Reason.GLOBAL_CAP

KOD_RATE = b"RATE"
KOD_DENY = b"DENY"
#: RFC 8915 §5.7: the NTS NAK.
KOD_NTS_NAK = b"NTSN"


class Authenticator(Protocol):
    """What the auth stage needs (``guardntp/auth``): verify a MAC'd request."""

    def verify(self, data: bytes, request: Request) -> Signer | None:
        """A signer for the reply if the MAC verifies, else None (dropped, counted)."""

    def required_for(self, packed: bytes) -> bool:
        """Does policy require authentication from this source?

        Optionally an authenticator also has ``requires_any() -> bool``: False there
        lets the compiled loop (``fastlane``) answer plain requests without asking."""


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
    # TAT = now: a newcomer starts with a full bucket (and the other class's, _NEVER,
    # is full too).
    items = [now_ns, 0, 0, 0, 0, now_ns, now_ns, _NEVER, label, -1, None, port,
             ttl, _NEVER, 0, now_ns, 1, 0, 0, -1, 1]
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


@dataclass(frozen=True)
class CompiledPolicy:
    """What :class:`Pipeline` derives from a :class:`FilterPolicy`, all of it checked:
    built by :func:`compile_policy` before a reload touches the running pipeline."""

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
    #: IPv4 prefix keys on a byte boundary are a slice (the default /24); else 0.
    v4_prefix_bytes: int
    #: A 48-byte request's sanity verdict and packet label depend on its first byte
    #: alone, except NTPv1 (mode 0 and the Netgear label look at the source port):
    #: those entries are None and take the full path. Shared Requests are immutable.
    sanity_48: list[Request | Reason | None]
    label_of_first: list[str | None]
    #: Crowd estimate per number of port-sketch bits set; max_crowd 1: no estimate.
    max_crowd: int
    crowd_of_bits: tuple[int, ...]
    ttl_classes: bool


def _whole(key: str, value: object, low: int, high: int, why: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadPolicy(key, f"must be a whole number from {low} to {high}{why}")
    return value


def _flag(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise BadPolicy(key, "must be true or false")
    return value


def _limit(rate_key: str, rate: float, burst_key: str, burst: int) -> Limit:
    try:
        return Limit.per_second(rate, burst)
    except BadLimit as error:
        raise BadPolicy(rate_key if error.part == "rate" else burst_key, error.message) from None


def compile_policy(policy: FilterPolicy) -> CompiledPolicy:
    """Everything :meth:`Pipeline.apply_policy` needs from ``policy``, checked.

    Pure: no pipeline is touched, so a reload can build this first and fail with
    nothing half-applied. Raises :class:`BadPolicy` naming the setting for a value
    the filter cannot run (nan, inf, a rate <= 0, a bucket that would take more
    than ten years to refill, an IPv6 source prefix that is not whole bytes, ...).
    ``config.py`` calls it too, so ``check-config`` refuses what a reload would."""
    answer_symmetric = _flag("answer_symmetric", policy.answer_symmetric)
    _flag("send_kod", policy.send_kod)
    ports = policy.reflection_ports
    if not isinstance(ports, frozenset | set) or not all(
            is_whole_number(port) and 0 <= port <= 65535 for port in ports):
        raise BadPolicy("reflection_ports", "must be a set of port numbers 0-65535")
    source_limit = _limit("source_rate", policy.source_rate, "source_burst", policy.source_burst)
    prefix_limit = _limit("prefix_rate", policy.prefix_rate, "prefix_burst", policy.prefix_burst)
    label_limits: dict[str, Limit] = {}
    label_kod: dict[str, bool] = {}
    if not isinstance(policy.label_policies, dict):
        raise BadPolicy("labels", "must map packet labels to label policies")
    for label, label_policy in policy.label_policies.items():
        where = f"labels.{label}"
        if not isinstance(label_policy, LabelPolicy):
            raise BadPolicy(where, "must be a LabelPolicy (rate, burst, send_kod)")
        label_limits[label] = _limit(f"{where}.rate", label_policy.rate,
                                     f"{where}.burst", label_policy.burst)
        label_kod[label] = _flag(f"{where}.send_kod", label_policy.send_kod)
    global_rate = policy.global_reply_rate
    if not is_finite_number(global_rate) or global_rate < 0:
        raise BadPolicy("global_reply_rate", "must be a finite number >= 0 (0: no cap)")
    global_limit = (_limit("global_reply_rate", global_rate,
                           "global_reply_burst", policy.global_reply_burst)
                    if global_rate > 0 else None)
    kod_limit = _limit("kod_rate", policy.kod_rate, "kod_burst", policy.kod_burst)
    kod_interval_s = policy.kod_interval_s
    if not is_finite_number(kod_interval_s) or not 0 <= kod_interval_s <= MAX_KOD_INTERVAL_S:
        raise BadPolicy("kod_interval_s", f"must be a finite number from 0 to "
                        f"{MAX_KOD_INTERVAL_S:.0f} (seconds)")
    _whole("kod_min_poll", policy.kod_min_poll, -128, 127, " (a poll exponent)")
    leak_one_in = _whole("leak_one_in", policy.leak_one_in, 0, 1 << 62, " (0: off)")
    max_crowd = _whole("max_crowd", policy.max_crowd, 1, 1 << 16, " (1: no crowd estimate)")
    ttl_classes = _flag("ttl_classes", policy.ttl_classes)
    # Source keys are whole bytes of the address, here and in the compiled loop
    # (its index keys are byte strings), so a /60 cannot be honoured: refuse it
    # rather than key on /56 behind the operator's back.
    v6_source_bits = _whole("ipv6_source_prefix", policy.ipv6_source_prefix, 8, 128)
    if v6_source_bits % 8:
        raise BadPolicy("ipv6_source_prefix", f"must be a multiple of 8 (sources are keyed on "
                        f"whole bytes of the address): {v6_source_bits // 8 * 8} or "
                        f"{v6_source_bits // 8 * 8 + 8}?")
    # Prefix keys of any length are masked bit by bit (_prefix_key; the compiled loop
    # does the same).
    v4_prefix_bits = _whole("ipv4_prefix", policy.ipv4_prefix, 1, 32)
    v6_prefix_bits = _whole("ipv6_prefix", policy.ipv6_prefix, 1, 128)
    for key in ("max_sources", "max_prefixes", "max_newcomers"):
        _whole(key, getattr(policy, key), 1, 1 << 32)
    if policy.random_seed is not None:
        _whole("random_seed", policy.random_seed, 0, (1 << 64) - 1)
    for index, entry in enumerate(policy.acl):
        if not isinstance(entry, AclEntry) or not isinstance(entry.action, Action) or not \
                isinstance(entry.network, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise BadPolicy(f"acl[{index}]", "must be an AclEntry with a network and an action")
    padding = bytes(HEADER_LEN - 1)
    return CompiledPolicy(
        policy=policy, source_limit=source_limit, prefix_limit=prefix_limit,
        label_limits=label_limits, label_kod=label_kod, global_limit=global_limit,
        kod_limit=kod_limit,
        kod_interval_ns=round(kod_interval_s * NS_PER_S),  # 1.001 s, not 1000999999
        leak_share=1.0 / leak_one_in if leak_one_in > 0 else 0.0,
        random=random.Random(policy.random_seed),
        reflection_ports=frozenset(ports), v6_source_bytes=v6_source_bits // 8,
        v4_prefix_bits=v4_prefix_bits, v6_prefix_bits=v6_prefix_bits,
        v4_prefix_bytes=v4_prefix_bits // 8 if v4_prefix_bits % 8 == 0 else 0,
        sanity_48=[None if (first >> 3) & 7 == 1 and first & 7 == 0
                   else inspect_request(bytes((first,)) + padding, 0, answer_symmetric)
                   for first in range(256)],
        label_of_first=[None if (first >> 3) & 7 == 1 else fingerprint.packet_label(first, 0)
                        for first in range(256)],
        max_crowd=max_crowd, crowd_of_bits=crowd.crowd_table(max_crowd),
        ttl_classes=ttl_classes)


class Pipeline:
    def __init__(self, policy: FilterPolicy, responder: Responder,
                 authenticator: Authenticator | None = None) -> None:
        self.responder = responder
        #: Bumped whenever something the compiled loop copies (``lane_policy``)
        #: changes: settings, the authenticator, the NTS stage.
        self.config_version = 0
        self._authenticator = authenticator
        self._nts: NtsStage | None = None
        self.counters = Counters()
        self.label_counts: dict[str, int] = dict.fromkeys(fingerprint.PACKET_LABELS, 0)
        self.table_full = 0   # second requests that found no room among established sources
        # Sized, like everything the policy decides, by apply_policy below.
        # A source is evictable only once both its classes' buckets are full again.
        self.sources = BucketTable(1, tat_cells=(TAT, OTHER_TAT))
        self.prefixes = BucketTable(1)
        self.newcomers = NewcomerTable(1)
        #: Two layers, the configuration's [[acl]] and the blocklist's (``acl.py``).
        self.acl = AccessList()
        self._config_acl: list[AclEntry] = []
        self._global_tat = 0
        self._kod_tat = 0
        self._prefix_overflow: SourceRecord = new_prefix_record(0)
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
        """Take new settings (reload) keeping every bucket, record and counter.

        All or nothing: everything the new settings need (limits, tables, the access
        list, the compiled loop's configuration) is built and checked first, and only
        then swapped in by plain assignments that cannot fail. Raises
        :class:`BadPolicy` with the running settings untouched."""
        compiled = compile_policy(policy)
        config_acl = list(policy.acl)
        # Only the configuration layer is redone; the blocklist's stays as it is.
        acl = self.acl.plan(config=config_acl) if config_acl != self._config_acl else None
        newcomers = self.newcomers.resized(policy.max_newcomers)
        lane_settings = LaneSettings.compile(compiled)
        if _Lane is not None:
            # The compiled loop checks its policy as it copies it; try it on a scratch
            # lane (no socket is touched) so that FastLane cannot refuse it later.
            try:
                _Lane(-1, False, 1, HEADER_LEN + 1).configure(
                    LanePolicy(LANE_CONTRACT, lane_settings, self._lane_objects()))
            except (AttributeError, TypeError, ValueError, OverflowError) as error:
                raise BadPolicy("", f"the compiled packet loop refuses these settings: "
                                f"{error}") from None
        # -- the swap: from here on nothing can fail
        self.policy = policy
        self.source_limit = compiled.source_limit
        self.prefix_limit = compiled.prefix_limit
        self.label_limits = compiled.label_limits
        self.label_kod = compiled.label_kod
        self.global_limit = compiled.global_limit
        self.kod_limit = compiled.kod_limit
        self.kod_interval_ns = compiled.kod_interval_ns
        self.leak_share = compiled.leak_share
        self.random = compiled.random
        self.reflection_ports = compiled.reflection_ports
        self.v6_source_bytes = compiled.v6_source_bytes
        self.v4_prefix_bits = compiled.v4_prefix_bits
        self.v6_prefix_bits = compiled.v6_prefix_bits
        self._v4_prefix_bytes = compiled.v4_prefix_bytes
        self._sanity_48 = compiled.sanity_48
        self._label_of_first = compiled.label_of_first
        self.max_crowd = compiled.max_crowd
        self.crowd_of_bits = compiled.crowd_of_bits
        self.ttl_classes = compiled.ttl_classes
        self.sources.max_entries = policy.max_sources
        self.prefixes.max_entries = policy.max_prefixes
        self.newcomers = newcomers
        if acl is not None:
            self._config_acl = config_acl
            self.acl.apply(acl)
        self._prefix_overflow = new_prefix_record(0)
        self._lane_settings = lane_settings
        self.config_version += 1

    @property
    def nts(self) -> NtsStage | None:
        """NTS (``guardntp.nts.service.NtsService``) when the server offers it."""
        return self._nts

    @nts.setter
    def nts(self, stage: NtsStage | None) -> None:
        self._nts = stage
        self.config_version += 1   # the compiled loop asks this stage about NTS requests

    def lane_policy(self) -> LanePolicy:
        """What the compiled packet loop (``guardntp/fastlane.py``) needs to decide the
        common cases exactly as :meth:`decide` does: the objects it reads and updates in
        place, and per first byte of a 48-byte request the sanity verdict, label, reply
        mode and bucket limit (``filter/lane.py``). Valid until ``config_version``
        changes."""
        return LanePolicy(LANE_CONTRACT, self._lane_settings, self._lane_objects())

    def _lane_objects(self) -> LaneObjects:
        """The part of :meth:`lane_policy` that is this pipeline's live objects."""
        authenticator = self._authenticator
        requires_any = getattr(authenticator, "requires_any", None)
        required_for = getattr(authenticator, "required_for", None)
        # Sources that must authenticate are refused in C by asking required_for (pure)
        # about each request without a MAC; an authenticator that cannot say leaves
        # every packet to decide().
        enabled = authenticator is None or (requires_any is not None
                                            and required_for is not None)
        must = enabled and requires_any is not None and requires_any()
        nts = self._nts
        return LaneObjects(
            pipeline=self, decide=self.decide, counts=self.counters.counts,
            label_counts=self.label_counts, acl=self.acl, responder=self.responder,
            enabled=enabled, required_for=required_for if must else None,
            # A MAC is verified by verify_mac where an authenticator is (else it fails
            # in C); NTS fields by the NTS stage, asked as decide() asks it.
            verifies_macs=authenticator is not None, verify_mac=self.verify_mac,
            nts_claims=None if nts is None else nts.claims,
            nts_decide=None if nts is None else nts.decide,
            sources=self.sources, prefixes=self.prefixes, newcomers=self.newcomers.ring,
            prefix_overflow=self._prefix_overflow)

    def set_blocklist(self, entries: Iterable[AclEntry]) -> None:
        """Make ``entries`` the whole blocklist layer; takes effect at once. Applied as
        a difference: only entries that changed on their network are written (the
        rest is compared, not rebuilt). On one prefix a blocklist entry beats the
        configuration's while it is active; expired or removed, it uncovers it."""
        self.acl.set_blocklist(entries)

    def update_blocklist(self, added: Iterable[AclEntry] = (),
                         removed: Iterable[Network | AclEntry] = ()) -> None:
        """Remove the blocklist entries on ``removed`` (networks, or the entries on
        them), then add (or replace, on their
        network) ``added``; takes effect at once. Touches only those entries, whatever
        the size of the list (``guardntp/blocklist/live.py`` hands over what changed
        in the store). All or nothing: raises TypeError for a bad entry with the list
        untouched; the access list's generation moves once."""
        self.acl.update_blocklist(added, removed)

    # ------------------------------------------------------------------ the decision

    def decide(self, data: bytes, packed: bytes, port: int, recv_ns: int, now_ns: int,
               ttl: int = -1) -> Decision:
        """The fate of one datagram from ``packed``:``port`` (packed address bytes).

        ``ttl``: the IP TTL (IPv4) or hop limit (IPv6) it arrived with, -1 if unknown.
        ``now_ns`` is read within [EARLIEST_NS, LATEST_NS]."""
        sane: Request | Reason | None
        if not EARLIEST_NS <= now_ns <= LATEST_NS:
            now_ns = EARLIEST_NS if now_ns < EARLIEST_NS else LATEST_NS
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
        nts = self._nts
        if nts is not None and len(data) > HEADER_LEN and nts.claims(data):
            label = fingerprint.NTS
        self.label_counts[label] += 1
        v4 = len(packed) == 4
        key = packed if v4 else packed[: self.v6_source_bytes]
        sources = self.sources
        record = sources.records.get(key)
        newcomer = False
        if record is None:
            record = new_record(now_ns, label, port, ttl)
            remembered_tat = self.newcomers.get(key)
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
                    self.newcomers.forget(key)
                else:
                    newcomer = True   # no room among established sources: stays a newcomer
                    self.table_full += 1
        record[REQUESTS] += 1
        gap_ns = now_ns - record[LAST_SEEN]
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

        # -- authentication: NTS (RFC 8915), else a symmetric-key MAC
        signer: Signer | None = None
        if label == fingerprint.NTS and nts is not None and request.mac_key_id is None:
            kind, finish = nts.decide(data)
            if finish is None:   # malformed, or an authenticator that fails: no reply
                counts[base + Reason.NTS_REJECTED] += 1
                record[DROPS] += 1
                return Reason.NTS_REJECTED, None, None
            if kind == "nak":    # a cookie that does not open: back to NTS-KE
                counts[base + Reason.NTS_NAK] += 1
                record[KODS] += 1
                return (Reason.NTS_NAK,
                        self.responder.kod_reply(data, request, KOD_NTS_NAK, 0), finish)
            signer = finish
        authenticator = self._authenticator
        if signer is None:
            request, signer, refused = self._verify_mac(data, request)
            if refused is None and signer is None and authenticator is not None \
                    and authenticator.required_for(packed):
                refused = Reason.AUTH_REQUIRED
            if refused is not None:
                counts[base + refused] += 1
                record[DROPS] += 1
                return refused, None, None

        # -- buckets
        if not exempt:
            limit = self.label_limits.get(label, self.source_limit)
            tat_cell, crowd_size, contested = self._observe(record, port, ttl, gap_ns, now_ns)
            tat = record[tat_cell]
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
                                        signer, key if newcomer else None, contested)
            record[tat_cell] = tat + limit.interval_ns // crowd_size
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

    def _observe(self, record: SourceRecord, port: int, ttl: int, gap_ns: int, now_ns: int
                 ) -> tuple[int, int, bool]:
        """Account one request to its source's traffic (``crowd.py``). Returns the cell
        of the bucket it is charged to (its TTL class's), the crowd that bucket's
        interval is divided by, and whether the address is *contested*: both classes
        active, from the same kind of sender at different distances (a spoofer?)."""
        tat_cell = TAT
        if self.ttl_classes and ttl >= 0:
            home = record[HOME_TTL]
            if home < 0:
                record[HOME_TTL] = ttl
            elif ttl - home > crowd.TTL_SLACK or home - ttl > crowd.TTL_SLACK:
                tat_cell = OTHER_TAT
                record[OTHER_TTL] = ttl
        contested = is_contested(record, now_ns, tat_cell)
        if self.max_crowd == 1:
            return tat_cell, 1, contested
        started = record[WINDOW_START]
        if now_ns - started >= crowd.CROWD_WINDOW_NS:
            # The window that just ended is kept only if it ended within a window.
            record[CROWD] = (self.crowd_of_bits[record[PORT_SKETCH].bit_count()]
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
            so_far = crowd.extrapolated(self.crowd_of_bits[sketch.bit_count()],
                                        now_ns - record[WINDOW_START])
            size = min(self.max_crowd, max(record[CROWD], so_far))
        last = record[LAST_CROWD]
        if size > last:
            # A bigger crowd keeps the requests it has used (its burst grows with it):
            # what it used at one client's price is repriced at the crowd's.
            tat = record[tat_cell]
            if tat > now_ns:
                record[tat_cell] = now_ns + (tat - now_ns) * last // size
        record[LAST_CROWD] = size
        return tat_cell, size, contested

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
        self.newcomers.forget(key)
        return True

    def _over_limit(self, data: bytes, request: Request, record: SourceRecord, base: int,
                    label: str, recv_ns: int, now_ns: int, signer: Signer | None,
                    newcomer_key: bytes | None = None, contested: bool = False) -> Decision:
        counts = self.counters.counts
        if self.leak_share and self.random.random() < self.leak_share \
                and self._global_allows(now_ns):
            counts[base + Reason.LEAKED] += 1
            record[TIME_REPLIES] += 1
            responder = self.responder
            return (Reason.LEAKED,
                    responder.time_reply(data, request, responder.served_ntp(recv_ns)), signer)
        # A contested address: the limited class may be a spoofer, and a KoD would
        # reach (and slow down) the address's real owner.
        if (self.policy.send_kod and self.label_kod.get(label, True) and not contested
                and (newcomer_key is None or self._establish(newcomer_key, record, now_ns))
                and self._kod_allowed(record, now_ns)):
            return self._kod(data, request, record, base, KOD_RATE, Reason.RATE_KOD, signer)
        counts[base + Reason.RATE_LIMITED] += 1
        record[DROPS] += 1
        return Reason.RATE_LIMITED, None, None
