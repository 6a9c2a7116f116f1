"""``uns bench [SCENARIO]...``: the benchmarks, from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uns.commands import LogOpt, fail, setup_logging


def _levels(text: str | None) -> list[int]:
    """``160,240,320`` -> [160, 240, 320]; ValueError saying which part is not a number."""
    if text is None:
        return []
    levels = []
    for part in text.split(","):
        try:
            levels.append(int(part.strip()))
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a number of machines") from None
    return levels


def bench(
    scenarios: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SCENARIO",
            help="broker, vibration, slowtags, alert, bridge, plant, sparkplug, boxes"
            " [default: all]",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="One short run of each at low load: checks the harness")
    ] = False,
    machines: Annotated[
        str | None,
        typer.Option(
            "--machines",
            metavar="N,N,...",
            help="Load levels of vibration (machines) and slowtags (devices): one row each;"
            " the first that loses anything or misses its latency target is the knee",
        ),
    ] = None,
    brokers: Annotated[
        str | None,
        typer.Option(
            "--brokers",
            metavar="amqtt,mosquitto",
            help="What vibration (and boxes) runs on, each level on each"
            " [default: every level on amqtt, 160 and 320 on Mosquitto too; quick: amqtt]",
        ),
    ] = None,
    boxes: Annotated[
        str | None,
        typer.Option(
            "--boxes",
            metavar="N,N,...",
            help="Levels of the boxes scenario: synthetic edge boxes bridging into one"
            " central broker, one row each [default: 10,40,100]",
        ),
    ] = None,
    box_machines: Annotated[
        int | None,
        typer.Option(
            "--box-machines",
            metavar="N",
            help="Machines per synthetic box [default: the example plant's six]",
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write every figure to this file")
    ] = None,
    log_level: LogOpt = "WARNING",
) -> None:
    """Measure the pipeline on this machine: services as processes, load from another one;
    loss first, then rates, latencies, CPU and peak RSS per service, as a Markdown table."""
    from uns_bench.main import SCENARIOS, check_boxes, check_brokers, check_machines
    from uns_bench.main import run as run_bench

    setup_logging(log_level)
    unknown = [s for s in scenarios or [] if s not in SCENARIOS]
    if unknown:
        raise fail(f"no scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    try:
        levels = _levels(machines)
        check_machines(levels, scenarios or [])
    except ValueError as exc:
        raise fail(f"--machines: {exc}") from None
    on = [b.strip() for b in brokers.split(",")] if brokers is not None else []
    try:
        check_brokers(on, scenarios or [])
    except ValueError as exc:
        raise fail(f"--brokers: {exc}") from None
    try:
        counts = _levels(boxes)
        check_boxes(counts, box_machines, scenarios or [])
    except ValueError as exc:
        raise fail(f"--boxes: {str(exc).replace('of machines', 'of boxes')}") from None
    run_bench(
        scenarios or [],
        quick=quick,
        machines=levels,
        brokers=on,
        boxes=counts,
        box_machines=box_machines,
        json_path=json_out,
        say=typer.echo,
    )
