"""``uns eval``: how many faults a model catches and how many false alarms it raises.

Light to import (``uns --help`` lists the command): numpy is imported when it runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uns.commands import fail

if TYPE_CHECKING:
    from uns_eval.scoring import Interval


def evaluate_files(
    recording: Path,
    *,
    labels: Path | None = None,
    labels_key: str | None = None,
    label_column: str | None = None,
    time_column: str | None = None,
    delimiter: str | None = None,
    devices: tuple[str, ...] = (),
    start: str | None = None,
    end: str | None = None,
    failures: Path | None = None,
    rul_cap: float | None = None,
    rul_unit: str = "h",
) -> dict[str, Any]:
    """The report of ``uns eval`` (what ``--json`` writes); `EvalError` names a bad input.

    ``make eval`` calls this too, so a user's figures and the README's come from one code."""
    from uns_eval import scoring

    if label_column is not None and labels is None:
        raise scoring.EvalError("--label-column: give --labels FILE.csv that holds the column")
    if rul_unit not in scoring.UNIT_MS:
        raise scoring.EvalError(f"--rul-unit: {rul_unit!r} is not one of s, min, h, d")
    if rul_cap is not None and not (math.isfinite(rul_cap) and rul_cap > 0):
        raise scoring.EvalError(f"--rul-cap: {rul_cap:g} is not a positive number")
    start_ms = scoring.parse_time(start, "--from") if start is not None else None
    end_ms = scoring.parse_time(end, "--to") if end is not None else None
    if start_ms is not None and end_ms is not None and end_ms < start_ms:
        raise scoring.EvalError(f"--to: {end} is before --from {start}")
    keyed: dict[str, list[Interval]] = {}
    if labels is not None:
        if label_column is not None:
            keyed = {"*": scoring.read_label_column(labels, label_column, time_column, delimiter)}
        elif labels.suffix.lower() == ".json":
            keyed = scoring.read_windows(labels, labels_key)
        else:
            raise scoring.EvalError(
                f"--labels: {labels} is not .json: give --label-column for a CSV's label column"
            )
    rec = scoring.read_recording(recording, devices)
    if not rec.traces:
        raise scoring.EvalError(
            f"RECORDING: {recording} holds no scores or events"
            + (f" of a device matching --device {', '.join(devices)}" if devices else "")
            + f" ({rec.lines} lines)"
        )
    per_device = scoring.labels_for(sorted(rec.traces), keyed)
    fail_at = scoring.read_failures(failures) if failures is not None else None
    report = scoring.evaluate(
        rec,
        per_device,
        start_ms=start_ms,
        end_ms=end_ms,
        failures=fail_at,
        rul_cap=rul_cap,
        rul_unit=rul_unit,
    )
    report["recording"] = str(recording)
    report["labels"] = str(labels) if labels is not None else None
    return report


Paths = Annotated[list[str] | None, typer.Option("--device", help="Only devices matching (glob).")]


def eval_command(
    recording: Annotated[
        Path, typer.Argument(help="A `uns record` file of the inference's scores and events.")
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Labelled windows: JSON, a list of (start, end) pairs or an object of such"
            " lists by device (glob) or key, like NAB's combined_windows.json; or a CSV with"
            " --label-column."
        ),
    ] = None,
    labels_key: Annotated[
        str | None, typer.Option(help="The key of --labels whose windows apply to every device.")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="The column of the --labels CSV (0/1, true/false).")
    ] = None,
    time_column: Annotated[
        str | None, typer.Option(help="The --labels CSV's time column (default: named like one).")
    ] = None,
    delimiter: Annotated[
        str | None, typer.Option(help="The --labels CSV's delimiter (default: sniffed).")
    ] = None,
    device: Paths = None,
    start: Annotated[
        str | None,
        typer.Option("--from", help="Evaluate from this data time (ISO 8601 or epoch ms)."),
    ] = None,
    end: Annotated[str | None, typer.Option("--to", help="Evaluate up to this data time.")] = None,
    failures: Annotated[
        Path | None,
        typer.Option(
            help="RUL: JSON {device or glob: failure time}; the true RUL is counted to it."
        ),
    ] = None,
    rul_cap: Annotated[
        float | None, typer.Option(help="RUL: clip the true RUL at this (C-MAPSS: 125).")
    ] = None,
    rul_unit: Annotated[str, typer.Option(help="RUL: the model's unit (s, min, h, d).")] = "h",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures to this file (JSON).")
    ] = None,
) -> None:
    """Point-wise precision/recall/F1, false- and missed-alarm rates, and event-level
    detection (labelled windows caught, median detection delay, false events per day) of a
    recording's scores and events (exit 2 naming a bad option or field)."""
    from uns_eval import scoring

    if delimiter is not None and delimiter.lower() in ("tab", "\\t"):
        delimiter = "\t"
    if delimiter is not None and len(delimiter) != 1:
        raise fail(f"--delimiter: {delimiter!r} is not one character")
    try:
        report = evaluate_files(
            recording,
            labels=labels,
            labels_key=labels_key,
            label_column=label_column,
            time_column=time_column,
            delimiter=delimiter,
            devices=tuple(device or ()),
            start=start,
            end=end,
            failures=failures,
            rul_cap=rul_cap,
            rul_unit=rul_unit,
        )
    except scoring.EvalError as exc:
        raise fail(str(exc)) from None
    for line in scoring.summary(report):
        typer.echo(line)
    if json_out is not None:
        try:
            json_out.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise fail(f"--json: {json_out}: {exc.strerror or exc}", code=1) from None
        typer.echo(f"figures written to {json_out}")
