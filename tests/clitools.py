"""Running the `uns` command as a user does: as processes, their output read as it comes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any


def uns(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``uns ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "uns", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


class Proc:
    """A background `uns ...` process; its stderr is read continuously (the pipe never
    fills) and a test can wait for a line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.p = subprocess.Popen(
            [sys.executable, "-m", "uns", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._seen = 0
        self._changed = threading.Condition()
        self._done = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait_line(self, text: str, timeout: float = 60) -> str:
        """The next line (after those already waited for) that contains ``text``."""
        with self._changed:
            while True:
                while self._seen < len(self.lines):
                    line = self.lines[self._seen]
                    self._seen += 1
                    if text in line:
                        return line
                if self._done:
                    break
                if not self._changed.wait(timeout):
                    raise AssertionError(
                        f"{self.args}: no {text!r} within {timeout} s:\n" + "".join(self.lines)
                    )
        raise AssertionError(f"{self.args} ended without saying {text!r}:\n" + "".join(self.lines))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        return self.p.wait(timeout=30)


def start(procs: list[Proc], *args: str, ready: str | None = None, **kw: Any) -> Proc:
    p = Proc(*args, **kw)
    procs.append(p)
    if ready:
        p.wait_line(ready)
    return p


def sub_json(url: str, topic_filter: str, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    r = uns(
        "sub",
        topic_filter,
        "--json",
        "--count",
        str(count),
        "--timeout",
        str(timeout),
        "--broker",
        url,
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]
