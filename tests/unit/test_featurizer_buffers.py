"""The slow-tag buffers (12 bytes a held sample) against numpy on the raw samples: every
window's values, timestamps, counts and source seqs, and the statistics made of them, on
random streams with NaN, bad quality, duplicates, out-of-order samples, gaps and windows
rolling over thousands of times."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from uns import DeviceData, Metric, connect, decode, encode
from uns.testing import running, watching
from uns_featurizer import Featurizer
from uns_featurizer.features import slow_features, waveform_features
from uns_featurizer.windows import SlowWindow, TimeBounds

T0 = 1_764_000_000_000


def stream(r: random.Random, n: int) -> list[tuple[int, float, bool, int | None]]:
    """(ts, value, good, seq): mostly 10 Hz, with repeats, steps back, gaps and bad values
    around a large offset (where a sum of squares would lose the variance)."""
    out = []
    ts = T0 + r.randrange(100_000)
    for i in range(n):
        u = r.random()
        if u < 0.03:
            step = 0  # a duplicate
        elif u < 0.06:
            step = -r.randrange(1, 500)  # out of order
        elif u < 0.07:
            step = r.randrange(30_000, 400_000)  # a gap: windows with nothing in them
        else:
            step = r.randrange(1, 300)
        ts += step
        v = (
            r.choice([float("nan"), float("inf"), -float("inf")])
            if r.random() < 0.05
            else (1e6 + r.gauss(0, 1))
        )
        seq = None if r.random() < 0.05 else i % 256
        out.append((ts, v, r.random() > 0.08, seq))
    return out


def accepted(samples: list[tuple[int, float, bool, int | None]]) -> list[tuple[int, float, int]]:
    """What a window may hold: good, finite, strictly later than the last one held."""
    held: list[tuple[int, float, int]] = []
    for ts, v, good, seq in samples:
        if good and math.isfinite(v) and (not held or ts > held[-1][0]):
            held.append((ts, v, -1 if seq is None else seq))
    return held


@pytest.mark.parametrize("seed", range(12))
def test_every_window_holds_exactly_the_samples_numpy_would_and_their_statistics(seed):
    r = random.Random(seed)
    length, hop = r.choice([(60_000, 10_000), (20_000, 10_000), (5_000, 10_000), (7_000, 3_000)])
    phase = r.randrange(hop)
    samples = stream(r, 3_000)
    w = SlowWindow(length_ms=length, hop_ms=hop, phase_ms=phase)
    out, closed_by = [], []
    for i, (ts, v, good, seq) in enumerate(samples):
        windows = w.add(ts, v, good=good, seq=seq, node="a")
        out += windows
        closed_by += [i] * len(windows)
    held = accepted(samples)
    ts_all = np.array([h[0] for h in held])
    last_seen = max(s[0] for s in samples)
    first_end = ((samples[0][0] - phase) // hop + 1) * hop + phase
    want_ends = [
        e
        for e in range(first_end, last_seen + 1, hop)
        if ((ts_all >= e - length) & (ts_all < e)).any()
    ]
    assert [prov.end for _, _, prov in out] == want_ends
    assert len(out) > 30  # the buffers rolled over many times
    for (ts, values, prov), i in zip(out, closed_by, strict=True):
        # a sample later than the one that closed the window is not in it, even when it
        # is stamped within it (a step back after a bad sample ahead): the tag's next
        # windows have it
        inside = [h for h in accepted(samples[:i]) if prov.start <= h[0] < prov.end]
        assert prov.start == prov.end - length
        assert ts.tolist() == [h[0] for h in inside]
        assert values.tolist() == [h[1] for h in inside]  # bit for bit
        assert prov.good == len(inside) and prov.total >= prov.good
        assert (prov.seq_first, prov.seq_last) == tuple(
            None if s < 0 else s for s in (inside[0][2], inside[-1][2])
        )
        x, t = np.array([h[1] for h in inside]), np.array([h[0] for h in inside], dtype=float)
        feats = slow_features(ts, values)
        assert feats["mean"] == pytest.approx(np.mean(x), rel=1e-15)
        assert feats["std"] == pytest.approx(np.std(x), rel=1e-9, abs=1e-12)
        assert (feats["min"], feats["max"]) == (x.min(), x.max())
        if len(x) >= 2:
            slope = np.polyfit((t - t[0]) / 60_000, x, 1)[0]
            assert feats["slope_per_min"] == pytest.approx(slope, rel=1e-6, abs=1e-9)


def test_a_window_over_hours_keeps_its_times_and_seqs_in_the_wide_layout():
    w = SlowWindow(length_ms=3 * 3_600_000, hop_ms=3_600_000)  # 4 h: past 2**23 ms
    out = []
    for i in range(0, 6 * 3_600, 7):  # one sample every 7 s for 6 hours
        out += w.add(T0 + i * 1000, float(i), good=True, seq=i % 256, node="a")
    assert len(out) == 5 and w.nbytes == 16 * w.held
    ts, values, prov = out[-1]
    want = [i for i in range(0, 6 * 3_600, 7) if prov.start <= T0 + i * 1000 < prov.end]
    assert values.tolist() == [float(i) for i in want]
    assert ts.tolist() == [T0 + i * 1000 for i in want]
    assert (prov.seq_first, prov.seq_last) == (want[0] % 256, want[-1] % 256)


def test_a_held_sample_costs_twelve_bytes():
    w = SlowWindow(length_ms=60_000, hop_ms=10_000)
    for i in range(1_000):
        w.add(T0 + i * 100, 20.0 + i, good=True, seq=i % 256, node="a")
    assert w.held == 700 and w.nbytes == 12 * 700  # 60 s + the hop being filled, at 10 Hz


def test_a_tag_that_appears_mid_window_gets_the_samples_it_has():
    w = SlowWindow(length_ms=60_000, hop_ms=10_000)
    out = []
    for i in range(250, 800):  # first sample 25 s into the window ending at 60 s
        out += w.add(T0 - T0 % 10_000 + i * 100, float(i), good=True, seq=i % 256, node="a")
    first = out[0][2]
    assert first.good == len(out[0][1]) and out[0][1][0] == 250.0
    assert first.seq_first == 250 % 256


@pytest.mark.parametrize("seed", range(6))
def test_the_one_call_path_takes_and_refuses_exactly_what_add_does(seed):
    r = random.Random(seed)
    samples = stream(r, 3_000)
    for k in r.sample(range(len(samples)), 30):  # stamps far off: refused, or held to resync
        ts, v, good, seq = samples[k]
        samples[k] = (ts + r.choice([10**9, -(10**10), 10**13]), v, good, seq)
    bounds = TimeBounds(max_jump_ms=600_000)
    a = SlowWindow(length_ms=60_000, hop_ms=10_000, phase_ms=1234, bounds=bounds)
    b = SlowWindow(length_ms=60_000, hop_ms=10_000, phase_ms=1234, bounds=bounds)
    got_a, got_b = [], []
    for i, (ts, v, good, seq) in enumerate(samples):
        now = T0 + 400_000 + i * 150
        got_a += a.add(ts, v, good=good, seq=seq, node="n", now_ms=now)
        got_b += b.push(ts, v, good, seq, "n", now) or []
    assert len(got_a) > 10
    assert [(t.tolist(), x.tolist(), p) for t, x, p in got_a] == [
        (t.tolist(), x.tolist(), p) for t, x, p in got_b
    ]
    assert a.excluded.counts == b.excluded.counts and a.excluded.counts["timestamp"] > 0


@pytest.mark.parametrize("seed", range(5))
def test_waveform_statistics_match_their_textbook_formulas(seed):
    """The moments come from c*c products, not c**4 (100 times slower): the same values."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(4, 10_000) * 10.0 ** rng.integers(-3, 4) + rng.normal()).astype(np.float32)
    feats = waveform_features(x, 10_000.0, bands=((10.0, 1000.0),), shaft_hz=25.0)
    v = x.astype(np.float64)
    c = v - v.mean()
    var = np.mean(c**2)
    assert feats["kurtosis"] == pytest.approx(np.mean(c**4) / var**2, rel=1e-12)
    assert feats["skewness"] == pytest.approx(np.mean(c**3) / var**1.5, rel=1e-9, abs=1e-12)
    assert feats["std"] == pytest.approx(np.std(v), rel=1e-12)
    assert feats["rms"] == pytest.approx(np.sqrt(np.mean(v**2)), rel=1e-12)
    spectrum = np.abs(np.fft.rfft(c))
    assert feats["dominant_hz"] == np.fft.rfftfreq(10_000, 1e-4)[1 + np.argmax(spectrum[1:])]


async def test_a_tag_appearing_mid_window_is_published_with_its_own_statistics_and_counts(
    memory_url, prefix
):
    device = f"{prefix}/pune/stamping/line-3/cell-a/press-01"
    t0 = 1_700_000_000_000
    sent: dict[str, list[tuple[int, float, int]]] = {"early": [], "late": []}
    async with (
        running(
            Featurizer,
            memory_url,
            prefix,
            plant=[(device, "press")],
            slow={"window_s": 2, "hop_s": 1, "stagger": False},
        ) as node,
        watching(memory_url, f"{prefix}/+/+/+/+/+/features/data") as w,
        connect(memory_url) as pub,
    ):
        r = random.Random(7)
        for i in range(45):  # 4.5 s at 10 Hz; "late" starts 1.5 s in, mid-window
            metrics = [Metric(name="early", value=r.gauss(50, 3))]
            if i >= 15:
                metrics.append(Metric(name="late", value=r.gauss(-7, 1)))
            for m in metrics:
                sent[m.name].append((t0 + i * 100, m.value, i))
            data = DeviceData(ts=t0 + i * 100, node="adapter", seq=i, metrics=metrics)
            await pub.publish(f"{device}/raw/data", encode(data), qos=1)
        await w.wait_for(lambda _: sum(1 for _ in w.seen) >= 4)  # ends at 1, 2, 3, 4 s
        registry = node.metrics.registry
        held = registry.get_sample_value(
            "uns_featurizer_slow_samples_held", {"service": "featurizer"}
        )
        nbytes = registry.get_sample_value(
            "uns_featurizer_slow_held_bytes", {"service": "featurizer"}
        )
    assert held and nbytes == 12 * held
    messages: list[DeviceData] = [decode(m.payload, DeviceData) for m in w.seen]
    assert [m.window.end for m in messages] == [t0 + 1000 * k for k in (1, 2, 3, 4)]
    assert "late" not in messages[0].signals  # nothing of it in the first window
    for msg in messages[1:]:
        assert msg.window is not None and msg.signals is not None
        values = {x.name: x.value for x in msg.metrics}
        for tag, samples in sent.items():
            inside = [s for s in samples if msg.window.start <= s[0] < msg.window.end]
            x = np.array([s[1] for s in inside])
            p = msg.signals[tag]
            assert (p.good, p.seq_first, p.seq_last) == (len(x), inside[0][2], inside[-1][2])
            assert values[f"{tag}.mean"] == pytest.approx(np.mean(x), abs=1e-8)
            assert values[f"{tag}.std"] == pytest.approx(np.std(x), abs=1e-8)
            assert (values[f"{tag}.min"], values[f"{tag}.max"]) == (
                round(x.min(), 9),
                round(x.max(), 9),
            )


@pytest.mark.parametrize("first", ["bad", "nan", "good"])
def test_a_tag_back_after_hours_of_silence_is_windowed_from_its_new_samples(first):
    """The held times are counted from a base that must move with the buffer: after 3
    hours (past the 2.3 h a 4-byte time holds) a tag comes back, first with ``first``."""
    bounds = TimeBounds()
    w = SlowWindow(length_ms=60_000, hop_ms=10_000, bounds=bounds)
    out = []
    for i in range(100):
        out += w.push(T0 + i * 100, 1.0, True, i % 256, "n", T0 + i * 100) or []
    back = T0 + 3 * 3_600_000
    value = float("nan") if first == "nan" else 2.0
    out += w.push(back, value, first == "good", 0, "n", back) or []
    for i in range(1, 200):
        out += w.push(back + i * 100, 3.0, True, i % 256, "n", back + i * 100) or []
    assert [p.end for _, _, p in out] == [T0 + k * 10_000 for k in range(1, 7)] + [back + 10_000]
    ts, values, prov = out[-1]
    assert ts[0] == (back if first == "good" else back + 100) and ts[-1] == back + 9_900
    assert set(values.tolist()) <= {2.0, 3.0} and prov.good == len(values)


@pytest.mark.parametrize("via", ["add", "push"])
def test_a_sample_stamped_hours_before_the_windows_moved_on_neither_overflows_nor_shows(via):
    """A bad sample 3 hours on moves the windows on; a good one stamped just after the last
    held is still held (as before), but in no window; the windows go on."""
    w = SlowWindow(length_ms=60_000, hop_ms=10_000, bounds=TimeBounds())
    a = SlowWindow(length_ms=60_000, hop_ms=10_000)  # the same samples, without the clock

    plain: list = []

    def feed(ts: int, v: float, good: bool = True) -> list:
        plain.extend(a.add(ts, v, good=good, seq=1, node="n"))
        if via == "push":
            return w.push(ts, v, good, 1, "n", ts) or []
        return w.add(ts, v, good=good, seq=1, node="n", now_ms=ts)

    out = []
    for i in range(100):
        out += feed(T0 + i * 100, 1.0)
    back = T0 + 3 * 3_600_000
    out += feed(back, 2.0, good=False)
    out += feed(T0 + 60_000, 5.0)  # after the last held one: held, though late
    for i in range(1, 200):
        out += feed(back + i * 100, 3.0)
    ts, values, prov = out[-1]
    assert prov.end == back + 10_000 and set(values.tolist()) == {3.0}
    assert ts[0] == back + 100 and prov.good == 99
    assert [(t.tolist(), x.tolist(), p) for t, x, p in out] == [
        (t.tolist(), x.tolist(), p) for t, x, p in plain
    ]
    w.reset("device_death")
    assert w.excluded.counts["device_death"] == 199  # held since that close
