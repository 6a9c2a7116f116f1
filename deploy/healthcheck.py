"""Is this container's service healthy? Its ``/metrics`` answers and it is on the broker.

Docker runs this in the service's container (docker-compose.yml ``healthcheck``):
``python /opt/uns/deploy/healthcheck.py PORT``, PORT the service's metrics port. A
process that is up but off the broker (Mosquitto down, its login refused) is not healthy:
it has ``uns_connected`` 0 and does nothing useful; a process whose ``/metrics`` does not
answer is hung or gone. Exit 0 when healthy, else 1 with one line saying why (Docker
keeps it: ``docker inspect --format '{{json .State.Health}}' CONTAINER``).

Only the standard library, and nothing of ``uns`` imported: it runs every few seconds
beside the service and must cost next to nothing.
"""

from __future__ import annotations

import sys
import urllib.request

CONNECTED = "uns_connected{"


def check(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> str | None:
    """None when healthy, else why not."""
    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"{url} does not answer: {exc}"
    values = [line.rsplit(" ", 1)[-1] for line in text.splitlines() if line.startswith(CONNECTED)]
    if not values:
        return f"{url} has no uns_connected: not a uns service?"
    if any(float(v) != 1 for v in values):
        return "not connected to the broker (uns_connected is 0)"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: healthcheck.py METRICS_PORT", file=sys.stderr)
        return 2
    problem = check(int(argv[1]))
    if problem:
        print(problem)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
