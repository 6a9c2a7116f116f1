"""Secrets: a whole run of the plant with a broker password (in the ``--broker`` URL), the
bridge's remote password and an OPC UA user's password (in the config). None of them may
appear in any log of the run (`uns up` and its services, both brokers, the `uns` commands
the suite ran), in any service's /metrics, or in `uns tree`.

This module runs last (file order), so "the logs" are those of every fault, load and fuzz
case before it: error paths are where a secret leaks.
"""

from __future__ import annotations

from typing import Any

import pytest

from system.plant import SERVICES, System, _cmdline

pytestmark = pytest.mark.timeout(300)


def leaks(text: str, secrets: dict[str, str]) -> dict[str, int]:
    return {what: text.count(value) for what, value in secrets.items() if value in text}


def test_no_configured_secret_appears_in_logs_metrics_or_the_tree(
    plant: System, report: Any
) -> None:
    tree = plant.uns("tree", "--timeout", "5")
    assert tree.returncode == 0, tree.stderr
    assert "stamping" in tree.stdout, tree.stdout
    assert plant.log is not None
    sources = {
        "uns up and its services' logs": plant.log.text(),
        "local broker log": plant.local.logs(),
        "cloud broker log": plant.cloud.logs(),
        "uns commands' output": "\n".join(plant.cli_output),
        "uns tree": tree.stdout + tree.stderr,
        **{f"/metrics of {s}": plant.metrics_text(s) for s in SERVICES},
    }
    found = {name: hits for name, text in sources.items() if (hits := leaks(text, plant.secrets))}
    # a process's command line is readable by every user of the box (ps): `uns up` hands the
    # services the broker URL in their environment
    in_argv = sorted(
        name for name, pid in plant.pids().items() if leaks(" ".join(_cmdline(pid)), plant.secrets)
    )
    # where they leak from (the logger of each such line; never the line itself)
    where = sorted(
        {
            (line.split()[3] if len(line.split()) > 3 else "?").rstrip(":")
            for _, line in plant.log.lines
            if leaks(line, plant.secrets)
        }
    )
    report.add(
        "secrets",
        runs=1,
        secrets=sorted(plant.secrets),
        sources_checked=sorted(sources),
        log_lines=len(plant.log.lines),
        leaks=found,
        leaking_loggers=where,
        in_process_command_lines=in_argv,
    )
    assert not found, f"secrets leaked: {found}"
    assert not in_argv, f"secrets on the command lines of {in_argv}"


def test_every_anomaly_event_of_the_run_was_raised_once_and_cleared_once(
    plant: System, report: Any
) -> None:
    """Across every fault of the run: no id raised twice, none left open, none cleared
    without having been raised (at the plant and at the cloud)."""
    out: dict[str, Any] = {}
    for name, watcher in (("local", plant.watch), ("cloud", plant.cloud_watch)):
        # the cloud may hold a message twice (at-least-once): one copy of each payload
        unique = {
            s.digest: s
            for s in watcher.snapshot(plant.started_at)
            if s.topic.endswith("/events/anomaly") and s.size and s.state
        }
        events = sorted(unique.values(), key=lambda s: s.t)
        raised = [e.id for e in events if e.state == "raised"]
        cleared = [e.id for e in events if e.state == "cleared"]
        out[name] = {
            "raised": len(raised),
            "cleared": len(cleared),
            "raised_twice": sorted({i for i in raised if raised.count(i) > 1}),
            "open": sorted(set(raised) - set(cleared)),
            "cleared_unraised": sorted(set(cleared) - set(raised)),
        }
    report.add("events_of_the_run", runs=1, **out)
    for name, figures in out.items():
        assert not figures["raised_twice"], (name, figures)
        assert not figures["open"], (name, figures)
        assert not figures["cleared_unraised"], (name, figures)


def test_no_service_restarted_but_those_the_suite_killed(plant: System, report: Any) -> None:
    """`uns up`'s log of the whole run: every restart is one of the suite's kills (no
    crash, no watchdog exit, no crash loop)."""
    restarts = plant.restarts(plant.started_at)
    unplanned = {
        s: n - plant.kills.get(s, 0) for s, n in restarts.items() if n > plant.kills.get(s, 0)
    }
    report.add(
        "restarts_of_the_run",
        runs=1,
        restarts=restarts,
        killed_by_the_suite=plant.kills,
        unplanned=unplanned,
        tracebacks=plant.tracebacks(plant.started_at),
    )
    assert not unplanned, f"restarts the suite did not cause: {unplanned}"
