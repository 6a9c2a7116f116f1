"""``uns replay FILE --device PATH``: a recorded file as one device's raw metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import typer

from uns import Node
from uns.commands import (
    BrokerOpt,
    ConfigOpt,
    LogOpt,
    Stop,
    broker_target,
    device_path,
    fail,
    load_config,
    run,
    setup_logging,
)
from uns.errors import ConfigError

if TYPE_CHECKING:
    from uns_replay.service import Replayed

log = logging.getLogger(__name__)


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
    delimiter: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="CSV delimiter: one character, or tab (sniffed among , ; tab | when absent)",
        ),
    ] = None,
    columns: Annotated[
        list[str] | None,
        typer.Option(
            "--columns",
            show_default=False,
            help="Publish only these columns (or .npz arrays), by name; repeat or comma-separate",
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore",
            show_default=False,
            help="Never publish these columns (a data set's labels); repeat or comma-separate",
        ),
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Sample rate of an .npz (Hz)")] = None,
    block: Annotated[int, typer.Option(min=16, help="Samples per waveform block")] = 1000,
    node_id: Annotated[str, typer.Option("--node", help="Edge node id to publish as")] = "replay",
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Publish a recorded file as one device's raw metrics, with the file's own timestamps;
    then the device's raw death (reason "end of replay: N rows, M seen back") says it is over
    and the last line how many rows the broker took. Exit 1 when it did not take them all,
    2 when the file has nothing to replay."""
    from uns_replay.frames import (
        delimiter_option,
        labels_among,
        nonempty,
        read_csv,
        read_npz,
    )
    from uns_replay.service import ReplaySettings
    from uns_replay.service import replay as run_replay

    setup_logging(log_level)
    path = device_path(device)
    loaded = load_config(config)
    url, _ = broker_target(loaded, broker)
    if not file.exists():
        raise fail(f"{file}: no such file")
    only, never = _names(columns), _names(ignore)
    try:
        if file.suffix == ".npz":
            recording = read_npz(file, rate_hz=rate, block=block, columns=only, ignore=never)
        else:
            recording = read_csv(
                file,
                time_column=time_column,
                interval_s=interval,
                delimiter=None if delimiter is None else delimiter_option(delimiter),
                columns=only,
                ignore=never,
            )
        recording = nonempty(recording, file)
        settings = msgspec.convert(
            {"speed": speed, "node_id": node_id, "metrics_port": 0}, ReplaySettings
        )
    except msgspec.ValidationError as exc:
        raise fail(f"--node: {exc}") from None
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if labels := labels_among(recording):
        log.warning(
            "%s: named like labels, yet published as metrics: %s (--ignore %s keeps them out)",
            file.name,
            ", ".join(labels),
            ",".join(labels),
        )
    log.info(
        "%s: publishing %s as %s/raw/data%s",
        file.name,
        ", ".join(recording.columns),
        path,
        f" (time column {recording.time_column})" if recording.time_column else "",
    )

    async def main(stop: Stop) -> tuple[Replayed, Stop]:
        node = Node("replay", settings, loaded.config, broker_url=url)
        return await run_replay(node, path, recording, stop), stop

    done, stop = run(main)
    if not done.finished:
        typer.echo(
            f"stopped: {done.sent} rows published to {path}/raw/data before the end of"
            f" {file.name}, {done.seen_back} seen back from the broker",
            err=True,
        )
        raise typer.Exit(stop.exit_code or 1)
    typer.echo(
        f"{done.sent} rows published to {path}/raw/data, all {done.seen_back} seen back"
        " from the broker",
        err=True,
    )


def _names(given: list[str] | None) -> list[str]:
    """``--columns a,b --columns c`` -> ``[a, b, c]``."""
    return [n.strip() for g in given or () for n in g.split(",") if n.strip()]
