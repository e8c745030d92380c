"""Selection of upstreams (pure): clock filter, intersection, combining, frequency,
holdover, jump guard and leap seconds, all on a fake clock."""

from __future__ import annotations

import calendar

from hypothesis import given, settings
from hypothesis import strategies as st

from guardntp.timesources.selection import (
    FALSETICKER,
    FILTER_STAGES,
    SELECTED,
    UNUSABLE,
    ClockFilter,
    FilterSample,
    KeeperSettings,
    SourceEstimate,
    TimeKeeper,
    guard_jump,
    intersection,
    is_leap_day,
    select,
    step_decision,
)
from guardntp.timestamps import NS_PER_S
from guardntp.wire import Leap

MS = 1_000_000
US = 1_000
T0 = 1_790_000_000 * NS_PER_S  # 2026-09-21
REFID = b"\x7f\0\0\1"


def sample(offset_ns: int = 0, taken_ns: int = T0, delay_ns: int = 20 * MS,
           root_delay_ns: int = 10 * MS, root_dispersion_ns: int = 5 * MS, stratum: int = 2,
           leap: Leap = Leap.NONE, dispersion_ns: int = 10 * US) -> FilterSample:
    return FilterSample(offset_ns, delay_ns, dispersion_ns, taken_ns, root_delay_ns,
                        root_dispersion_ns, stratum, leap)


def estimate(source: str, offset_ns: int, distance_ns: int, stratum: int = 2,
             leap: Leap = Leap.NONE) -> SourceEstimate:
    """An estimate whose root distance is ``distance_ns`` (all of it as root dispersion)."""
    return SourceEstimate(source, offset_ns, delay_ns=0, dispersion_ns=0, jitter_ns=0,
                          root_delay_ns=0, root_dispersion_ns=distance_ns - MS // 2,
                          stratum=stratum, leap=leap, taken_ns=T0)


def liar(offset_ns: int, taken_ns: int) -> FilterSample:
    """Stratum 1, zero root delay and dispersion, a fast path: the most attractive claim."""
    return sample(offset_ns, taken_ns, delay_ns=100 * US, root_delay_ns=0,
                  root_dispersion_ns=0, stratum=1)


def run(keeper: TimeKeeper, offsets: dict[str, object], rounds: int, start_ns: int = T0,
        poll_ns: int = 64 * NS_PER_S) -> int:
    """Feed one sample per source per poll; ``offsets[name]`` is an offset or a
    function of the time. Returns the time of the last round."""
    now = start_ns
    for index in range(rounds):
        now = start_ns + index * poll_ns
        for name, offset in offsets.items():
            value = offset(now) if callable(offset) else offset
            keeper.add_sample(name, value if isinstance(value, FilterSample)
                              else sample(int(value), now))  # type: ignore[call-overload]
        keeper.update(now)
    return now


def status(keeper: TimeKeeper) -> dict[str, str]:
    return {str(r["source"]): str(r["status"]) for r in keeper.report()}


# ------------------------------------------------------------------------ the filter

def test_the_filter_keeps_the_lowest_delay_of_the_last_eight() -> None:
    f = ClockFilter()
    # The very lowest delay comes first and falls out of the 8-stage window.
    f.add(sample(offset_ns=-7 * MS, delay_ns=1 * MS, taken_ns=T0))
    for index in range(1, 10):
        f.add(sample(offset_ns=index * US, delay_ns=(30 - index % 5) * MS,
                     taken_ns=T0 + index * NS_PER_S))
    assert len(f.samples) == FILTER_STAGES
    best = f.estimate("a", T0 + 9 * NS_PER_S)
    assert best is not None
    assert best.delay_ns == 26 * MS and best.offset_ns == 9 * US  # newest of the lowest


def test_filter_jitter_is_the_rms_of_offset_differences() -> None:
    f = ClockFilter()
    f.add(sample(0, T0, delay_ns=10 * MS))
    f.add(sample(3 * MS, T0 + 1, delay_ns=20 * MS))
    f.add(sample(-4 * MS, T0 + 2, delay_ns=30 * MS))
    best = f.estimate("a", T0 + 2)
    assert best is not None and best.offset_ns == 0
    assert abs(best.jitter_ns - round(((9 + 16) / 2) ** 0.5 * MS)) <= 1


def test_filter_dispersion_grows_at_15_ppm() -> None:
    f = ClockFilter()
    f.add(sample(0, T0, dispersion_ns=10 * US))
    later = f.estimate("a", T0 + 1000 * NS_PER_S)
    assert later is not None and later.dispersion_ns == 10 * US + 15 * MS


# ------------------------------------------------------------------------- selection

def test_one_falseticker_among_three_is_rejected_whatever_it_claims() -> None:
    keeper = TimeKeeper()
    run(keeper, {"honest-a": 200 * US, "honest-b": -300 * US, "honest-c": 100 * US,
                 "liar": lambda now: liar(2 * NS_PER_S, now)}, rounds=3)
    assert status(keeper) == {"honest-a": SELECTED, "honest-b": SELECTED,
                              "honest-c": SELECTED, "liar": FALSETICKER}
    selection = keeper.last_selection
    assert selection.offset_ns is not None and abs(selection.offset_ns) < 1 * MS
    assert keeper.system_peer != "liar"
    state = keeper.clock_state(T0 + 130 * NS_PER_S, -20, REFID)
    assert state.synchronized and abs(state.offset_ns) < 1 * MS and state.stratum == 3


def test_a_lone_liar_against_two_honest_sources_loses() -> None:
    keeper = TimeKeeper()
    run(keeper, {"a": 0, "b": 400 * US, "liar": lambda now: liar(2 * NS_PER_S, now)}, 2)
    assert status(keeper)["liar"] == FALSETICKER
    assert abs(keeper.offset_at(T0 + 64 * NS_PER_S) - 200 * US) < 1 * MS


def test_two_falsetickers_among_five_are_rejected() -> None:
    keeper = TimeKeeper()
    run(keeper, {"a": 0, "b": 300 * US, "c": -200 * US,
                 "liar-1": lambda now: liar(2 * NS_PER_S, now),
                 "liar-2": lambda now: liar(-5 * NS_PER_S, now)}, rounds=3)
    assert status(keeper)["liar-1"] == FALSETICKER and status(keeper)["liar-2"] == FALSETICKER
    assert abs(keeper.offset_at(T0 + 128 * NS_PER_S)) < 1 * MS


def test_two_falsetickers_that_agree_with_each_other_still_lose_to_three() -> None:
    keeper = TimeKeeper()
    run(keeper, {"a": 0, "b": 300 * US, "c": -200 * US,
                 "liar-1": lambda now: liar(2 * NS_PER_S, now),
                 "liar-2": lambda now: liar(2 * NS_PER_S + 50 * US, now)}, rounds=3)
    assert {status(keeper)[name] for name in ("liar-1", "liar-2")} == {FALSETICKER}
    assert abs(keeper.offset_at(T0 + 128 * NS_PER_S)) < 1 * MS


def test_two_sources_that_disagree_select_nothing() -> None:
    keeper = TimeKeeper()
    run(keeper, {"a": 0, "b": 2 * NS_PER_S}, rounds=2)
    assert keeper.last_selection.offset_ns is None and keeper.last_selection.disagreement
    state = keeper.clock_state(T0 + 64 * NS_PER_S, -20, REFID)
    assert not state.synchronized and state.wire_leap is Leap.UNSYNCHRONIZED
    assert "no majority" in state.detail


def test_disagreement_after_synchronising_goes_unsynchronised_at_once() -> None:
    keeper = TimeKeeper()
    last = run(keeper, {"a": 0, "b": 0}, rounds=2)
    assert keeper.clock_state(last, -20, REFID).synchronized
    # While b's filter holds samples from before and after, its jitter makes it
    # unusable; once they are flushed the two plainly disagree.
    last = run(keeper, {"a": 0, "b": 3 * NS_PER_S}, rounds=FILTER_STAGES,
               start_ns=last + 64 * NS_PER_S)
    assert keeper.last_selection.disagreement
    assert not keeper.clock_state(last + NS_PER_S, -20, REFID).synchronized


def test_sixteen_seconds_of_root_dispersion_is_refused() -> None:
    keeper = TimeKeeper()
    run(keeper, {"bad": lambda now: sample(0, now, root_dispersion_ns=16 * NS_PER_S)}, 2)
    report = keeper.report()[0]
    assert report["status"] == UNUSABLE and "over the maximum 3.000 s" in str(report["reason"])
    assert not keeper.clock_state(T0 + 64 * NS_PER_S, -20, REFID).synchronized


def test_max_distance_is_configurable() -> None:
    tight = TimeKeeper(KeeperSettings(max_distance_ns=10 * MS))
    run(tight, {"a": 0}, 1)   # root distance ~25 ms with the default sample
    assert status(tight) == {"a": UNUSABLE}


def test_a_single_source_is_used_when_it_is_all_there_is() -> None:
    keeper = TimeKeeper()
    run(keeper, {"only": 3 * MS}, 1)
    assert keeper.clock_state(T0, -20, REFID).synchronized
    assert keeper.offset_at(T0) == 3 * MS


def test_leap_indicator_is_the_survivors_majority() -> None:
    estimates = [estimate("a", 0, 20 * MS, leap=Leap.INSERT_SECOND),
                 estimate("b", 0, 20 * MS, leap=Leap.INSERT_SECOND), estimate("c", 0, 20 * MS)]
    assert select(estimates).leap is Leap.INSERT_SECOND
    estimates[1] = estimate("b", 0, 20 * MS)
    assert select(estimates).leap is Leap.NONE


def test_combining_weights_by_inverse_root_distance() -> None:
    selection = select([estimate("near", 0, 10 * MS), estimate("far", 9 * MS, 90 * MS)])
    assert selection.offset_ns == round(9 * MS * (1 / 90) / (1 / 10 + 1 / 90))
    assert selection.system_peer is not None and selection.system_peer.source == "near"


def test_intersection_needs_a_majority() -> None:
    assert intersection([(0, 10), (5, 15), (100, 110)]) == (5, 10, 1)
    assert intersection([(0, 10), (100, 110)]) is None
    assert intersection([(0, 10)]) == (0, 10, 0)


finite = st.integers(min_value=-10 * NS_PER_S, max_value=10 * NS_PER_S)
width = st.integers(min_value=MS, max_value=NS_PER_S)


@settings(max_examples=300, deadline=None)
@given(truth=finite, data=st.data(), honest_count=st.integers(2, 6))
def test_falsetickers_in_the_minority_never_move_the_result_out_of_the_honest_hull(
        truth: int, data: st.DataObject, honest_count: int) -> None:
    liars = data.draw(st.integers(0, honest_count - 1))
    estimates = []
    honest = []
    for index in range(honest_count):
        distance = data.draw(width)
        offset = truth + data.draw(st.integers(-distance + MS // 2, distance - MS // 2))
        estimates.append(estimate(f"h{index}", offset, distance))
        honest.append((offset - distance, offset + distance))
    for index in range(liars):
        estimates.append(estimate(f"f{index}", data.draw(finite), data.draw(width),
                                  stratum=data.draw(st.integers(1, 15))))
    selection = select(data.draw(st.permutations(estimates)))
    assert selection.offset_ns is not None
    assert min(low for low, _ in honest) <= selection.offset_ns <= max(h for _, h in honest)


@settings(max_examples=300, deadline=None)
@given(truth=finite, data=st.data(), honest_count=st.integers(2, 6))
def test_falsetickers_apart_from_the_truth_leave_the_result_in_the_honest_intersection(
        truth: int, data: st.DataObject, honest_count: int) -> None:
    liars = data.draw(st.integers(0, honest_count - 1))
    estimates, honest = [], []
    for index in range(honest_count):
        distance = data.draw(width)
        offset = truth + data.draw(st.integers(-distance + MS // 2, distance - MS // 2))
        estimates.append(estimate(f"h{index}", offset, distance))
        honest.append((offset - distance, offset + distance))
    low = max(lo for lo, _ in honest)
    high = min(hi for _, hi in honest)
    hull_low = min(lo for lo, _ in honest)
    hull_high = max(hi for _, hi in honest)
    for index in range(liars):  # anywhere, as long as it misses every honest interval
        distance = data.draw(width)
        side = data.draw(st.sampled_from((-1, 1)))
        gap = data.draw(st.integers(1, 5 * NS_PER_S))
        offset = (hull_high + gap + distance) if side > 0 else (hull_low - gap - distance)
        estimates.append(estimate(f"f{index}", offset, distance, stratum=1))
    selection = select(data.draw(st.permutations(estimates)))
    assert selection.offset_ns is not None and low <= selection.offset_ns <= high
    assert all(r.status == FALSETICKER for r in selection.reports if r.source.startswith("f"))


# ------------------------------------------------------------------- frequency, holdover

def test_a_50_ppm_local_drift_is_tracked_between_polls() -> None:
    keeper = TimeKeeper()

    def truth(now: int) -> int:  # the local clock is 50 ppm slow: upstream - local grows
        return round((now - T0) * 50e-6)

    last = run(keeper, {"a": truth, "b": truth, "c": truth}, rounds=6)
    assert abs(keeper.frequency - 50e-6) < 0.1e-6
    for seconds in (1, 32, 63):
        now = last + seconds * NS_PER_S
        assert abs(keeper.offset_at(now) - truth(now)) < 10 * US


def test_holdover_serves_frequency_corrected_time_then_gives_up() -> None:
    keeper = TimeKeeper(KeeperSettings(lost_after_ns=1024 * NS_PER_S,
                                       unreachable_after_ns=512 * NS_PER_S))

    def truth(now: int) -> int:
        return round((now - T0) * -20e-6)

    last = run(keeper, {"a": truth, "b": truth, "c": truth}, rounds=6)
    lost = last + 600 * NS_PER_S
    keeper.update(lost)   # every source is now unreachable
    assert keeper.last_selection.offset_ns is None
    held = keeper.clock_state(lost, -20, REFID)
    assert held.synchronized and "holdover" in held.detail
    assert abs(held.offset_ns - truth(lost)) < 20 * US
    assert held.root_dispersion_at(lost) >= held.root_dispersion_ns + 600 * 15 * US - US
    assert not keeper.clock_state(last + 1100 * NS_PER_S, -20, REFID).synchronized


def test_a_source_drifting_100_ppm_against_the_others_becomes_a_falseticker() -> None:
    keeper = TimeKeeper()
    drifting = {"a": 0, "b": 100 * US, "c": -100 * US,
                "drifter": lambda now: round((now - T0) * 100e-6)}
    run(keeper, drifting, rounds=4)
    assert status(keeper)["drifter"] == FALSETICKER
    assert "ppm against the majority" in next(
        str(r["reason"]) for r in keeper.report() if r["source"] == "drifter")
    assert abs(keeper.offset_at(T0 + 192 * NS_PER_S)) < 1 * MS
    assert abs(keeper.frequency) < 1e-6


# --------------------------------------------------------------------------- jumps

def test_one_source_jumping_two_seconds_is_not_followed() -> None:
    keeper = TimeKeeper()
    last = run(keeper, {"a": 0, "b": 0, "c": 0}, rounds=3)
    last = run(keeper, {"a": 2 * NS_PER_S, "b": 0, "c": 0}, rounds=8,
               start_ns=last + 64 * NS_PER_S)
    assert status(keeper)["a"] == FALSETICKER
    assert abs(keeper.offset_at(last)) < 1 * MS


def test_a_jump_by_the_majority_is_followed_only_after_the_stepout() -> None:
    keeper = TimeKeeper(KeeperSettings(stepout_ns=300 * NS_PER_S))
    last = run(keeper, {"a": 0, "b": 0, "c": 0}, rounds=3)
    jumped = last + 64 * NS_PER_S
    poll = 32 * NS_PER_S
    for index in range(12):
        now = jumped + index * poll
        for name in "abc":
            keeper.add_sample(name, sample(2 * NS_PER_S, now))
        keeper.update(now)
        state = keeper.clock_state(now, -20, REFID)
        if now - jumped < 300 * NS_PER_S:
            assert abs(state.offset_ns) < 1 * MS, index
            assert state.synchronized and "jumped +2.000 s" in state.detail
        else:
            assert abs(state.offset_ns - 2 * NS_PER_S) < 1 * MS, index
    assert keeper.pending is None


def test_a_liar_answering_first_is_overruled_as_soon_as_the_others_answer() -> None:
    keeper = TimeKeeper()
    keeper.add_sample("liar", liar(2 * NS_PER_S, T0))
    keeper.update(T0)
    assert keeper.offset_at(T0) == 2 * NS_PER_S      # one source is all there is, for now
    run(keeper, {"liar": lambda now: liar(2 * NS_PER_S, now), "a": 0, "b": 0}, rounds=1,
        start_ns=T0 + 2 * NS_PER_S)
    assert keeper.pending is None and abs(keeper.offset_at(T0 + 2 * NS_PER_S)) < 1 * MS
    assert status(keeper)["liar"] == FALSETICKER


def test_jump_guard_decisions() -> None:
    assert guard_jump(None, 5 * NS_PER_S, T0, None).follow
    assert guard_jump(0, 100 * MS, T0, None).follow
    first = guard_jump(0, 2 * NS_PER_S, T0, None)
    assert not first.follow and first.pending is not None
    later = guard_jump(0, 2 * NS_PER_S + MS, T0 + 299 * NS_PER_S, first.pending)
    assert not later.follow
    assert guard_jump(0, 2 * NS_PER_S, T0 + 300 * NS_PER_S, later.pending).follow
    # A different jump restarts the wait.
    other = guard_jump(0, -3 * NS_PER_S, T0 + 300 * NS_PER_S, later.pending)
    assert not other.follow and other.pending is not None and other.pending.since_ns > T0


def test_beyond_the_panic_threshold_nothing_is_followed_without_the_operator() -> None:
    keeper = TimeKeeper()
    run(keeper, {"a": 1000 * NS_PER_S, "b": 1000 * NS_PER_S, "c": 1000 * NS_PER_S}, 10)
    state = keeper.clock_state(T0 + 600 * NS_PER_S, -20, REFID)
    assert not state.synchronized and "panic threshold" in state.detail
    assert guard_jump(None, 1000 * NS_PER_S, T0, None, allow_panic=True).follow
    trusting = TimeKeeper(KeeperSettings(allow_panic=True))
    run(trusting, {"a": 1000 * NS_PER_S, "b": 1000 * NS_PER_S}, 1)
    assert trusting.offset_at(T0) == 1000 * NS_PER_S


def test_a_liar_at_plus_1000_s_is_just_a_falseticker() -> None:
    keeper = TimeKeeper()
    run(keeper, {"a": 0, "b": 0, "liar": lambda now: liar(1000 * NS_PER_S, now)}, 2)
    assert status(keeper)["liar"] == FALSETICKER
    assert keeper.clock_state(T0 + 64 * NS_PER_S, -20, REFID).synchronized


def test_step_decision_needs_permission_privilege_majority_and_confirmation() -> None:
    big = 60 * NS_PER_S
    stepout = 300 * NS_PER_S
    assert step_decision(big, stepout, 3, True, True) == (True, "step by +60.000 s")
    assert not step_decision(big, stepout, 3, False, True)[0]
    assert not step_decision(big, stepout, 3, True, False)[0]
    assert "one source" in step_decision(big, stepout, 1, True, True)[1]
    assert not step_decision(big, stepout - 1, 3, True, True)[0]
    assert not step_decision(20 * NS_PER_S, stepout, 3, True, True)[0]
    assert not step_decision(2000 * NS_PER_S, stepout, 3, True, True)[0]
    assert step_decision(2000 * NS_PER_S, stepout, 3, True, True, allow_panic=True)[0]


def test_the_keeper_advises_a_step_only_once_confirmed() -> None:
    keeper = TimeKeeper()
    last = run(keeper, {"a": 60 * NS_PER_S, "b": 60 * NS_PER_S}, rounds=3)
    assert not keeper.step_advice(last, True, True)[0]    # 128 s of agreement only
    last = run(keeper, {"a": 60 * NS_PER_S, "b": 60 * NS_PER_S}, rounds=4,
               start_ns=last + 64 * NS_PER_S)
    assert keeper.step_advice(last, True, True)[0]
    keeper.clock_stepped(60 * NS_PER_S)
    assert abs(keeper.offset_at(last)) < 1 * MS
    assert abs(keeper.last_selection.offset_ns or 0) > 0  # the old selection, until the next
    keeper.add_sample("a", sample(0, last + 64 * NS_PER_S))
    keeper.add_sample("b", sample(0, last + 64 * NS_PER_S))
    keeper.update(last + 64 * NS_PER_S)
    assert keeper.pending is None and abs(keeper.offset_at(last + 64 * NS_PER_S)) < 1 * MS


# ---------------------------------------------------------------------- leap seconds

NEW_YEAR = calendar.timegm((2027, 1, 1, 0, 0, 0)) * NS_PER_S


def test_leap_days() -> None:
    assert is_leap_day(NEW_YEAR - NS_PER_S)
    assert not is_leap_day(NEW_YEAR)
    assert is_leap_day(calendar.timegm((2026, 6, 30, 12, 0, 0)) * NS_PER_S)
    assert not is_leap_day(calendar.timegm((2026, 3, 31, 12, 0, 0)) * NS_PER_S)


def test_an_inserted_leap_second_is_applied_at_midnight_and_time_stays_consistent() -> None:
    keeper = TimeKeeper()
    start = NEW_YEAR - 200 * NS_PER_S
    poll = 16 * NS_PER_S

    def upstream(now: int) -> int:
        """Honest servers insert the second: from midnight on they are 1 s behind."""
        return 0 if now < NEW_YEAR else -NS_PER_S

    def leap(now: int) -> Leap:
        return Leap.INSERT_SECOND if now < NEW_YEAR else Leap.NONE

    for index in range(25):
        now = start + index * poll
        for name in "abc":
            keeper.add_sample(name, sample(upstream(now), now, leap=leap(now)))
        keeper.update(now)
        for probe in range(0, 16, 1):
            t = now + probe * NS_PER_S
            state = keeper.clock_state(t, -20, REFID)
            assert state.synchronized
            # Served time is the upstreams' time to the millisecond, and the leap
            # indicator is set exactly until the second is inserted.
            assert abs(state.offset_ns - upstream(t)) < 1 * MS, (index, probe)
            assert state.leap is (Leap.INSERT_SECOND if t < NEW_YEAR else Leap.NONE)
    assert keeper.pending is None


def test_a_leap_announced_by_one_source_of_three_is_ignored() -> None:
    keeper = TimeKeeper()
    start = NEW_YEAR - 100 * NS_PER_S
    for index in range(3):
        now = start + index * 16 * NS_PER_S
        keeper.add_sample("a", sample(0, now, leap=Leap.INSERT_SECOND))
        keeper.add_sample("b", sample(0, now))
        keeper.add_sample("c", sample(0, now))
        keeper.update(now)
    assert keeper.clock_state(NEW_YEAR - NS_PER_S, -20, REFID).leap is Leap.NONE
    assert keeper.offset_at(NEW_YEAR + NS_PER_S) == keeper.offset_at(NEW_YEAR - NS_PER_S)


def test_a_leap_announced_on_another_day_is_not_served() -> None:
    keeper = TimeKeeper()
    run(keeper, {name: (lambda now: sample(0, now, leap=Leap.INSERT_SECOND)) for name in "ab"},
        rounds=2)
    assert keeper.clock_state(T0 + 64 * NS_PER_S, -20, REFID).leap is Leap.NONE
