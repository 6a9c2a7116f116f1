"""The Grafana dashboard the edge box provisions: every panel's query names only metrics
the services really export, parses as PromQL (promtool, the real parser), and reads the
provisioned data source; the panels show what an operator looks at."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fixtures.exported import exported_labels, exported_metrics, label_names, metric_names
from fixtures.need import missing
from uns import DeviceBirth, DeviceData, Metric, MetricDef, Window, connect, encode
from uns.testing import memory_broker, running, watching

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


def test_every_query_matches_groups_and_names_series_by_labels_its_metrics_carry():
    exported = exported_labels()
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            carried = set().union(*(exported.get(m, frozenset()) for m in metric_names(expr)))
            used = label_names(expr) | set(
                re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"])
            )
            where = f"{panel['title']} / {target['refId']}"
            assert used <= carried, (
                f"{where} uses labels its metrics lack: {sorted(used - carried)}"
            )


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
        "line and cell health": "uns_plant_health",
        "line and cell OEE": "uns_plant_oee",
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


# ---- the machines row, from a running inference ---------------------------------------------


def card_features(card: dict[str, Any], fault: float = 1.0) -> dict[str, float]:
    """A window at the card's training means (a healthy machine), its BPFO envelope times
    ``fault``."""
    norm = card["normalisation"]
    values: dict[str, float] = {}
    for name, mean, log, offset in zip(
        card["features"], norm["means"], norm["log"], norm["offsets"], strict=True
    ):
        values[name] = math.exp(mean) - offset if log else mean
    values["vibration.env_bpfo"] *= fault
    return values


async def test_the_anomaly_panels_show_what_the_scores_stream_says(tmp_path):
    """Per device: the latest score and its threshold as published; the open events, 0 then
    1 once a fault has raised one (the shipped, signed press model)."""
    from uns_inference import Inference

    root = DASHBOARD.parents[3]
    card = json.loads((root / "models/press/anomaly/1.0.0/card.json").read_text())
    dev = "acme/pune/stamping/line-3/cell-a/press-01"
    t0 = 1_795_334_400_000
    settings = {
        "models_dir": str(root / "models"),
        "pubkey": str(root / "keys/models.pub"),
        "audit_log": str(tmp_path / "audit.jsonl"),
    }
    async with (
        memory_broker() as url,
        running(Inference, url, "acme", plant=[(dev, "press")], **settings) as node,
        watching(url, f"{dev}/#") as w,
        connect(url) as bus,
    ):
        port = node.metrics._server.server_port
        await w.next(f"{dev}/scores/birth", DeviceBirth)
        defs = [MetricDef(name=n, datatype="double") for n in card["features"]]
        birth = DeviceBirth(ts=t0, node="featurizer", device=dev, bdseq=0, seq=0, metrics=defs)
        await bus.publish(f"{dev}/features/birth", encode(birth), qos=1, retain=True)

        async def window(i: int, fault: float) -> DeviceData:
            ts = t0 + i * 1000
            metrics = [Metric(name=n, value=v) for n, v in card_features(card, fault).items()]
            span = Window(start=ts - 1000, end=ts, good=10_000, total=10_000, node="opcua-adapter")
            data = DeviceData(ts=ts, node="featurizer", seq=i, metrics=metrics, window=span)
            await bus.publish(f"{dev}/features/data", encode(data), qos=1)
            return await w.next(f"{dev}/scores/data", DeviceData)

        healthy = await window(1, 1.0)
        shown = await scrape(port)
        published = {m.name: m.value for m in healthy.metrics}
        labels = (("device", dev), ("service", "inference"))
        assert shown["uns_inference_anomaly_score", labels] == pytest.approx(
            published["anomaly_score"], abs=1e-6
        )
        assert shown["uns_inference_anomaly_threshold", labels] == card["thresholds"]["raise"]
        assert shown["uns_inference_open_events", (("service", "inference"),)] == 0
        i = 2
        while True:  # a fault long enough to raise (min_raise_s of data time)
            await window(i, 1e4)
            i += 1
            if any(m.topic == f"{dev}/events/anomaly" for m in w.messages):
                break
            assert i < 60, "no anomaly event in a minute of faulty windows"
        shown = await scrape(port)
        assert shown["uns_inference_open_events", (("service", "inference"),)] == 1
        assert shown["uns_inference_anomaly_score", labels] > card["thresholds"]["raise"]


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A service's /metrics as Prometheus reads it: (name, sorted labels) -> value."""
    text = await asyncio.to_thread(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
    )
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
