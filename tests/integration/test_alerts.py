"""The edge box's Prometheus: its configuration, the alert rules and their tests, checked
with the real ``promtool``; every alert names metrics the services really export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.exported import exported_labels, exported_metrics, label_names, metric_names
from fixtures.need import missing

pytestmark = pytest.mark.integration
PROMETHEUS = Path(__file__).parents[2] / "deploy/prometheus"
RULES = PROMETHEUS / "rules/uns.yml"
RULE_TESTS = PROMETHEUS / "tests/uns.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        missing(
            "promtool is not installed",
            ci=".ci/run must install the prometheus package",
            here="apt-get install prometheus",
        )
    return subprocess.run(
        [path, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )


def alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_the_prometheus_config_and_its_rule_files_are_valid():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alerts())} rules found" in result.stdout, result.stdout


def test_the_alert_rules_pass_their_promtool_tests():
    result = promtool("test", "rules", str(RULE_TESTS.relative_to(PROMETHEUS)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not():
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = set(alerts())
    assert not names - fires, f"no promtool case where these fire: {sorted(names - fires)}"
    assert not names - silent, f"no promtool case where these stay silent: {sorted(names - silent)}"
    assert not (fires | silent) - names, f"cases for no alert: {sorted((fires | silent) - names)}"


def test_the_alerts_cover_what_an_operator_must_act_on():
    """The seeds' most important alerts, each by the metric it watches."""
    watched = {name: metric_names(rule["expr"]) for name, rule in alerts().items()}
    needed = {
        "a service offline": "up",
        "a service off the broker": "uns_connected",
        "a gateway without its PLC": "uns_opcua_session_up",
        "the journal growing": "uns_bridge_journal_messages",
        "the journal's age": "uns_bridge_oldest_age_seconds",
        "a certificate expiring": "uns_bridge_cert_days_left",
        "a service restarting": "process_start_time_seconds",
        "messages dropped": "uns_messages_dropped_total",
        "the bridge dropping data": "uns_bridge_dropped_total",
        "a model refused": "uns_inference_models_refused_total",
    }
    uncovered = [
        what for what, metric in needed.items() if not any(metric in m for m in watched.values())
    ]
    assert not uncovered, f"no alert for {uncovered}"


def test_every_alert_names_only_metrics_the_services_export():
    exported = exported_metrics()
    unknown = {
        name: sorted(metric_names(rule["expr"]) - exported) for name, rule in alerts().items()
    }
    unknown = {name: names for name, names in unknown.items() if names}
    assert not unknown, f"alerts on metrics no service exports: {unknown}"


def test_every_alert_matches_and_groups_on_labels_its_metrics_carry():
    """A selector or a `by` on a label the metric lacks is as silent as a wrong name; so is a
    `$labels.x` in its text."""
    exported = exported_labels()
    for name, rule in alerts().items():
        carried = set().union(*(exported.get(m, frozenset()) for m in metric_names(rule["expr"])))
        used = label_names(rule["expr"])
        for text in rule["annotations"].values():
            used |= set(re.findall(r"\$labels\.(\w+)", text))
        assert used <= carried, f"{name} uses labels its metrics lack: {sorted(used - carried)}"


def test_every_alert_has_a_severity_and_says_what_happened():
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
