"""Run the scenarios, print the table, write the JSON."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from uns_bench import alert, bridge, broker, plant, slowtags, vibration
from uns_bench.context import Context
from uns_bench.procs import in_process, shutdown_pool
from uns_bench.report import Row, machine, markdown, write_json

Scenario = Callable[[Context], Awaitable[list[Row]]]

SCENARIOS: dict[str, Scenario] = {
    "broker": broker.run,
    "vibration": vibration.run,
    "slowtags": slowtags.run,
    "alert": alert.run,
    "bridge": bridge.run,
    "plant": plant.run,
}


def run(
    names: list[str],
    *,
    quick: bool = False,
    json_path: Path | None = None,
    say: Callable[[str], None] = print,
) -> list[Row]:
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"no scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    chosen = names or list(SCENARIOS)
    started = time.monotonic()
    before = machine()
    keep = os.environ.get("UNS_BENCH_DIR")  # keep the services' logs and configs there
    with tempfile.TemporaryDirectory(prefix="uns-bench-") as tmp:
        workdir = Path(keep) if keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = Context(workdir, quick=quick, repeats=1 if quick else 3, say=say)
        rows = asyncio.run(_run(ctx, chosen, before))
    elapsed = time.monotonic() - started
    say("")
    say(markdown(rows))
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
        for name in names:
            ctx.say(f"{name}:")
            rows += await SCENARIOS[name](ctx)
    finally:
        shutdown_pool()
    return rows
