"""The filter's control plane: :class:`Pipeline` holds its state and its policy.

Rule: the decision is not here. The compiled core (``guardntp/_fastlane.c``) decides
every packet; its reference model, the executable spec of each stage, is
``filter/reference.py``'s :class:`~guardntp.filter.reference.ReferenceModel`, whose
``decide`` a pipeline inherits (and which decides where no compiler was available).
This module compiles a :class:`~guardntp.filter.policy.FilterPolicy` into what both
read (:func:`compile_policy`, checked before a reload touches anything), holds the
tables, counters, access list and budgets they share, swaps a new policy in keeping
every table (:meth:`Pipeline.apply_policy`), applies blocklist changes, and hands the
core its typed copy of all of it (:meth:`Pipeline.lane_policy`, ``filter/lane.py``).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable

from ..responder import Responder, inspect_request
from ..timestamps import NS_PER_S
from ..verdicts import N_REASONS, Counters, LabelCounts, Reason
from ..wire import (
    CRYPTO_NAK_LEN,
    HEADER_LEN,
    MAX_MAC_LEN,
    MAX_V4_BARE_MAC_LEN,
    MIN_EXT_FIELD_LEN,
    MIN_MAC_LEN,
)
from . import crowd, fingerprint
from .acl import AccessList, AclEntry, Action, BlockVerdict, Network, NetworkKey
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
from .reference import (
    ACL_ENTRY,
    ACL_GENERATION,
    CROWD,
    DROPS,
    EARLIEST_NS,
    FIRST_SEEN,
    GAP_DEV,
    GAP_MEAN,
    GLOBAL_TAT,
    HOME_TTL,
    KOD_TAT,
    KODS,
    LABEL,
    LAST_CROWD,
    LAST_KOD,
    LAST_SEEN,
    LATEST_NS,
    NEVER,
    OTHER_TAT,
    OTHER_TTL,
    PORT,
    PORT_SKETCH,
    RECORD_LEN,
    REQUESTS,
    TAT,
    TIME_REPLIES,
    WINDOW_START,
    Authenticator,
    CompiledPolicy,
    NtsStage,
    ReferenceModel,
    SourceRecord,
    new_budgets,
    new_prefix_record,
)

#: What the compiled loop and this module agree on whatever the policy (``lane.py``).
LANE_CONTRACT = LaneContract(
    cells=RecordCells(
        tat=TAT, requests=REQUESTS, time_replies=TIME_REPLIES, kods=KODS, drops=DROPS,
        first_seen=FIRST_SEEN, last_seen=LAST_SEEN, last_kod=LAST_KOD, label=LABEL,
        acl_generation=ACL_GENERATION, acl_entry=ACL_ENTRY, port=PORT, home_ttl=HOME_TTL,
        other_tat=OTHER_TAT, port_sketch=PORT_SKETCH, window_start=WINDOW_START,
        crowd=CROWD, gap_mean=GAP_MEAN, gap_dev=GAP_DEV, other_ttl=OTHER_TTL,
        last_crowd=LAST_CROWD),
    record_len=RECORD_LEN, never=NEVER, earliest_ns=EARLIEST_NS, latest_ns=LATEST_NS,
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

try:
    from .._fastlane import Lane as _Lane
except ImportError:  # no C compiler at install: no compiled core to configure
    _Lane = None  # type: ignore[assignment, misc]


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
        sanity_48=[None if (first >> 3) & 7 == 1 and first & 7 == 0
                   else inspect_request(bytes((first,)) + padding, 0, answer_symmetric)
                   for first in range(256)],
        label_of_first=[None if (first >> 3) & 7 == 1 else fingerprint.packet_label(first, 0)
                        for first in range(256)],
        max_crowd=max_crowd, crowd_of_bits=crowd.crowd_table(max_crowd),
        ttl_classes=ttl_classes)


class Pipeline(ReferenceModel):
    """The filter's state and policy; :meth:`decide` (the reference model) is
    inherited from :class:`~guardntp.filter.reference.ReferenceModel`."""

    def __init__(self, policy: FilterPolicy, responder: Responder,
                 authenticator: Authenticator | None = None) -> None:
        self.responder = responder
        #: Bumped whenever something the compiled loop copies (``lane_policy``)
        #: changes: settings, the authenticator, the NTS stage.
        self.config_version = 0
        self._authenticator = authenticator
        self._nts: NtsStage | None = None
        self.counters = Counters()
        self.label_counts = LabelCounts(fingerprint.PACKET_LABELS)
        self.table_full = 0   # second requests that found no room among established sources
        # Sized, like everything the policy decides, by apply_policy below.
        # A source is evictable only once both its classes' buckets are full again.
        self.sources = BucketTable(1, tat_cells=(TAT, OTHER_TAT))
        self.prefixes = BucketTable(1)
        self.newcomers = NewcomerTable(1)
        #: Two layers, the configuration's [[acl]] and the blocklist's (``acl.py``).
        self.acl = AccessList()
        self._config_acl: list[AclEntry] = []
        self.budgets = new_budgets()
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
        self.compiled = compiled
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
        """What the compiled core (``guardntp/fastlane.py``) needs to decide every
        packet exactly as :meth:`decide` does: the objects it reads and updates in
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
            prefix_overflow=self._prefix_overflow, budgets=self.budgets)

    def snapshot(self) -> dict[str, object]:
        """Everything the filter keeps, as plain values: the counters, every record of
        both tables in their order, the newcomer ring in its order and what it forgot,
        the shared budgets. Two pipelines that decided the same packets alike (the
        compiled core's and the reference model's) have equal snapshots."""
        return {
            "counts": list(self.counters.counts),
            "labels": dict(self.label_counts),
            "sources": [(k, list(v)) for k, v in self.sources.records.items()],
            "prefixes": [(k, list(v)) for k, v in self.prefixes.records.items()],
            "newcomers": dict(self.newcomers.tats),
            "ring": self.newcomers.ring.items(),
            "ring_evictions": self.newcomers.evictions,
            "refused": (self.sources.admissions_refused, self.prefixes.admissions_refused),
            "prefix_overflow": list(self._prefix_overflow),
            "global_tat": self.budgets[GLOBAL_TAT],
            "kod_tat": self.budgets[KOD_TAT],
            "table_full": self.table_full,
            "evictions": (self.sources.evictions, self.prefixes.evictions),
        }

    def set_blocklist(self, entries: Iterable[AclEntry]) -> None:
        """Make ``entries`` the whole blocklist layer; takes effect at once. Applied as
        a difference: only entries that changed on their network are written (the
        rest is compared, not rebuilt). On one prefix a blocklist entry beats the
        configuration's while it is active; expired or removed, it uncovers it."""
        self.acl.set_blocklist(entries)

    def update_blocklist(self, added: Iterable[AclEntry] = (),
                         removed: Iterable[Network | AclEntry | NetworkKey] = ()) -> None:
        """Remove the blocklist entries on ``removed`` (networks, the entries on them, or
        ``(packed, prefixlen)``), then add (or replace, on their
        network) ``added``; takes effect at once. Touches only those entries, whatever
        the size of the list (``guardntp/blocklist/live.py`` hands over what changed
        in the store). All or nothing: raises TypeError for a bad entry with the list
        untouched; the access list's generation moves once."""
        self.acl.update_blocklist(added, removed)

    def write_blocklist(self, wanted: dict[NetworkKey, BlockVerdict | None]) -> None:
        """Per network, the verdict the blocklist holds there from now on (None: none),
        the verdicts made by ``acl.verdict``: as :meth:`update_blocklist`, without an
        entry object per network (a load of many rows). All or nothing."""
        self.acl.write_blocklist(wanted)

    def expire_blocklist(self, now_ns: int, max_slots: int) -> int:
        """Sweep lapsed blocklist entries out of the access list, at most ``max_slots``
        of its slots at a time (a lookup ignores a lapsed entry already: this keeps
        the table small). Returns how many lapsed entries are left to sweep."""
        return self.acl.expire_blocklist(now_ns, max_slots)

    def release_blocklist_memory(self, max_bytes: int) -> int:
        """Give back to the kernel at most ``max_bytes`` of the memory that emptied or
        shrunk blocklist tables held (in slices: all of a big one at once would hold the
        packet loop for milliseconds). Returns the bytes still waiting."""
        return self.acl.block_table.release(max_bytes)
