"""Run the scenarios, compare their rates with the broker ceilings, find the knees, print
the table, write the JSON."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from uns_bench import alert, boxes, bridge, broker, plant, slowtags, sparkplug, vibration
from uns_bench.context import Context
from uns_bench.procs import in_process, shutdown_pool
from uns_bench.report import (
    Row,
    compare_with_ceilings,
    machine,
    mark_knees,
    markdown,
    write_json,
)

Scenario = Callable[[Context], Awaitable[list[Row]]]

SCENARIOS: dict[str, Scenario] = {
    "broker": broker.run,
    "vibration": vibration.run,
    "slowtags": slowtags.run,
    "alert": alert.run,
    "bridge": bridge.run,
    "plant": plant.run,
    "sparkplug": sparkplug.run,
    "boxes": boxes.run,
}
LEVELLED = ("vibration", "slowtags")
"""The scenarios with a load level in machines (``--machines``)."""
RATED = ("vibration", "slowtags", "bridge", "boxes")
"""The scenarios whose rows carry a rate through a broker, compared with its ceiling."""


def check_brokers(brokers: list[str], names: list[str]) -> tuple[str, ...]:
    """The brokers to run vibration (and boxes) on, once each; ValueError for one the
    harness cannot start, or for brokers given to a run without either."""
    unknown = [b for b in brokers if b not in broker.BROKERS]
    if unknown:
        raise ValueError(f"no broker {unknown[0]!r}; known: {', '.join(broker.BROKERS)}")
    if brokers and names and not {"vibration", "boxes"} & set(names):
        raise ValueError("only vibration and boxes run on the broker of your choice")
    return tuple(dict.fromkeys(brokers))


def check_machines(levels: list[int], names: list[str]) -> tuple[int, ...]:
    """The levels ascending, once each; ValueError for a level below 1, or for levels given
    to scenarios that have none."""
    bad = [n for n in levels if n < 1]
    if bad:
        raise ValueError(f"a level is a number of machines, 1 or more; not {bad[0]}")
    if levels and names and not set(names) & set(LEVELLED):
        raise ValueError(f"only {' and '.join(LEVELLED)} have machine levels")
    return tuple(sorted(set(levels)))


def check_boxes(counts: list[int], per_box: int | None, names: list[str]) -> tuple[int, ...]:
    """The box counts ascending, once each; ValueError for a count or a machines-per-box
    below 1, or for either given to a run without the boxes scenario."""
    bad = [n for n in [*counts, *([per_box] if per_box is not None else [])] if n < 1]
    if bad:
        raise ValueError(f"a number of boxes or machines is 1 or more; not {bad[0]}")
    if (counts or per_box is not None) and names and "boxes" not in names:
        raise ValueError("only the boxes scenario has boxes")
    return tuple(sorted(set(counts)))


def run(
    names: list[str],
    *,
    quick: bool = False,
    machines: list[int] | None = None,
    brokers: list[str] | None = None,
    boxes: list[int] | None = None,
    box_machines: int | None = None,
    json_path: Path | None = None,
    say: Callable[[str], None] = print,
) -> list[Row]:
    """``machines``: the load levels of the scenarios that have one (`LEVELLED`), each a
    row; the first that loses anything or misses its target is marked as the knee.
    ``brokers``: what vibration runs on (amqtt, mosquitto; each level on each).
    ``boxes``, ``box_machines``: the boxes scenario's levels and machines per box."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"no scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    levels = check_machines(machines or [], names)
    on = check_brokers(brokers or [], names)
    counts = check_boxes(boxes or [], box_machines, names)
    chosen = names or list(SCENARIOS)
    started = time.monotonic()
    before = machine()
    keep = os.environ.get("UNS_BENCH_DIR")  # keep the services' logs and configs there
    with tempfile.TemporaryDirectory(prefix="uns-bench-") as tmp:
        workdir = Path(keep) if keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = Context(
            workdir,
            quick=quick,
            repeats=1 if quick else 3,
            say=say,
            machines=levels,
            brokers=on,
            boxes=counts,
            box_machines=box_machines,
        )
        rows = asyncio.run(_run(ctx, chosen, before))
    compare_with_ceilings(rows, ctx.ceiling, broker.BROKERS)
    knees = mark_knees(rows)
    elapsed = time.monotonic() - started
    say("")
    say(markdown(rows, knees))
    say(f"\n{'quick ' if quick else ''}run of {', '.join(chosen)} in {elapsed:.0f} s")
    if json_path is not None:
        write_json(
            json_path,
            rows,
            {
                "machine": before,
                "scenarios": chosen,
                "quick": quick,
                "repeats": ctx.repeats,
                "machines": list(levels),
                "brokers": list(on),
                "boxes": list(counts),
                "box_machines": box_machines,
                "ceiling": ctx.ceiling,
                "ceiling_source": (
                    ("broker scenario" if "broker" in chosen else "quick") if ctx.ceiling else None
                ),
                "knees": knees,
                "seconds": elapsed,
            },
        )
        say(f"figures written to {json_path}")
    return rows


async def _run(ctx: Context, names: list[str], m: dict[str, Any]) -> list[Row]:
    ctx.say(
        f"uns bench on {m['cpus']} x {m['cpu_model']}, {m['memory_gib']} GiB, Python {m['python']};"
        f" load average {m['load_average'][0]:.2f}"
    )
    await in_process(os.getpid)  # the load process starts now, not inside a measurement
    rows: list[Row] = []
    try:
        if "broker" not in names and set(names) & set(RATED):
            ctx.say("broker ceilings (quick, for the rates' ratios):")
            await broker.quick_ceiling(ctx)
        for name in names:
            ctx.say(f"{name}:")
            t0 = time.monotonic()
            rows += await SCENARIOS[name](ctx)
            ctx.say(f"  ({time.monotonic() - t0:.0f} s)")
    finally:
        shutdown_pool()
    return rows
