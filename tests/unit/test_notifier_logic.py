"""The notifier's pure parts: the storm rule, idempotency by event id, the presets' requests,
what an answer means, the settings' errors, and the journal keeping an hour-old operation."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from uns import Event
from uns.errors import ConfigError
from uns.journal import EVENT, Item, Journal
from uns_notifier import webhook as wh
from uns_notifier.correlate import Correlator, Op, State
from uns_notifier.settings import NotifierSettings, Webhook

LINE = "acme/pune/stamping/line-3"


def ev(device: str, state: str, eid: str, severity: str = "warning", ts: int = 1000) -> Event:
    return Event(
        ts=ts,
        id=eid,
        kind="anomaly",
        state=state,  # type: ignore[arg-type]
        device=f"{LINE}/{device}",
        started=ts - 30_000,
        severity=severity,  # type: ignore[arg-type]
        summary=f"{eid} {state}",
    )


def correlator(window_s: float = 30.0, minimum: int = 5) -> Correlator:
    return Correlator(State(), window_s, minimum)


def test_a_single_fault_waits_out_the_window_then_opens_its_own_work_order():
    c = correlator()
    assert c.on_event(ev("cell-a/press-01", "raised", "e1"), 0) == []
    assert c.due(29_999) == []
    [op] = c.due(30_000)
    assert (op.action, op.key, op.kind, op.n) == ("open", "e1", "device", 0)
    [resolve] = c.on_event(ev("cell-a/press-01", "cleared", "e1"), 40_000)
    assert (resolve.action, resolve.key, resolve.n, resolve.status) == (
        "resolve",
        "e1",
        1,
        "resolved",
    )


def test_the_same_event_again_opens_nothing_and_a_second_clear_resolves_nothing():
    c = correlator(window_s=0)
    assert [o.action for o in c.on_event(ev("cell-a/press-01", "raised", "e1"), 0)] == ["open"]
    assert c.on_event(ev("cell-a/press-01", "raised", "e1"), 1) == []
    assert [o.action for o in c.on_event(ev("cell-a/press-01", "cleared", "e1"), 2)] == ["resolve"]
    assert c.on_event(ev("cell-a/press-01", "cleared", "e1"), 3) == []
    assert c.on_event(ev("cell-a/press-01", "raised", "e1"), 4) == []
    # decided again from the saved state, after a restart
    state = msgspec.json.decode(msgspec.json.encode(c.state), type=State)
    assert Correlator(state, 0, 5).on_event(ev("cell-a/press-01", "raised", "e1"), 5) == []


def test_a_storm_of_40_devices_opens_one_line_incident_and_attaches_the_rest():
    c = correlator(window_s=30, minimum=5)
    ops: list[Op] = []
    for i in range(40):
        ops += c.on_event(ev(f"cell-{'ab'[i % 2]}/press-{i:02d}", "raised", f"s{i}"), i * 100)
    opens = [o for o in ops if o.action == "open"]
    assert len(opens) == 1 and opens[0].kind == "line" and opens[0].path == LINE
    assert len(opens[0].members) == 5  # opened at once when the fifth device raised
    assert len(ops) == 36 and len(ops[-1].members) == 40
    assert [o.n for o in ops] == list(range(36))
    assert c.due(10**9) == []
    clears: list[Op] = []
    for i in range(40):
        clears += c.on_event(ev(f"cell-{'ab'[i % 2]}/press-{i:02d}", "cleared", f"s{i}"), 10**6)
    assert [o.action for o in clears] == ["update"] * 39 + ["resolve"]
    # a new raise after the incident is resolved starts a new window
    assert c.on_event(ev("cell-a/press-00", "raised", "s-next"), 2 * 10**6) == []


def test_fewer_devices_than_the_minimum_get_their_own_work_orders_even_if_cleared():
    c = correlator(window_s=30, minimum=5)
    for i in range(4):
        assert c.on_event(ev(f"cell-a/press-{i:02d}", "raised", f"e{i}"), i) == []
    assert c.on_event(ev("cell-a/press-00", "cleared", "e0"), 10) == []  # held: kept
    ops = c.due(30_000)
    assert [(o.key, o.action) for o in ops] == [
        ("e0", "open"),
        ("e0", "resolve"),
        ("e1", "open"),
        ("e2", "open"),
        ("e3", "open"),
    ]


def test_another_line_is_not_correlated():
    c = correlator(window_s=30, minimum=2)
    assert c.on_event(ev("cell-a/press-01", "raised", "a"), 0) == []
    other = msgspec.structs.replace(ev("x", "raised", "b"), device="acme/pune/stamping/line-4/c/d")
    assert c.on_event(other, 1) == []
    assert {o.key for o in c.due(30_001)} == {"a", "b"}


def test_resolved_work_orders_are_forgotten_after_keep_s_once_sent():
    c = correlator(window_s=0)
    c.on_event(ev("cell-a/press-01", "raised", "e1", ts=1000), 0)
    c.on_event(ev("cell-a/press-01", "cleared", "e1", ts=2000), 0)
    assert c.prune(10**9, 1000) == 0  # not delivered yet
    c.state.orders["e1"].sent = 2
    assert c.prune(10**9, 1000) == 1 and c.state.events == {}


def test_servicenow_requests():
    hook = Webhook(
        url="https://acme.service-now.com", preset="servicenow", fields={"category": "hw"}
    )
    c = correlator(window_s=0)
    [open_] = c.on_event(ev("cell-a/press-01", "raised", "e1", severity="critical"), 0)
    r = wh.build(hook, open_, None, "notifier")
    assert r is not None and (r.method, r.url) == (
        "POST",
        "https://acme.service-now.com/api/now/table/incident",
    )
    assert r.body is not None and r.idempotency_key == "e1"
    assert (r.body["urgency"], r.body["impact"], r.body["correlation_id"]) == ("1", "1", "e1")
    assert r.body["cmdb_ci"] == f"{LINE}/cell-a/press-01" and r.body["category"] == "hw"
    [resolve] = c.on_event(ev("cell-a/press-01", "cleared", "e1", severity="critical"), 1)
    assert wh.build(hook, resolve, None, "notifier") is None  # no sys_id: nothing to patch
    r = wh.build(hook, resolve, "abc", "notifier")
    assert r is not None and (r.method, r.url) == (
        "PATCH",
        f"{hook.url}/api/now/table/incident/abc",
    )
    assert r.body is not None and r.body["state"] == "6" and r.idempotency_key == "e1:1"
    assert wh.sys_id({"result": {"sys_id": "abc"}}) == "abc"
    assert wh.sys_id({"result": [{"sys_id": "x"}]}) == "x"
    assert wh.sys_id({"result": []}) is None and wh.sys_id("garbage") is None


def test_what_an_answer_means():
    assert [wh.verdict(s) for s in (200, 201, 204)] == ["ok"] * 3
    assert [wh.verdict(s) for s in (429, 500, 503, 408, 401, 403)] == ["retry"] * 6
    assert [wh.verdict(s) for s in (400, 404, 409, 422)] == ["dead"] * 4
    assert wh.retry_after("7") == 7.0
    assert wh.retry_after("99999") == 3600.0
    assert wh.retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert wh.retry_after("soon") is None and wh.retry_after(None) is None


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"webhook": {"url": "http://example.com"}}, "url"),
        ({"webhook": {"url": "ftp://example.com", "allow_plaintext": True}}, "url"),
        ({"webhook": {"url": "https://x", "preset": "jira"}}, "preset"),
        ({"webhook": {"url": "https://x", "retry_min_s": 5, "retry_max_s": 1}}, "retry_max_s"),
        ({"correlate_min": 1}, "correlate_min"),
        ({"kinds": ["Anomaly"]}, "kinds"),
    ],
)
def test_a_bad_setting_names_its_field(section, field):
    with pytest.raises((msgspec.ValidationError, ConfigError)) as err:
        msgspec.convert(section, NotifierSettings)
    assert field in str(err.value)


def test_disabled_by_default_and_metrics_on_9410():
    s = NotifierSettings()
    assert s.enabled is False and s.webhook is None
    assert NotifierSettings.default_metrics_port == 9410


def test_an_operation_an_hour_old_is_not_expired(tmp_path: Path):
    """The webhook down for an hour: the journal keeps it (ttl 7 days)."""
    s = NotifierSettings()
    journal = Journal(tmp_path / "j.sqlite", max_bytes=s.journal.max_bytes)
    now = 1_800_000_000_000
    journal.append([Item("e1", b"{}", EVENT, 0, now - 3_600_000)])
    assert journal.expire(s.journal.ttl_s, now_ms=now) == 0
    assert [r.topic for r in journal.read(0, 10)] == ["e1"]
    assert journal.expire(s.journal.ttl_s, now_ms=now + 7 * 86_400_000) == 1
    journal.close()
