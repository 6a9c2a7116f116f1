"""Operations -> HTTP requests of the two presets, and what a response means (pure).

generic (PagerDuty Events-like): every operation is one ``POST {url}`` of a JSON work
order, ``action`` open/update/resolve and its ``key``; a receiver keys its record on
``key`` and drops a repeated ``Idempotency-Key``.

servicenow (Table API): open = ``POST {url}{table}`` of an incident (short_description,
description, urgency and impact from the severity, cmdb_ci = the device or line path,
correlation_id = the key, plus ``fields``); the ``result.sys_id`` of its answer is kept;
update = ``PATCH {url}{table}/{sys_id}`` with work_notes; resolve = the same with
``state`` = ``resolved_state``, close_code and close_notes. Before an open the incident
is looked up by correlation_id (``GET ...?sysparm_query=correlation_id=KEY``), so an
open that reached ServiceNow before a crash is found, not made twice.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote

from uns_notifier.correlate import Member, Op
from uns_notifier.settings import Webhook

URGENCY: Final = {"critical": "1", "warning": "2", "info": "3"}
"""ServiceNow urgency and impact (1 high .. 3 low): priority 1 for a critical fault."""
RETRY_AFTER_MAX_S: Final = 3600.0

Verdict = Literal["ok", "retry", "dead"]


@dataclass(frozen=True, slots=True)
class Request:
    method: Literal["GET", "POST", "PATCH"]
    url: str
    body: dict[str, Any] | None
    idempotency_key: str | None


def idempotency_key(op: Op) -> str:
    """The open's is the work order's key (the event id); each later operation's is the
    key and its number."""
    return op.key if op.n == 0 else f"{op.key}:{op.n}"


def title(op: Op) -> str:
    if op.kind == "line":
        devices = len({m.device for m in op.members})
        return (
            f"Event storm on {op.path}: {devices} devices raised anomalies within {op.window_s:g} s"
        )
    m = op.members[0] if op.members else op.cause
    summary = m.summary.split("; ")[0] if m is not None else ""
    return summary or f"Anomaly on {op.path}"


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _line(m: Member) -> str:
    score = f", score {m.score:.3g}" if m.score is not None else ""
    return (
        f"{m.device}: {m.kind} {m.state} ({m.severity}{score}) since {_iso(m.started)}, id {m.id}"
    )


def description(op: Op) -> str:
    lines = [title(op), ""]
    if op.kind == "line":
        lines.append(f"{len(op.members)} device events correlated on the line {op.path}:")
    lines += [_line(m) for m in op.members]
    for m in op.members[:1] if op.kind == "device" else []:
        lines += [f"{k}: {v}" for k, v in sorted(m.details.items())]
    return "\n".join(lines)


def note(op: Op) -> str:
    c = op.cause
    if c is None:
        return title(op)
    if op.action == "resolve":
        head = "Resolved: every correlated event cleared" if op.kind == "line" else "Resolved"
        return f"{head}. {c.summary or _line(c)}"
    if op.kind == "line" and c.state != "cleared":
        return f"Correlated: {_line(c)}"
    return c.summary or _line(c)


def _event(m: Member) -> dict[str, Any]:
    return {
        "id": m.id,
        "device": m.device,
        "kind": m.kind,
        "state": m.state,
        "severity": m.severity,
        "started": m.started,
        "ts": m.ts,
        "summary": m.summary,
        "score": m.score,
        "threshold": m.threshold,
    }


def build(webhook: Webhook, op: Op, ref: str | None, source: str) -> Request | None:
    """The request of ``op``; None for a servicenow update of an incident whose sys_id is
    not known (its open was refused)."""
    key = idempotency_key(op)
    if webhook.preset == "generic":
        body: dict[str, Any] = {
            "type": "work_order",
            "action": op.action,
            "key": op.key,
            "seq": op.n,
            "kind": op.kind,
            "path": op.path,
            "status": op.status,
            "severity": op.severity,
            "title": title(op),
            "description": description(op),
            "note": note(op),
            "events": [_event(m) for m in op.members],
            "cause": _event(op.cause) if op.cause is not None else None,
            "source": source,
        }
        if op.action == "open" and webhook.fields:
            body["fields"] = dict(webhook.fields)
        return Request("POST", webhook.url, body, key)
    base = webhook.url.rstrip("/") + webhook.table
    urgency = URGENCY.get(op.severity, "2")
    if op.action == "open":
        body = {
            "short_description": title(op)[:160],
            "description": description(op),
            "urgency": urgency,
            "impact": urgency,
            "cmdb_ci": op.path,
            "correlation_id": op.key,
            "correlation_display": source,
            **webhook.fields,
        }
        return Request("POST", base, body, key)
    if ref is None:
        return None
    body = {"work_notes": note(op), "urgency": urgency, "impact": urgency}
    if op.action == "resolve":
        body |= {
            "state": webhook.resolved_state,
            "close_code": webhook.close_code,
            "close_notes": note(op),
        }
    return Request("PATCH", f"{base}/{quote(ref, safe='')}", body, key)


def lookup(webhook: Webhook, key: str) -> Request:
    """servicenow: the incident of correlation id ``key``, if one was made."""
    base = webhook.url.rstrip("/") + webhook.table
    query = quote(f"correlation_id={key}", safe="=")
    return Request(
        "GET", f"{base}?sysparm_query={query}&sysparm_fields=sys_id&sysparm_limit=1", None, None
    )


def sys_id(answer: Any) -> str | None:
    """``result.sys_id`` of a create, or of the first record of a lookup."""
    result = answer.get("result") if isinstance(answer, dict) else None
    if isinstance(result, list):
        result = result[0] if result else None
    if isinstance(result, dict) and isinstance(result.get("sys_id"), str):
        return str(result["sys_id"])
    return None


def verdict(status: int) -> Verdict:
    """2xx: accepted; 429, 408, 5xx: back off and send again; 401/403: the credential,
    not the work order, is wrong: back off and send again (a rotated ``auth_file`` is read
    at the next attempt); any other 4xx: the receiver will never take it: dead letter."""
    if 200 <= status < 300:
        return "ok"
    if status in (401, 403, 408, 429) or status >= 500:
        return "retry"
    return "dead"


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` asks for (delta-seconds or an HTTP date), at most 1 h."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)
