"""Running the `uns` command as a user does: as processes, their output read as it comes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from fixtures.output import Lines


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
        self.err = Lines(self.p.stderr, name=f"uns {' '.join(args)}")
        self._seen = 0

    @property
    def lines(self) -> list[str]:
        """Its stderr so far."""
        with self.err.cond:
            return [line for _, line in self.err.lines]

    def wait_line(self, text: str, timeout: float = 60) -> str:
        """The next line (after those already waited for) that contains ``text``, within
        ``timeout`` seconds of the last line printed."""
        at = self.err.expect(text, timeout, start=self._seen, idle=True)
        self._seen = at + 1
        return self.err.lines[at][1]

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
