"""Inference's own state against restarts and edits: open events kept across a restart,
the keyed audit chain."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from uns_inference import CommandError, audit, events
from uns_inference import cli as cli_commands
from uns_inference.events import EventState, Hysteresis, OpenEvent

H = Hysteresis.of(raise_=2.0, clear=1.5, min_raise_s=3, min_clear_s=3, critical=4.0)


def feed(state: EventState, start: int, scores: list[float]) -> list[str]:
    out = []
    for i, score in enumerate(scores):
        t = state.update(start + i * 1000, score, H)
        if t is not None:
            out.append(t.state)
    return out


def test_an_open_event_saved_and_reopened_goes_on_and_clears_with_its_start_and_peak() -> None:
    before = EventState()
    assert feed(before, 0, [1.0, 3.0, 3.0, 3.0, 3.0, 5.0, 1.0, 3.0]) == ["raised"]
    saved = events.decode_open(
        events.encode_open([OpenEvent.of("a/b/c/d/e/f", "anomaly", "ev-1", "x,y", before)])
    )
    assert [e.id for e in saved] == ["ev-1"] and saved[0].count == 2 and saved[0].peak == 5.0
    after = EventState()
    after.reopen(saved[0])
    assert after.is_open
    assert feed(after, 100_000, [3.0, 3.0]) == []  # still faulty: nothing new is raised
    t = None
    for i in range(5):
        t = after.update(102_000 + i * 1000, 1.0, H) or t
    assert t is not None and t.state == "cleared"
    assert t.started == 1000 and t.peak == 5.0 and t.count == 2


@pytest.mark.parametrize(
    "data", [b"", b"{", b'{"v": 2, "events": []}', b'{"events": [{"id": 1}]}', b"[]"]
)
def test_a_state_file_that_cannot_be_read_says_why(data: bytes) -> None:
    with pytest.raises(ValueError):
        events.decode_open(data)


# ---- the audit log: keyed, anchored ---------------------------------------------------------


def canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def audit_log(path: Path) -> Path:
    """promote, load, promote, refuse, promote, load: a log with a refusal to hide."""
    for i, (event, version) in enumerate(
        [
            ("promote", "1.0.0"),
            ("load", "1.0.0"),
            ("promote", "2.0.0"),
            ("refuse", "2.0.0"),
            ("promote", "3.0.0"),
            ("load", "3.0.0"),
        ]
    ):
        audit.append(
            path,
            event,  # type: ignore[arg-type]
            ts=1_795_334_400_000 + i,
            model="press-anomaly",
            version=version,
            sha256=hashlib.sha256(version.encode()).hexdigest(),
            reason="bad signature" if event == "refuse" else "",
        )
    return path


def rechain(entries: list[dict[str, Any]], prev: str = "0" * 64, first: int = 1) -> str:
    """The lines an editor without the key writes: seq, prev and mac recomputed (sha256)."""
    out = []
    for seq, entry in enumerate(entries, start=first):
        entry = {k: v for k, v in entry.items() if k != "mac"} | {"seq": seq, "prev": prev}
        entry["mac"] = hashlib.sha256(canonical(entry).encode()).hexdigest()
        prev = entry["mac"]
        out.append(canonical(entry))
    return "".join(line + "\n" for line in out)


def test_a_log_written_by_the_service_and_promotions_verifies(tmp_path: Path) -> None:
    log = audit_log(tmp_path / "var" / "audit.jsonl")
    assert audit.verify(log) is None
    head = cli_commands.audit_verify(log)
    assert head.lines == 6 and head.key == audit.key_id(audit.read_key(log))
    assert stat.S_IMODE(audit.key_path(log).stat().st_mode) == 0o600


@pytest.mark.parametrize("cut", [1, 2, 6])
def test_lines_cut_off_the_end_are_caught(tmp_path: Path, cut: int) -> None:
    log = audit_log(tmp_path / "audit.jsonl")
    kept = log.read_text().splitlines()[:-cut]
    log.write_text("".join(line + "\n" for line in kept))
    problem = audit.verify(log)
    assert problem is not None and problem.line == 7 - cut and "cut off the end" in str(problem)
    with pytest.raises(CommandError, match="cut off the end"):
        cli_commands.audit_verify(log)


def test_a_cut_log_with_its_anchor_deleted_or_rewritten_is_caught(tmp_path: Path) -> None:
    log = audit_log(tmp_path / "audit.jsonl")
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:-1]))
    anchor = audit.anchor_path(log)
    entry = json.loads(log.read_text().splitlines()[-1])
    forged = {"head": entry["mac"], "key": entry["key"], "lines": 5}
    anchor.write_text(canonical({**forged, "mac": hashlib.sha256(b"guess").hexdigest()}))
    problem = audit.verify(log)
    assert problem is not None and "anchor" in str(problem) and "edited" in str(problem)
    anchor.unlink()
    problem = audit.verify(log)
    assert problem is not None and "no anchor" in str(problem)


def test_a_last_line_rewritten_with_a_recomputed_hash_is_caught(tmp_path: Path) -> None:
    log = audit_log(tmp_path / "audit.jsonl")
    text = log.read_text().splitlines()
    entries = [json.loads(line) for line in text]
    entries[-1]["version"] = "2.0.0"  # "the refused model was loaded after all"
    last = rechain(entries[-1:], prev=entries[-2]["mac"], first=6)
    log.write_text("".join(line + "\n" for line in text[:-1]) + last)
    problem = audit.verify(log)
    assert problem is not None and problem.line == 6 and "edited" in str(problem)


def test_a_chain_rebuilt_without_the_refuse_lines_is_caught(tmp_path: Path) -> None:
    log = audit_log(tmp_path / "audit.jsonl")
    text = log.read_text().splitlines()
    entries = audit.read(log)
    assert entries[3]["event"] == "refuse"
    log.write_text(rechain([e for e in entries if e["event"] != "refuse"]))
    problem = audit.verify(log)
    assert problem is not None and problem.line == 1 and "edited" in str(problem)
    # the genuine lines before the refusal kept, the rest rebuilt on them
    rebuilt = rechain(entries[4:], prev=entries[2]["mac"], first=4)
    log.write_text("".join(line + "\n" for line in text[:3]) + rebuilt)
    problem = audit.verify(log)
    assert problem is not None and problem.line == 4 and "edited" in str(problem)


def test_a_log_rechained_under_a_key_of_ones_own_shows_another_key_id(tmp_path: Path) -> None:
    log = audit_log(tmp_path / "audit.jsonl")
    original = audit.head(log).key
    kept = [e for e in audit.read(log) if e["event"] != "refuse"]
    for path in (log, audit.key_path(log), audit.anchor_path(log)):
        path.unlink()
    for e in kept:  # all it takes on a box whose files one can replace
        audit.append(
            log,
            e["event"],
            ts=e["ts"],
            model=e["model"],
            version=e["version"],
            sha256=e["sha256"],
            reason=e["reason"],
        )
    assert audit.verify(log) is None  # locally consistent ...
    assert audit.head(log).key != original  # ... but not under the key id kept elsewhere


def test_an_anchor_one_line_behind_a_crash_still_verifies(tmp_path: Path) -> None:
    log = audit_log(tmp_path / "audit.jsonl")
    anchor = audit.anchor_path(log).read_bytes()
    audit.append(log, "load", ts=1, model="m", version="4.0.0", sha256="0" * 64)
    audit.anchor_path(log).write_bytes(anchor)  # as if the writer died before the anchor
    assert audit.verify(log) is None


def test_a_log_without_its_key_cannot_be_verified(tmp_path: Path) -> None:
    log = audit_log(tmp_path / "audit.jsonl")
    audit.key_path(log).unlink()
    with pytest.raises(CommandError, match="no audit key"):
        cli_commands.audit_verify(log)


def test_an_unkeyed_log_of_the_old_format_is_named_as_such(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    audit_log(log)
    old = {
        "event": "load",
        "hash": "0" * 64,
        "model": "m",
        "prev": "0" * 64,
        "reason": "",
        "seq": 1,
        "sha256": "0" * 64,
        "ts": 1,
        "version": "1",
    }
    log.write_text(canonical(old) + "\n")
    problem = audit.verify(log)
    assert problem is not None and problem.line == 1 and "unkeyed" in str(problem)
