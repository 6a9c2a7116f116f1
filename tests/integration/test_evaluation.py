"""The evaluation's figures hold: CWRU bearings and the simulator (the code of `make eval`)."""

from __future__ import annotations

import pytest

from uns_inference import evaluation

pytestmark = pytest.mark.integration


def test_cwru_faults_are_flagged_and_held_out_normal_is_not(datasets, tmp_path):
    result = evaluation.cwru(datasets, tmp_path)
    assert result["normal_flagged"] <= 0.01
    assert len(result["faults"]) == 9
    assert all(rate >= 0.99 for rate, _ in result["faults"].values()), result["faults"]


def test_the_simulated_wear_is_caught_early_and_healthy_running_raises_nothing(tmp_path):
    result = evaluation.simulator(tmp_path)
    assert result["healthy_events"] == 0
    assert result["raised_at_severity"] < 0.5
