"""The options of training a model, stated once: names, defaults, bounds and help.

`uns model train` takes its options from here (`uns.commands.struct_options`),
`cli.model_train` and `train.fit_anomaly`/`fit_rul` take their defaults from `TRAINING`,
so the command line, the library and the shipped models cannot drift apart (they did:
``margin`` was 1.2 on the command line and 1.25 in `fit_anomaly`; the shipped models
and the tests use 1.2, which is kept). Light: msgspec only.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Final

import msgspec


class Training(msgspec.Struct, frozen=True, kw_only=True):
    """How a model is fitted from recorded features."""

    ON_COMMAND_LINE: ClassVar[tuple[str, ...]] = (
        "variance",
        "quantile",
        "margin",
        "folds",
        "family",
        "min_raise_s",
        "min_clear_s",
        "rul_unit",
        "rul_cap",
    )
    """The options `uns model train` shows; the rest are fixed for the shipped models."""

    min_raise_s: Annotated[
        float, msgspec.Meta(ge=0.0, description="Anomaly: seconds of breach before an event")
    ] = 10.0
    min_clear_s: Annotated[
        float, msgspec.Meta(ge=0.0, description="Anomaly: seconds healthy before it clears")
    ] = 30.0
    rul_unit: Annotated[str, msgspec.Meta(description="RUL: s, min, h or d")] = "h"
    rul_cap: Annotated[
        float, msgspec.Meta(ge=0.0, description="RUL: the target is clipped here")
    ] = 125.0
    max_age_s: Annotated[
        float,
        msgspec.Meta(
            gt=0.0,
            description="Seconds (data time) a window waits for the rest of its features",
        ),
    ] = 120.0
    variance: Annotated[
        float,
        msgspec.Meta(ge=0.5, lt=1.0, description="Anomaly: variance the PCA components keep"),
    ] = 0.95
    quantile: Annotated[
        float,
        msgspec.Meta(
            gt=0.0, lt=1.0, description="Anomaly: quantile of out-of-fold scores the raise is on"
        ),
    ] = 0.999
    margin: Annotated[
        float, msgspec.Meta(gt=0.0, description="Anomaly: raise threshold = margin x quantile")
    ] = 1.2
    clear_fraction: Annotated[
        float,
        msgspec.Meta(gt=0.0, le=1.0, description="Anomaly: clear threshold / raise threshold"),
    ] = 0.7
    critical_factor: Annotated[
        float,
        msgspec.Meta(gt=0.0, description="Anomaly: critical threshold / raise threshold"),
    ] = 2.0
    family: Annotated[
        str,
        msgspec.Meta(
            pattern="^(pca|t2|auto)$",
            description="Anomaly detector: pca (T² in the components + SPE), t2 (T² in every"
            " component), or auto (the one detecting more out-of-fold rows with one feature"
            " shifted 3 sd)",
        ),
    ] = "pca"
    folds: Annotated[
        int,
        msgspec.Meta(
            ge=2,
            description="Contiguous blocks (or run groups) of the cross-validation; the"
            " threshold's spread across them is on the card",
        ),
    ] = 5


TRAINING: Final = Training()
"""The defaults."""

DEFAULT_EXCLUDE: Final = ("*_count.mean", "*_count.min", "*_count.max")
"""Features left out unless ``--exclude`` says otherwise: counters grow for ever, their level
is no sign of health (their rate, slope_per_min, is)."""
