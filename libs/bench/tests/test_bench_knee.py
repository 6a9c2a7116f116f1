"""What `uns bench` reports from its rows: the knee of each series of load levels (the first
that lost anything or missed its target) and every rate against the broker ceilings."""

from __future__ import annotations

from pathlib import Path

from uns_bench.context import Context
from uns_bench.report import Row, compare_with_ceilings, mark_knees, markdown
from uns_bench.vibration import p99_target_ms, plan


def level(machines: int, p99_ms: float, lost: int = 0) -> Row:
    return Row(
        "2 vibration",
        f"{machines} machines",
        f"{machines * 10} blocks/s",
        lost,
        figures={"latency p99 ms": p99_ms, "blocks/s": machines * 10.0},
        level=machines,
        unit="machines",
        series="amqtt",
        limits={"latency p99 ms": p99_target_ms(machines)},
        rate="blocks/s",
        kind="block",
    )


def test_the_knee_is_the_first_level_that_passed_its_latency_target() -> None:
    rows = [level(320, 90.0), level(160, 40.0), level(240, 120.0), level(400, 500.0, lost=21)]
    knees = mark_knees(rows)
    assert [r.level for r in rows if r.knee] == [240]
    assert knees == [
        "knee of 2 vibration, amqtt: 240 machines, latency p99 ms 120 > 100 (160 machines held)"
    ]
    table = markdown(rows, knees)
    assert "| 240 machines **(knee)** |" in table
    assert "- knee of 2 vibration, amqtt: 240 machines" in table


def test_a_level_that_lost_anything_is_the_knee_whatever_its_latency() -> None:
    rows = [level(2, 10.0), level(4, 12.0, lost=3)]
    assert mark_knees(rows) == ["knee of 2 vibration, amqtt: 4 machines, lost 3 (2 machines held)"]


def test_every_level_held_says_so_up_to_the_last() -> None:
    rows = [level(2, 10.0), level(4, 12.0)]
    assert mark_knees(rows) == [
        "no knee in 2 vibration, amqtt: nothing lost, latency p99 ms within target at every level"
        " up to 4 machines"
    ]
    assert not any(r.knee for r in rows)


def test_the_targets_are_50_ms_up_to_160_machines_and_100_ms_beyond() -> None:
    assert [p99_target_ms(m) for m in (1, 160, 161, 320, 400)] == [50, 50, 100, 100, 100]


def test_vibration_runs_the_targets_levels_on_mosquitto_too_unless_told() -> None:
    def ctx(quick: bool = False, machines: tuple[int, ...] = (), brokers: tuple[str, ...] = ()):
        return Context(Path("."), quick, 3, print, machines=machines, brokers=brokers)

    amqtt = [("amqtt", m) for m in (1, 10, 40, 80, 160, 320)]
    assert plan(ctx()) == [*amqtt, ("mosquitto", 160), ("mosquitto", 320)]
    assert plan(ctx(quick=True)) == [("amqtt", 2)]
    assert plan(ctx(machines=(240,))) == [("amqtt", 240)]
    assert plan(ctx(machines=(2, 4), brokers=("mosquitto",))) == [
        ("mosquitto", 2),
        ("mosquitto", 4),
    ]


def test_rows_without_a_level_have_no_knee() -> None:
    assert mark_knees([Row("5 bridge", "journal alone", "", 5)]) == []


def test_each_rate_is_a_fraction_of_both_ceilings_or_na() -> None:
    rows = [level(160, 40.0), Row("6 example plant", "uns up", "", 0)]
    compare_with_ceilings(rows, {"amqtt/block": 6400.0}, ("amqtt", "mosquitto"))
    assert rows[0].of_ceiling == {"amqtt": 0.25, "mosquitto": None}
    assert rows[1].of_ceiling == {}  # no broker rate
    assert "| amqtt 0.25, mosquitto n/a (blocks/s, block ceiling) |" in markdown(rows)


def test_a_back_fill_drained_between_two_polls_is_timed_from_the_last_poll_that_saw_none() -> None:
    from uns_bench.bridge import _backfill_rate

    # 1,990 of 2,000 forwarded by the first poll that saw any: the last 10 say nothing of
    # the pace (their rate, 10 / 0.05 s, was once reported as the back-fill's)
    times = [(0.0, 0.0), (0.05, 0.0), (0.10, 1990.0), (0.15, 2000.0), (0.20, 2001.0)]
    rate, started, t_done, polls = _backfill_rate(times, 2000)
    assert (rate, started, t_done, polls) == (20_000.0, 0.05, 0.15, 2)
    # a drain over many polls: from the first that saw deliveries to the one that saw all
    steady = [(0.0, 0.0), *((0.1 * k, 1000.0 * k) for k in range(1, 6))]
    assert _backfill_rate(steady, 5000)[::3] == (10_000.0, 0)
