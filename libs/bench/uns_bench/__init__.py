"""``uns bench``: the benchmark harness (see `uns_bench.main`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_bench.main import SCENARIOS, run

__all__ = [
    "SCENARIOS",
    "run",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "SCENARIOS": "main",
        "run": "main",
    },
)
