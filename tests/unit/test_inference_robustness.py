"""Inference's own state against restarts and edits: open events kept across a restart,
the keyed audit chain."""

from __future__ import annotations

import pytest

from uns_inference import events
from uns_inference.events import EventState, Hysteresis, OpenEvent

H = Hysteresis.of(raise_=2.0, clear=1.5, min_raise_s=3, min_clear_s=3, critical=4.0)


def feed(state: EventState, start: int, scores: list[float]) -> list[str]:
    out = []
    for i, score in enumerate(scores):
        t = state.update(start + i * 1000, score, H)
        if t is not None:
            out.append(t.state)
    return out


def test_an_open_event_saved_and_reopened_goes_on_and_clears_with_its_start_and_peak() -> None:
    before = EventState()
    assert feed(before, 0, [1.0, 3.0, 3.0, 3.0, 3.0, 5.0, 1.0, 3.0]) == ["raised"]
    saved = events.decode_open(
        events.encode_open([OpenEvent.of("a/b/c/d/e/f", "anomaly", "ev-1", "x,y", before)])
    )
    assert [e.id for e in saved] == ["ev-1"] and saved[0].count == 2 and saved[0].peak == 5.0
    after = EventState()
    after.reopen(saved[0])
    assert after.is_open
    assert feed(after, 100_000, [3.0, 3.0]) == []  # still faulty: nothing new is raised
    t = None
    for i in range(5):
        t = after.update(102_000 + i * 1000, 1.0, H) or t
    assert t is not None and t.state == "cleared"
    assert t.started == 1000 and t.peak == 5.0 and t.count == 2


@pytest.mark.parametrize(
    "data", [b"", b"{", b'{"v": 2, "events": []}', b'{"events": [{"id": 1}]}', b"[]"]
)
def test_a_state_file_that_cannot_be_read_says_why(data: bytes) -> None:
    with pytest.raises(ValueError):
        events.decode_open(data)
