"""The model audit log: append-only JSON lines, hash-chained.

Each line is one JSON object with sorted keys::

    {"event":"load","hash":"…","model":"press-anomaly","prev":"…","reason":"","seq":3,
     "sha256":"…","ts":1795334400000,"version":"1.2.0"}

* ``prev`` is the sha256 of the previous line's bytes (without its newline); the first
  line's is 64 zeros;
* ``seq`` counts lines from 1, so a deleted line shows as a gap;
* ``hash`` is the sha256 of the line's own JSON without the ``hash`` field, so an edit
  of any line, the last one included, is seen.

`verify` returns the first line that breaks the chain. What a chain cannot show is
the *last* lines removed together: compare the head (`head`, printed by ``uns audit
verify`` and logged by the inference service on every append) with a copy kept
elsewhere. Writers (the service, ``uns model promote``) take an exclusive ``flock``
while appending, so two of them never fork the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

GENESIS: Final = "0" * 64
AuditEvent = Literal["load", "promote", "refuse"]
FIELDS: Final = ("event", "hash", "model", "prev", "reason", "seq", "sha256", "ts", "version")


@dataclass(frozen=True, slots=True)
class Problem:
    """The first line (1-based) where the chain breaks, and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Head:
    """The end of a sound chain: how many lines, and the sha256 of the last one."""

    lines: int
    sha256: str


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _last_line(f: IO[bytes]) -> bytes | None:
    """The last non-empty line of an open binary file (reads backwards from the end)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    pos = end
    chunk = b""
    while pos > 0:
        step = min(4096, pos)
        pos -= step
        f.seek(pos)
        chunk = f.read(step) + chunk
        stripped = chunk.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    stripped = chunk.rstrip(b"\n")
    return stripped or None


def append(
    path: Path,
    event: AuditEvent,
    *,
    ts: int,
    model: str,
    version: str,
    sha256: str,
    reason: str = "",
) -> Head:
    """Append one line (creating the file and its directory); return the new head."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            last = _last_line(f)
            seq = 1
            prev = GENESIS
            if last is not None:
                prev = hashlib.sha256(last).hexdigest()
                try:
                    seq = int(json.loads(last)["seq"]) + 1
                except (ValueError, KeyError, TypeError):
                    seq = 0  # the chain is already broken; verify says where
            entry: dict[str, Any] = {
                "ts": ts,
                "event": event,
                "model": model,
                "version": version,
                "sha256": sha256,
                "reason": reason,
                "prev": prev,
                "seq": seq,
            }
            entry["hash"] = _entry_hash(entry)
            line = _canonical(entry)
            f.seek(0, os.SEEK_END)
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return Head(seq, hashlib.sha256(line).hexdigest())


def read(path: Path) -> list[dict[str, Any]]:
    """Every entry, in order (no checks: use `verify` for that)."""
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def verify(path: Path) -> Problem | None:
    """The first line where the chain is broken (edited, deleted, reordered), or None."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    prev_line: bytes | None = None
    for number, line in enumerate(lines, start=1):
        if not line:
            return Problem(number, "empty line")
        try:
            entry = json.loads(line)
        except ValueError:
            return Problem(number, "not JSON")
        if not isinstance(entry, dict) or set(entry) != set(FIELDS):
            return Problem(number, f"expected the fields {', '.join(FIELDS)}")
        if entry["hash"] != _entry_hash(entry):
            return Problem(number, "edited: its content does not match its hash")
        if entry["seq"] != number:
            return Problem(
                number, f"holds sequence number {entry['seq']}: lines before it were removed"
            )
        expected = GENESIS if prev_line is None else hashlib.sha256(prev_line).hexdigest()
        if entry["prev"] != expected:
            if number == 1:
                return Problem(1, "does not start a chain: lines before it were removed")
            return Problem(
                number - 1, f"edited: it no longer matches the hash line {number} recorded of it"
            )
        prev_line = line
    return None


def head(path: Path) -> Head:
    """Lines and last-line hash of a log (64 zeros for an empty or missing one)."""
    if not path.exists():
        return Head(0, GENESIS)
    lines = [line for line in path.read_bytes().split(b"\n") if line]
    if not lines:
        return Head(0, GENESIS)
    return Head(len(lines), hashlib.sha256(lines[-1]).hexdigest())
