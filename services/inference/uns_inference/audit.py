"""The model audit log: append-only JSON lines, an HMAC chain, and an anchor of its head.

Each line is one JSON object with sorted keys::

    {"event":"load","key":"3f2a…","mac":"…","model":"press-anomaly","prev":"…","reason":"",
     "seq":3,"sha256":"…","ts":1795334400000,"version":"1.2.0"}

* ``mac`` is the HMAC-SHA256, under the gateway's audit key, of the line's own JSON
  without ``mac``; ``prev`` is the previous line's ``mac`` (64 zeros for the first),
  so the chain runs through the keyed values: without the key, no line can be edited,
  re-hashed, removed or the whole log rebuilt (without the ``refuse`` lines, say)
  and still verify;
* ``seq`` counts lines from 1, so a deleted line shows as a gap;
* ``key`` names the key (the first 16 hex digits of its sha256), so a log re-keyed
  with a key of someone else's making shows as a key the auditor does not know.

The key is ``<log>.key`` (64 hex digits, mode 0600), created by the first writer.
What a chain cannot show is its last lines cut off: so every append also replaces
``<log>.anchor``, a keyed record of the line count and the last ``mac``; `verify`
refuses a log shorter than its anchor (or without one). What only a copy kept off the
box can show is the log, the anchor and the key rolled back or replaced together: the
service logs the head with every append and exports the line count and key id as
metrics, and ``uns audit verify`` prints the head, to compare with such a copy.

Writers (the service, ``uns model promote``) take an exclusive ``flock`` on the log
while appending, so two of them never fork the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

GENESIS: Final = "0" * 64
AuditEvent = Literal["load", "promote", "refuse"]
FIELDS: Final = (
    "event",
    "key",
    "mac",
    "model",
    "prev",
    "reason",
    "seq",
    "sha256",
    "ts",
    "version",
)
_ANCHOR_FIELDS: Final = ("head", "key", "lines", "mac")
_ANCHOR_DOMAIN: Final = b"uns audit anchor\n"
"""Prefix of what an anchor's mac covers, so a line's mac can never pass as an anchor's."""


class AuditKeyError(OSError):
    """The audit key is missing or unreadable."""


@dataclass(frozen=True, slots=True)
class Problem:
    """The first line (1-based) where the log fails, and why; line 0: the log as a whole."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line else self.reason


@dataclass(frozen=True, slots=True)
class Head:
    """The end of a log: how many lines, the sha256 of the last one, its mac and key id."""

    lines: int
    sha256: str
    mac: str = GENESIS
    key: str = ""


def key_path(log: Path) -> Path:
    return log.with_name(log.name + ".key")


def anchor_path(log: Path) -> Path:
    return log.with_name(log.name + ".anchor")


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def read_key(log: Path) -> bytes:
    """The audit key of ``log``; `AuditKeyError` when there is none or it is not one."""
    path = key_path(log)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise AuditKeyError(f"no audit key {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditKeyError(f"audit key {path}: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise AuditKeyError(f"audit key {path}: not a key (expected 64 hex digits)")
    return key


def _key_for_writing(log: Path) -> bytes:
    """The key, created (0600, never overwritten) if there is none yet. Under the lock."""
    path = key_path(log)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key(log)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(32) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return read_key(log)


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _mac(key: bytes, entry: dict[str, Any]) -> str:
    body = _canonical({k: v for k, v in entry.items() if k != "mac"})
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _anchor_mac(key: bytes, anchor: dict[str, Any]) -> str:
    body = _ANCHOR_DOMAIN + _canonical({k: v for k, v in anchor.items() if k != "mac"})
    return hmac.new(key, body, hashlib.sha256).hexdigest()


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


def _write_anchor(log: Path, key: bytes, lines: int, head: str) -> None:
    anchor: dict[str, Any] = {"lines": lines, "head": head, "key": key_id(key)}
    anchor["mac"] = _anchor_mac(key, anchor)
    path = anchor_path(log)
    staged = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with staged.open("wb") as f:
        f.write(_canonical(anchor) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)


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
    """Append one line (creating the file, its directory and the key); return the new head."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            key = _key_for_writing(path)
            last = _last_line(f)
            seq = 1
            prev = GENESIS
            if last is not None:
                try:
                    before = json.loads(last)
                    seq = int(before["seq"]) + 1
                    prev = str(before["mac"])
                except (ValueError, KeyError, TypeError):
                    seq, prev = 0, GENESIS  # the chain is already broken; verify says where
            entry: dict[str, Any] = {
                "ts": ts,
                "event": event,
                "model": model,
                "version": version,
                "sha256": sha256,
                "reason": reason,
                "prev": prev,
                "seq": seq,
                "key": key_id(key),
            }
            entry["mac"] = _mac(key, entry)
            line = _canonical(entry)
            f.seek(0, os.SEEK_END)
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
            _write_anchor(path, key, seq, entry["mac"])
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return Head(seq, hashlib.sha256(line).hexdigest(), entry["mac"], entry["key"])


def read(path: Path) -> list[dict[str, Any]]:
    """Every entry, in order (no checks: use `verify` for that)."""
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _lines(path: Path) -> list[bytes]:
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def verify(path: Path) -> Problem | None:
    """The first line where the log fails (edited, deleted, reordered, re-hashed, rebuilt
    without the key, cut off at the end), or None. `AuditKeyError` without its key."""
    key = read_key(path)
    kid = key_id(key)
    lines = _lines(path)
    prev = GENESIS
    for number, line in enumerate(lines, start=1):
        if not line:
            return Problem(number, "empty line")
        try:
            entry = json.loads(line)
        except ValueError:
            return Problem(number, "not JSON")
        if isinstance(entry, dict) and "hash" in entry and "mac" not in entry:
            return Problem(
                number,
                "an unkeyed line (written before the audit log was keyed): it cannot be"
                " verified; keep this log aside as it is and let a new one start",
            )
        if not isinstance(entry, dict) or set(entry) != set(FIELDS):
            return Problem(number, f"expected the fields {', '.join(FIELDS)}")
        if entry["key"] != kid:
            return Problem(number, f"written under key {entry['key']}, not this log's key {kid}")
        if not hmac.compare_digest(str(entry["mac"]), _mac(key, entry)):
            return Problem(number, "edited: its content does not match its mac")
        if entry["seq"] != number:
            return Problem(
                number, f"holds sequence number {entry['seq']}: lines before it were removed"
            )
        if entry["prev"] != prev:
            if number == 1:
                return Problem(1, "does not start a chain: lines before it were removed")
            return Problem(number, "does not follow the line before it: lines were removed")
        prev = entry["mac"]
    return _check_anchor(path, key, len(lines), prev)


def _check_anchor(path: Path, key: bytes, lines: int, head: str) -> Problem | None:
    anchor_file = anchor_path(path)
    try:
        anchor = json.loads(anchor_file.read_bytes())
    except FileNotFoundError:
        if lines == 0:
            return None
        return Problem(0, f"no anchor {anchor_file}: lines cut off the end would not show")
    except (OSError, ValueError) as exc:
        return Problem(0, f"anchor {anchor_file}: unreadable ({exc})")
    if (
        not isinstance(anchor, dict)
        or set(anchor) != set(_ANCHOR_FIELDS)
        or not isinstance(anchor["lines"], int)
        or not hmac.compare_digest(str(anchor["mac"]), _anchor_mac(key, anchor))
    ):
        return Problem(0, f"anchor {anchor_file}: edited, or not made with this log's key")
    anchored: int = anchor["lines"]
    if lines < anchored:
        return Problem(
            lines + 1,
            f"missing: the log ends at line {lines}, its anchor records {anchored} lines"
            " (lines were cut off the end)",
        )
    if lines > anchored + 1:  # a writer stopped between the line and the anchor: one at most
        return Problem(anchored + 2, f"not anchored: the anchor records {anchored} lines")
    entries = [json.loads(line) for line in _lines(path)]
    mac_at = entries[anchored - 1]["mac"] if anchored else GENESIS
    if mac_at != anchor["head"]:
        return Problem(
            anchored, "not the line its anchor records: the log was replaced from there on"
        )
    return None


def head(path: Path) -> Head:
    """Lines, last-line sha256, mac and key id of a log (64 zeros for an empty or missing one)."""
    if not path.exists():
        return Head(0, GENESIS)
    lines = [line for line in path.read_bytes().split(b"\n") if line]
    if not lines:
        return Head(0, GENESIS)
    mac, kid = GENESIS, ""
    try:
        last = json.loads(lines[-1])
        mac, kid = str(last["mac"]), str(last["key"])
    except (ValueError, KeyError, TypeError):
        pass  # not a keyed line: verify says so
    return Head(len(lines), hashlib.sha256(lines[-1]).hexdigest(), mac, kid)
