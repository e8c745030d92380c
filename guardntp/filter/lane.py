"""What the compiled packet loop (``guardntp/_fastlane.c``) is given: one :class:`LanePolicy`.

Rule: the loop decides a packet exactly as :meth:`Pipeline.decide` would, so it must
copy everything that decision depends on. Python compiles that into typed, frozen
objects once per policy and hands them over in one ``Lane.configure(policy)`` call;
the C side reads each field by name and refuses a missing one (AttributeError) or one
of the wrong type (TypeError) naming it, and a value out of range (ValueError).

Three parts, by how long each holds:

- :class:`LaneContract`: what the loop and ``pipeline.py`` agree on whatever the
  policy: the record layout, the reason codes it counts, the access list's actions,
  the crowd estimate's constants. One instance, ``pipeline.LANE_CONTRACT``.
- :class:`LaneSettings`: what one compiled policy decides (tables per first byte,
  limits, prefix lengths, KoD settings). Built once per policy by
  :meth:`LaneSettings.compile`.
- :class:`LaneObjects`: the pipeline's live objects, which the loop reads and updates
  in place (tables, counters, the access list). Built at each ``lane_policy()``.

The loop copies the values and keeps the live objects, never the policy object
itself: a new policy (``Pipeline.config_version``) means a new ``configure``.
"""

from __future__ import annotations

from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

from ..responder import NTP_PORT, inspect_request
from ..verdicts import LabelCounts, Reason
from ..wire import HEADER_LEN
from . import fingerprint
from .acl import Action
from .buckets import Limit

if TYPE_CHECKING:
    from .._fastlane import NewcomerRing
    from ..responder import Responder
    from .acl import AccessList
    from .buckets import BucketTable, PyNewcomerRing
    from .pipeline import Pipeline
    from .reference import CompiledPolicy, Decision, SourceRecord

class RecordCells(NamedTuple):
    """The index of each cell of a source record (``pipeline.py``'s layout), by name."""

    tat: int
    requests: int
    time_replies: int
    kods: int
    drops: int
    first_seen: int
    last_seen: int
    last_kod: int
    label: int
    acl_generation: int
    acl_entry: int
    port: int
    home_ttl: int
    other_tat: int
    port_sketch: int
    window_start: int
    crowd: int
    gap_mean: int
    gap_dev: int
    other_ttl: int
    last_crowd: int


class ReasonCodes(NamedTuple):
    """The :class:`~guardntp.verdicts.Reason` numbers the loop counts packets under:
    their column in ``Counters.counts`` (``n_reasons`` columns per NTP version)."""

    n_reasons: int
    reflection: int
    global_cap: int
    #: The last reason that sends a time reply (``Reason`` lists those first).
    last_time_reason: int
    leaked: int
    rate_kod: int
    rate_limited: int
    acl_deny: int
    blocklisted: int
    deny_kod: int
    malformed: int
    auth_required: int
    auth_failed: int
    crypto_nak: int
    nts_nak: int
    nts_rejected: int


class TailLengths(NamedTuple):
    """How ``wire.parse_tail`` tells extension fields from a MAC after the header."""

    #: The shortest extension field (RFC 7822).
    min_ext_field: int
    #: The shortest MAC (key id and digest) ...
    min_mac: int
    #: ... the longest one that may follow extension fields ...
    max_bare_mac: int
    #: ... and the longest at all.
    max_mac: int
    #: A crypto-NAK: a key id of zero alone.
    crypto_nak: int


class CrowdModel(NamedTuple):
    """The crowd estimate's constants (``crowd.py``), which the loop's copy of
    ``ReferenceModel._observe`` uses."""

    sketch_bits: int
    ewma_shift: int
    ttl_slack: int
    class_memory_ns: int
    window_ns: int
    #: Irregular when gap deviation / mean >= irregular_num / irregular_den.
    irregular_num: int
    irregular_den: int
    initial_ttls: tuple[int, int, int]


class KodSettings(NamedTuple):
    """When a RATE or DENY KoD may be sent (``ReferenceModel._kod_allowed``)."""

    #: At most one KoD per source in this long.
    guard_interval_ns: int
    #: The global KoD budget.
    limit: Limit
    #: The poll exponent a KoD tells the client.
    min_poll: int


@dataclass(frozen=True, slots=True)
class LaneContract:
    """What the loop and ``pipeline.py`` agree on, whatever the policy."""

    cells: RecordCells
    #: Cells in a source record (the loop's Record has exactly this many).
    record_len: int
    #: A monotonic time before anything: a record's "no KoD yet", "no other class".
    never: int
    #: The range ``now_ns`` is read within (``pipeline.EARLIEST_NS``, ``LATEST_NS``).
    earliest_ns: int
    latest_ns: int
    #: ``buckets.EVICTION_SCAN``: entries one admission may look at.
    eviction_scan: int
    reasons: ReasonCodes
    #: The access list's actions, which the loop compares an entry's with by identity.
    action_allow: Action
    action_exempt: Action
    action_drop: Action
    action_deny: Action
    netgear_port: int
    crowd: CrowdModel
    tail: TailLengths


@dataclass(frozen=True, slots=True)
class LaneSettings:
    """What one compiled policy decides, as the loop reads it.

    NTPv1 is the exception where the source port matters: mode 0 from port 123 is
    dropped (``drop_reason_ntp_port``), and the label (so the limit and the KoD
    choice) is the Netgear one from port 23457, else SNTPv1. Labels, limits and KoD
    choices are therefore given per *label slot*, 259 of them: the 256 first bytes,
    then NTPv1 from the Netgear port, then NTPv1 from any other port, then a
    request the NTS stage claims."""

    #: Per label slot: the packet label, None where it takes the full path.
    labels: tuple[str | None, ...]
    #: Per first byte of a 48-byte request: the Reason it is dropped for, 255: none.
    drop_reason: bytes
    #: ... the same from source port 123 (NTPv1 mode 0 is dropped there).
    drop_reason_ntp_port: bytes
    #: Per first byte: the reply's mode where it is not dropped.
    reply_mode: bytes
    #: A bitmap of the 65536 source ports dropped as reflection (bit port & 7 of byte
    #: port >> 3).
    reflection: bytes
    #: Per label slot: the source bucket's GCRA interval and tolerance.
    interval_ns: tuple[int, ...]
    tolerance_ns: tuple[int, ...]
    #: Per label slot: 1 where a source over its limit may be sent a RATE KoD.
    kod_of_first: bytes
    prefix_limit: Limit
    #: The global reply budget; None: no cap.
    global_limit: Limit | None
    v4_prefix_bits: int
    v6_source_bytes: int
    v6_prefix_bits: int
    ttl_classes: bool
    max_crowd: int
    #: Crowd estimate per number of port-sketch bits set (0-63).
    crowd_of_bits: tuple[int, ...]
    #: Over the limit (``ReferenceModel._over_limit``): the leak draws from the pipeline's
    #: own stream, so both paths draw the same numbers.
    random: Callable[[], float]
    leak_share: float
    send_kod: bool
    kod: KodSettings

    @classmethod
    def compile(cls, compiled: CompiledPolicy) -> LaneSettings:
        """The loop's view of ``compiled``; pure, so a reload builds it before it
        touches the running pipeline."""
        padding = bytes(HEADER_LEN - 1)
        answer_symmetric = compiled.policy.answer_symmetric
        drop_reason = bytearray(b"\xff" * 256)
        drop_reason_ntp_port = bytearray(b"\xff" * 256)
        reply_mode = bytearray(256)
        for first in range(256):
            packet = bytes((first,)) + padding
            sane = compiled.sanity_48[first]
            if sane is None:   # NTPv1 mode 0: decided by the port; this is any port but 123
                sane = inspect_request(packet, 0, answer_symmetric)
            at_ntp_port = inspect_request(packet, NTP_PORT, answer_symmetric)
            if isinstance(at_ntp_port, Reason):
                drop_reason_ntp_port[first] = at_ntp_port
            if isinstance(sane, Reason):
                drop_reason[first] = sane
            else:   # (48 bytes: no tail, so no MAC)
                reply_mode[first] = sane.reply_mode
        labels = (*compiled.label_of_first, fingerprint.NETGEAR, fingerprint.SNTPV1,
                  fingerprint.NTS)
        source_limit = compiled.source_limit
        limits = [compiled.label_limits.get(label, source_limit) if label else source_limit
                  for label in labels]
        kod_of_first = bytes(
            1 if label is not None and compiled.label_kod.get(label, True) else 0
            for label in labels)
        reflection = bytearray(8192)
        for port in compiled.reflection_ports:
            reflection[port >> 3] |= 1 << (port & 7)
        return cls(
            labels=labels, drop_reason=bytes(drop_reason),
            drop_reason_ntp_port=bytes(drop_reason_ntp_port), reply_mode=bytes(reply_mode),
            reflection=bytes(reflection),
            interval_ns=tuple(limit.interval_ns for limit in limits),
            tolerance_ns=tuple(limit.tolerance_ns for limit in limits),
            kod_of_first=kod_of_first, prefix_limit=compiled.prefix_limit,
            global_limit=compiled.global_limit, v4_prefix_bits=compiled.v4_prefix_bits,
            v6_source_bytes=compiled.v6_source_bytes, v6_prefix_bits=compiled.v6_prefix_bits,
            ttl_classes=compiled.ttl_classes, max_crowd=compiled.max_crowd,
            crowd_of_bits=compiled.crowd_of_bits, random=compiled.random.random,
            leak_share=compiled.leak_share, send_kod=compiled.policy.send_kod,
            kod=KodSettings(guard_interval_ns=compiled.kod_interval_ns,
                            limit=compiled.kod_limit, min_poll=compiled.policy.kod_min_poll))


@dataclass(frozen=True, slots=True)
class LaneObjects:
    """The pipeline's objects the loop reads and updates in place."""

    pipeline: Pipeline
    #: ``Pipeline.decide``, which decides every packet where the loop is disabled.
    decide: Callable[[bytes, bytes, int, int, int, int], Decision]
    #: ``Counters.counts``: a ``_fastlane.Counts`` the loop adds to in place.
    counts: MutableSequence[int]
    #: ``Pipeline.label_counts``: its ``counts`` (a Counts) the loop adds to in place.
    label_counts: LabelCounts
    acl: AccessList
    responder: Responder
    #: False: ``decide`` decides every packet, the loop only receives and sends.
    enabled: bool
    #: ``authenticator.required_for`` where some source must authenticate, else None.
    required_for: Callable[[bytes], bool] | None
    #: An authenticator checks MACs (else a request's MAC fails in the loop) ...
    verifies_macs: bool
    #: ... through ``Pipeline.verify_mac(data, port) -> (refusal, signer)``, the loop's
    #: one call into Python for a request it decides.
    verify_mac: Callable[[bytes, int], tuple[int | None, Callable[[bytes], bytes] | None]]
    #: The NTS stage's ``claims(data)`` and ``decide(data)`` (``pipeline.NtsStage``),
    #: which the loop calls as ``Pipeline.decide`` does; None: no NTS.
    nts_claims: Callable[[bytes], bool] | None
    nts_decide: Callable[[bytes], tuple[str, Callable[[bytes], bytes] | None]] | None
    #: The tables (their records, AddressTables) the loop reads, inserts into and
    #: evicts from as BucketTable does.
    sources: BucketTable
    prefixes: BucketTable
    #: The newcomer ring; where it is not a compiled NewcomerRing (or the tables are
    #: not AddressTables), ``decide`` decides every packet.
    newcomers: NewcomerRing | PyNewcomerRing
    #: The record a prefix overflows into when the prefix table is full.
    prefix_overflow: SourceRecord
    #: The global reply and KoD budgets (``reference.GLOBAL_TAT``, ``KOD_TAT``): a
    #: two-cell Record the loop reads and writes in place.
    budgets: SourceRecord


@dataclass(frozen=True, slots=True)
class LanePolicy:
    """Everything ``Lane.configure`` takes: valid until ``Pipeline.config_version``
    changes."""

    contract: LaneContract
    settings: LaneSettings
    objects: LaneObjects

    def disabled(self) -> LanePolicy:
        """The same, with ``decide`` deciding every packet (tests that must
        see every decision)."""
        return replace(self, objects=replace(self.objects, enabled=False))
