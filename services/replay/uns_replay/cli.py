"""``uns replay FILE --device PATH``: a recorded file as one device's raw metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from uns import Node
from uns.commands import (
    BrokerOpt,
    ConfigOpt,
    LogOpt,
    broker_target,
    device_path,
    fail,
    load_config,
    run,
    setup_logging,
)
from uns.errors import ConfigError


def replay(
    file: Annotated[Path, typer.Argument(help="A CSV (one column per metric) or an .npz waveform")],
    device: Annotated[str, typer.Option(help="Device path to publish as")],
    time_column: Annotated[
        str | None,
        typer.Option(
            help="CSV column of timestamps (ISO 8601 or epoch s/ms) [default: timestamp/time/ts]"
        ),
    ] = None,
    speed: Annotated[
        float,
        typer.Option(
            min=0.0, help="1 = as recorded, 60 = an hour a minute, 0 = as fast as acknowledged"
        ),
    ] = 1.0,
    interval: Annotated[
        float, typer.Option(help="Seconds between CSV rows without timestamps")
    ] = 1.0,
    rate: Annotated[float | None, typer.Option(help="Sample rate of an .npz (Hz)")] = None,
    block: Annotated[int, typer.Option(min=16, help="Samples per waveform block")] = 1000,
    node_id: Annotated[str, typer.Option("--node", help="Edge node id to publish as")] = "replay",
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Publish a recorded file as one device's raw metrics, with the file's own timestamps."""
    from uns_replay.frames import read_csv, read_npz  # numpy: only once it runs
    from uns_replay.service import ReplaySettings
    from uns_replay.service import replay as run_replay

    setup_logging(log_level)
    path = device_path(device)
    loaded = load_config(config)
    url, _ = broker_target(loaded, broker)
    if not file.exists():
        raise fail(f"{file}: no such file")
    try:
        recording = (
            read_npz(file, rate_hz=rate, block=block)
            if file.suffix == ".npz"
            else read_csv(file, time_column=time_column, interval_s=interval)
        )
        settings = msgspec.convert(
            {"speed": speed, "node_id": node_id, "metrics_port": 0}, ReplaySettings
        )
    except msgspec.ValidationError as exc:
        raise fail(f"--node: {exc}") from None
    except ConfigError as exc:
        raise fail(str(exc)) from None

    async def main(stop: asyncio.Event) -> int:
        node = Node("replay", settings, loaded.config, broker_url=url)
        return await run_replay(node, path, recording, stop)

    sent = run(main)
    typer.echo(f"{sent} messages published to {path}/raw/data", err=True)
