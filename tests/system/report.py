"""RELIABILITY.md's table from a run of the system suite.

``python tests/system/report.py [var/system-report.json]`` prints the Markdown rows: each
fault and attack, how many times it was tried, the recovery measured and what the bridge's
ledger says was lost (messages it took that never reached the cloud; messages published
while it was down are counted apart, they were never taken).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROWS = [
    ("startup", "`uns up` from cold (for reference)"),
    ("broker_kill", "local broker `kill -9`, restarted on the same port after 3 s"),
    ("simulator_freeze", "simulator (OPC UA + Modbus servers) frozen 10 s (SIGSTOP, SIGCONT)"),
    ("kill_simulator", "simulator `kill -9` (both servers gone; `uns up` restarts it)"),
    ("kill_opcua-adapter", "opcua-adapter `kill -9`"),
    ("kill_modbus-adapter", "modbus-adapter `kill -9`"),
    ("kill_featurizer", "featurizer `kill -9`"),
    ("kill_bridge", "bridge `kill -9`"),
    ("kill_inference", "inference `kill -9`"),
    ("event_across_inference_kill", "inference `kill -9` with an anomaly event open"),
    ("cloud_down", "cloud link cut (connections reset, refused)"),
    ("cloud_down_long", "cloud link cut for minutes (long case)"),
    ("broker_and_bridge_kill", "local broker and bridge `kill -9` at once"),
    ("fuzz", "hostile payloads to every service's input topics"),
    (
        "fuzz_retained_restart",
        "every service `kill -9` at once, restarting into retained hostile messages",
    ),
    ("load_burst", "slow consumer + raw data at 10x the plant's rate"),
    ("load_burst_long", "slow consumer + 10x raw burst for minutes (long case)"),
    ("secrets", "configured secrets searched in logs, /metrics, `uns tree`"),
]


def recovery(case: str, c: dict[str, Any]) -> str:
    if case == "startup":
        return f"services online {c['services_online_s']} s, scores {c['scores_flowing_s']} s"
    if case.startswith("kill_"):
        return (
            f"death seen {c['death_seen_s']} s, back online {c['back_s']} s, "
            f"pipeline flowing {c['scores_flowing_s']} s"
        )
    if case in ("broker_kill", "broker_and_bridge_kill"):
        return (
            f"all 6 back online {c['back_max_s']} s after the restart, "
            f"scores {c['scores_flowing_s']} s"
        )
    if case == "simulator_freeze":
        return f"raw data {c['raw_flowing_s']} s after SIGCONT, scores {c['scores_flowing_s']} s"
    if case == "event_across_inference_kill":
        return (
            f"inference back {c['back_s']} s; raised {len(c['raised_ids'])}, "
            f"cleared {len(c['cleared_ids'])} (same id)"
        )
    if case.startswith("cloud_down"):
        return (
            f"{c['down_s']} s down, journal peak {c['journal_max']:.0f}, "
            f"cloud caught up {c['caught_up_s']} s after"
        )
    if case == "fuzz":
        per = min(c["per_service"].values())
        return (
            f"{c['messages']} messages (>= {per} per service, hypothesis {c['hypothesis']}); "
            f"crashes {len(c['crashed'])}, restarts {sum(c['restarts'].values())}; "
            f"rebirth answered <= {max(c['rebirth_answered_s'].values())} s; "
            f"longest wait for a score {max(c['longest_wait_for_a_score_s'].values())} s"
        )
    if case == "fuzz_retained_restart":
        return (
            f"{c['retained_topics']} retained topics; all back <= {max(c['back_s'].values())} s, "
            f"restarts after {sum(c['restarts_after_back'].values())}"
        )
    if case.startswith("load_burst"):
        peak = c["rss_peak_mb"]
        base = c["rss_baseline_mb"]
        grew = max(peak, key=lambda k: peak[k] - base[k])
        return (
            f"{c['load_msgs_per_s']:.0f} msgs/s ({c['load_kbytes_per_s']:.0f} kB/s) for "
            f"{c['seconds']:.0f} s; queue peak {c['featurizer_queue_depth_peak']:.0f}; "
            f"most RSS growth {grew} {base[grew]:.0f} -> {peak[grew]:.0f} MB; "
            f"features again {c['recovered_s']} s after"
        )
    if case == "secrets":
        return f"{len(c['sources_checked'])} sources; leaks: {c['leaks'] or 'none'}"
    return ""


def lost(case: str, c: dict[str, Any]) -> str:
    if case == "fuzz":
        b = c["bridge"]
        return (
            f"bridge: {b['missing']} of {b['seen_locally']} it could take "
            f"(counted drops {b['counted_drops']:.0f}, "
            f"Mosquitto's {b.get('broker_dropped', 0):.0f})"
        )
    if case.startswith("load_burst"):
        return (
            f"publisher->broker {c['unaccounted_publisher_to_watcher']} of {c['published']}; "
            f"broker->featurizer {c['unaccounted_broker_to_featurizer']:.0f}; "
            f"windows {c['load_features_seen']}/{c['load_windows_expected']}; the slow "
            f"consumer: {c['broker_dropped']:.0f} dropped by Mosquitto (its $SYS only)"
        )
    ledger = c.get("ledger_around_fault") or c.get("ledger_of_outage")
    if not ledger:
        return ""
    text = f"{c.get('newly_lost', ledger['missing_up'])} of {ledger['seen_up']} taken"
    if ledger.get("seen_while_down"):
        text += (
            f"; published while the bridge was down: {ledger['missing_while_down']} of "
            f"{ledger['seen_while_down']} never reached the cloud"
        )
    if ledger.get("duplicates_at_cloud"):
        text += f"; {ledger['duplicates_at_cloud']} duplicates"
    return text


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "var/system-report.json")
    data = json.loads(path.read_text())
    m = data["machine"]
    print(
        f"Run {data['started']}, {data['duration_s']} s; {m['nproc']} CPUs, load average "
        f"{m['loadavg_at_start']} at the start, {m['loadavg_at_end']} at the end; "
        f"Python {m['python']}, {m['platform']}\n"
    )
    print("| fault / attack | times | recovery measured | messages lost |")
    print("|---|---:|---|---|")
    for case, title in ROWS:
        c = data["cases"].get(case)
        if not c:
            continue
        print(f"| {title} | {c.get('runs', 1)} | {recovery(case, c)} | {lost(case, c)} |")


if __name__ == "__main__":
    main()
