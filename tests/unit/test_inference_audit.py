"""The model audit log: an append-only keyed chain that names the line someone changed."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from uns_inference import audit


def write(path: Path, n: int) -> None:
    for i in range(n):
        audit.append(
            path,
            "load" if i % 2 else "promote",
            ts=1_795_334_400_000 + i,
            model="press-anomaly",
            version=f"1.{i}.0",
            sha256=hashlib.sha256(str(i).encode()).hexdigest(),
        )


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_appended_lines_form_a_chain_that_verifies(tmp_path: Path) -> None:
    log = tmp_path / "var" / "audit.jsonl"
    write(log, 5)
    assert audit.verify(log) is None
    entries = audit.read(log)
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == "0" * 64
    assert entries[3]["prev"] == entries[2]["mac"]
    head = audit.head(log)
    assert head.lines == 5 and head.sha256 == hashlib.sha256(lines(log)[-1]).hexdigest()
    assert head.mac == entries[-1]["mac"] and head.key == entries[0]["key"]


def test_an_edited_line_is_named(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 5)
    text = log.read_text().splitlines()
    text[2] = text[2].replace('"version":"1.2.0"', '"version":"9.9.9"')
    log.write_text("\n".join(text) + "\n")
    problem = audit.verify(log)
    assert problem is not None and problem.line == 3
    assert "edited" in str(problem)


def test_an_edit_that_recomputes_the_lines_own_hash_is_still_named(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 5)
    text = log.read_text().splitlines()
    entry = json.loads(text[1])
    entry["event"] = "refuse"
    del entry["mac"]
    entry["mac"] = hashlib.sha256(
        json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    text[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    log.write_text("\n".join(text) + "\n")
    problem = audit.verify(log)
    assert problem is not None and problem.line == 2


def test_an_edited_last_line_is_named(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 4)
    text = log.read_text().splitlines()
    text[-1] = text[-1].replace('"event":"load"', '"event":"promote"')
    log.write_text("\n".join(text) + "\n")
    problem = audit.verify(log)
    assert problem is not None and problem.line == 4


def test_a_deleted_line_is_detected_where_it_was(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 5)
    text = log.read_text().splitlines()
    del text[1]
    log.write_text("\n".join(text) + "\n")
    problem = audit.verify(log)
    assert problem is not None and problem.line == 2
    assert "removed" in problem.reason


def test_a_deleted_first_line_is_detected(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 3)
    log.write_text("\n".join(log.read_text().splitlines()[1:]) + "\n")
    problem = audit.verify(log)
    assert problem is not None and problem.line == 1


def test_writers_in_parallel_never_fork_the_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    threads = [threading.Thread(target=write, args=(log, 25)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit.verify(log) is None
    assert audit.head(log).lines == 100


def test_appending_after_a_broken_line_keeps_the_break_visible(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 3)
    with log.open("a") as f:
        f.write("garbage\n")
    write(log, 1)
    problem = audit.verify(log)
    assert problem is not None and problem.line == 4
