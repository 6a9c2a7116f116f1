"""``uns bench``: the benchmark harness (see `uns_bench.main`)."""

from uns_bench.main import SCENARIOS, run

__all__ = ["SCENARIOS", "run"]
