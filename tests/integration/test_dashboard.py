"""The Grafana dashboard the edge box provisions: every panel's query names only metrics
the services really export, parses as PromQL (promtool, the real parser), and reads the
provisioned data source; the panels show what an operator looks at."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.exported import exported_metrics, metric_names
from fixtures.need import missing

pytestmark = pytest.mark.integration
GRAFANA = Path(__file__).parents[2] / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/uns-edge.json"


def panels() -> list[dict[str, Any]]:
    """Every panel with queries, rows' own panels included."""
    found: list[dict[str, Any]] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found += [panel, *panel.get("panels", [])]
    return [p for p in found if p.get("targets")]


def queries() -> dict[str, str]:
    """``panel title / refId`` -> PromQL."""
    return {f"{p['title']} / {t['refId']}": t["expr"] for p in panels() for t in p["targets"]}


def test_every_panel_names_only_metrics_the_services_export():
    exported = exported_metrics()
    unknown = {where: sorted(metric_names(expr) - exported) for where, expr in queries().items()}
    unknown = {where: names for where, names in unknown.items() if names}
    assert not unknown, f"panels on metrics no service exports (they would say No data): {unknown}"
    assert all(metric_names(expr) for expr in queries().values())


def test_every_query_is_valid_promql(tmp_path):
    """Each query as a recording rule, checked by promtool (Grafana's $__rate_interval as the
    5m it stands for)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool is not installed", ci=".ci/run must install the prometheus package")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": re.sub(r"\$__\w+", "5m", expr)}
        for i, expr in enumerate(queries().values())
    ]
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_panel_reads_the_provisioned_data_source():
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    for panel in panels():
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]


def test_the_dashboard_shows_what_an_operator_looks_at():
    used = {metric for expr in queries().values() for metric in metric_names(expr)}
    wanted = {
        "message rates per stream": "uns_messages_published_total",
        "handler latency": "uns_handler_duration_seconds_bucket",
        "anomaly score per device": "uns_inference_anomaly_score",
        "open events": "uns_inference_open_events",
        "journal depth": "uns_bridge_journal_messages",
        "journal age": "uns_bridge_oldest_age_seconds",
        "restarts": "process_start_time_seconds",
        "drops": "uns_messages_dropped_total",
    }
    absent = [what for what, metric in wanted.items() if metric not in used]
    assert not absent, f"the dashboard has no panel for {absent}"
    by_reason = [e for e in queries().values() if "uns_messages_dropped_total" in e]
    assert any("reason" in e for e in by_reason), "drops are not shown by reason"
    per_stream = [e for e in queries().values() if "uns_messages_published_total" in e]
    assert any("stream" in e for e in per_stream), "message rates are not shown per stream"


def test_panels_do_not_overlap():
    taken: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        g = panel["gridPos"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        assert g["x"] + g["w"] <= 24, panel["title"]
        taken |= cells
