"""The hysteresis of anomaly events: one raised per onset, blips ignored, storms absorbed."""

from __future__ import annotations

from uns_inference.events import EventState, Hysteresis, Transition

H = Hysteresis.of(raise_=5.0, clear=3.0, min_raise_s=3.0, min_clear_s=5.0, critical=10.0)
T0 = 1_795_334_400_000


def feed(state: EventState, scores: list[float], start: int = 0) -> list[Transition]:
    """One score per second of data time."""
    out = []
    for i, score in enumerate(scores):
        t = state.update(T0 + (start + i) * 1000, score, H)
        if t is not None:
            out.append(t)
    return out


def test_a_sustained_breach_raises_one_event_after_the_minimum_duration() -> None:
    state = EventState()
    events = feed(state, [1, 1, 6, 6, 6, 6, 7, 8, 6, 6, 6, 6])
    assert [e.state for e in events] == ["raised"]
    raised = events[0]
    assert raised.started == T0 + 2000  # the first breaching window
    assert raised.ts == T0 + 5000  # 3 s later
    assert raised.count == 1 and raised.severity == "warning"
    assert state.is_open


def test_a_blip_shorter_than_the_minimum_duration_raises_nothing() -> None:
    state = EventState()
    assert feed(state, [1, 9, 9, 1, 1, 9, 9, 9, 2, 1]) == []
    assert not state.is_open


def test_breaches_while_open_only_increment_the_count() -> None:
    state = EventState()
    scores = [6, 6, 6, 6]  # raised
    scores += [4, 6, 4, 6, 2, 2, 6, 6]  # three more crossings, dips below clear shorter than 5 s
    events = feed(state, scores)
    assert [e.state for e in events] == ["raised"]
    assert state.count == 4


def test_healthy_for_the_minimum_duration_clears_with_the_same_onset_count_and_peak() -> None:
    state = EventState()
    events = feed(state, [6, 6, 6, 6, 12, 4, 6, 2, 2, 2, 2, 2, 2, 2])
    assert [e.state for e in events] == ["raised", "cleared"]
    raised, cleared = events
    assert cleared.started == raised.started
    assert cleared.count == 2
    assert cleared.score == cleared.peak == 12
    assert cleared.severity == "critical"
    assert cleared.ts == T0 + 12_000  # 5 s after the first healthy window (t=7)
    assert not state.is_open


def test_between_clear_and_raise_an_open_event_stays_open() -> None:
    state = EventState()
    events = feed(state, [6, 6, 6, 6] + [4] * 30)
    assert [e.state for e in events] == ["raised"]


def test_a_new_onset_after_clearing_raises_a_new_event() -> None:
    state = EventState()
    events = feed(state, [6] * 4 + [1] * 6 + [7] * 4)
    assert [e.state for e in events] == ["raised", "cleared", "raised"]
    assert events[2].started == T0 + 10_000 and events[2].count == 1


def test_a_critical_score_raises_a_critical_event() -> None:
    state = EventState()
    (raised,) = feed(state, [11, 11, 11, 11])
    assert raised.severity == "critical"


def test_without_a_minimum_duration_the_first_breach_raises() -> None:
    h = Hysteresis.of(raise_=5.0, clear=3.0, min_raise_s=0, min_clear_s=0, critical=10.0)
    state = EventState()
    raised = state.update(T0, 6.0, h)
    assert raised is not None and raised.state == "raised"
    cleared = state.update(T0 + 1000, 1.0, h)
    assert cleared is not None and cleared.state == "cleared"
