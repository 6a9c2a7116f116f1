"""A live view of the plant, rebuilt from what the namespace carries (for ``uns top``).

One row per device: online state (births and deaths, by the rules of `uns.tree`), the
latest anomaly score and its threshold, the remaining useful life where a model gives
one, the events open on it, its message rate and when it was last heard from. Beneath,
one row per service node: online, how many times it came back (a birth of a new session),
and, read from the ``/metrics`` URL its birth names, its connection, reconnects, drops and
journal depth. Where the plant service runs, one row per area, line and cell above them:
its retained health (and why) and OEE over the shift and the last hour (uns-schema/README.md,
Health and OEE), marked stale when the plant service's node is offline.

Everything comes from subscriptions; nothing is published, so a read-only credential is
enough. Events are not retained: the open events are those raised while the view watched.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from uns import payloads as p
from uns.bus import Bus
from uns.commands import Stop, on_broker
from uns.config import BrokerSettings
from uns.errors import PayloadError, TopicError
from uns.topics import HEALTH_LEVEL, OEE_LEVEL, DevicePath, NodeTopic, matches, parse
from uns.tree import NamespaceView, StreamInfo

FILTERS: Final = (
    "+/+/+/+/+/+/+/birth",
    "+/+/+/+/+/+/+/death",
    "+/+/_node/+/birth",
    "+/+/_node/+/death",
    "+/+/+/+/+/+/events/+",
    *("/".join(("+",) * n + (HEALTH_LEVEL,)) for n in (3, 4, 5)),
    f"+/+/+/+/{OEE_LEVEL}/+",
    f"+/+/+/+/+/{OEE_LEVEL}/+",
)
"""What the view subscribes to at QoS 1 (births, deaths, events; the health of areas, lines
and cells and their OEE)."""
DATA_FILTER: Final = "+/+/+/+/+/+/+/data"
"""Every stream's data, at QoS 0: counted for the rate, decoded only for scores."""

RATE_WINDOW_S: Final = 10.0
"""The message rate is over this many seconds (or since the view started, if shorter)."""
STALE_S: Final = 30.0
"""A score older than this is shown dim: the model stopped scoring the device."""
METRICS_TIMEOUT_S: Final = 1.0

SCORE: Final = "anomaly_score"
THRESHOLD: Final = "anomaly_threshold"
RUL: Final = "rul"


@dataclass
class DeviceState:
    """What the view learnt of one device from its data and events."""

    score: float | None = None
    threshold: float | None = None
    rul: float | None = None
    model: str = ""
    scored_at: float | None = None
    """When the latest score arrived (monotonic seconds)."""
    events: dict[str, p.Event] = field(default_factory=dict)
    """Open events by kind: raised or updated, not yet cleared."""
    arrivals: deque[float] = field(default_factory=deque)
    last_seen: float | None = None


@dataclass
class NodeState:
    """A service node across its sessions, and what its ``/metrics`` said last."""

    bdseq: int | None = None
    born: int | None = None
    """``ts`` of the latest birth."""
    died: bool = False
    restarts: int = 0
    """Births of a new session (another bdseq, or after a death) since the view started:
    the service restarted or reconnected."""
    metrics: dict[str, float] | None = None
    metrics_error: str = ""


@dataclass
class GroupState:
    """An area's, line's or cell's retained health and OEE (by window)."""

    health: p.Health | None = None
    oee: dict[str, p.Oee] = field(default_factory=dict)


class PlantView:
    """The state behind the screen; `add` takes every message, `render` draws it."""

    def __init__(
        self,
        configured: Iterable[DevicePath] = (),
        *,
        home: tuple[str, str] = ("", ""),
        topic_filter: str = "#",
        clock: float | None = None,
    ) -> None:
        self.home = home
        self.topic_filter = topic_filter
        self.namespace = NamespaceView()
        self.devices: dict[DevicePath, DeviceState] = {}
        self.nodes: dict[tuple[str, str, str], NodeState] = {}
        self.groups: dict[str, GroupState] = {}
        self.started = time.monotonic() if clock is None else clock
        for path in configured:
            if matches(topic_filter, f"{path}/raw/data"):
                self.devices[path] = DeviceState()

    def reconnected(self) -> None:
        """A new connection: the retained births it brings are the namespace now (a broker
        that restarted empty has none of the old ones); data and events are kept."""
        self.namespace = NamespaceView()

    # ---- taking messages -------------------------------------------------------------------

    def add(
        self, topic: str, payload: bytes, retained: bool = False, now: float | None = None
    ) -> None:
        """Take one message; a retained one (a birth from before the view started) does not
        count as the device heard from."""
        if not matches(self.topic_filter, topic):
            return
        levels = topic.split("/")
        if levels[-1] == HEALTH_LEVEL or (len(levels) > 2 and levels[-2] == OEE_LEVEL):
            self._group(levels, payload)
            return
        try:
            parsed = parse(topic)
        except TopicError:
            return
        now = time.monotonic() if now is None else now
        if isinstance(parsed, NodeTopic):
            self.namespace.add(topic, payload)
            if payload:
                self._node(parsed, payload)
            return
        device = self.devices.setdefault(parsed.path, DeviceState())
        if parsed.message in ("birth", "death"):
            self.namespace.add(topic, payload)
        elif parsed.stream == "events":
            self._event(device, payload)
        elif parsed.message == "data":
            device.arrivals.append(now)
            if parsed.stream == "scores":
                self._scores(device, payload, now)
        if payload and not retained:
            device.last_seen = now

    def _node(self, topic: NodeTopic, payload: bytes) -> None:
        state = self.nodes.setdefault((topic.enterprise, topic.site, topic.node_id), NodeState())
        if topic.message == "death":
            state.died = True
        elif topic.message == "birth":
            try:
                birth: p.NodeBirth = p.decode(payload, p.NodeBirth)
            except PayloadError:
                return
            # a new session: another bdseq, or the same after a death (a restart that
            # counts from 0 again); not the same retained birth brought by a reconnect,
            # nor a rebirth on request (same bdseq, no death)
            again = state.born == birth.ts
            if state.born is not None and not again and (state.died or birth.bdseq != state.bdseq):
                state.restarts += 1
            state.bdseq, state.born, state.died = birth.bdseq, birth.ts, state.died and again

    def _group(self, levels: list[str], payload: bytes) -> None:
        health = levels[-1] == HEALTH_LEVEL
        path = "/".join(levels[:-1] if health else levels[:-2])
        if not payload:
            return
        try:
            message: p.Health | p.Oee = (
                p.decode(payload, p.Health) if health else p.decode(payload, p.Oee)
            )
        except PayloadError:
            return
        group = self.groups.setdefault(path, GroupState())
        if isinstance(message, p.Health):
            group.health = message
        else:
            group.oee[message.window] = message

    def _event(self, device: DeviceState, payload: bytes) -> None:
        try:
            event: p.Event = p.decode(payload, p.Event)
        except PayloadError:
            return
        if event.state == "cleared":
            device.events.pop(event.kind, None)
        else:
            device.events[event.kind] = event

    def _scores(self, device: DeviceState, payload: bytes, now: float) -> None:
        try:
            data: p.DeviceData = p.decode(payload, p.DeviceData)
        except PayloadError:
            return
        values = {
            m.name: float(m.value)
            for m in data.metrics
            if isinstance(m.value, (int, float)) and not isinstance(m.value, bool)
        }
        if SCORE in values:
            device.score, device.threshold = values[SCORE], values.get(THRESHOLD)
            device.scored_at = now
        if RUL in values:
            device.rul = values[RUL]
            device.scored_at = now
        if data.model is not None:
            device.model = f"{data.model.name}@{data.model.version}"

    def rate(self, device: DeviceState, now: float) -> float:
        """Data messages per second of the device, over `RATE_WINDOW_S`."""
        while device.arrivals and device.arrivals[0] < now - RATE_WINDOW_S:
            device.arrivals.popleft()
        span = min(RATE_WINDOW_S, now - self.started)
        return len(device.arrivals) / span if span > 0 else 0.0

    # ---- what is shown --------------------------------------------------------------------

    def online_devices(self) -> int:
        return sum(1 for path in self.devices if self._state(path)[0] == "online")

    def open_events(self) -> int:
        return sum(len(d.events) for d in self.devices.values())

    def render(self, header: RenderableType, now: float | None = None) -> Group:
        now = time.monotonic() if now is None else now
        tables: list[RenderableType] = [header, Text("")]
        if any(path.count("/") >= 2 for path in self.groups):
            tables += [self._group_table(), Text("")]
        return Group(*tables, self._device_table(now), Text(""), self._node_table())

    def _stale(self, node: str, path: str) -> bool:
        """Whether the plant node that published a group's message is offline now."""
        enterprise, site = path.split("/")[:2]
        return bool(node) and not self.namespace.node_online(enterprise, site, node)

    def _group_table(self) -> Table:
        table = _table(
            ("line / cell", "left"),
            ("health", "left"),
            ("why", "left"),
            ("OEE shift", "right"),
            ("avail", "right"),
            ("perf", "right"),
            ("quality", "right"),
            ("OEE hour", "right"),
        )
        for path in sorted(self.groups, key=lambda g: g.split("/")):
            if path.count("/") < 2:
                continue  # the site: its devices are the table below
            g = self.groups[path]
            h, shift, hour = g.health, g.oee.get("shift"), g.oee.get("hour")
            stale = any(self._stale(m.node, path) for m in (h, shift, hour) if m is not None)
            state = Text("-", style="dim")
            why = Text("")
            if h is not None:
                style = {"ok": "green", "warning": "yellow", "critical": "bold red"}[h.state]
                state = Text(h.state + (" (stale)" if stale else ""), style=style)
                if h.causes:
                    more = f" (+{len(h.causes) - 1})" if len(h.causes) > 1 else ""
                    why = Text(
                        f"{h.causes[0].device.rsplit('/', 1)[-1]}: {h.causes[0].reason}{more}"
                    )
            name = (
                "/".join(path.split("/")[2:]) if tuple(path.split("/")[:2]) == self.home else path
            )
            table.add_row(
                "  " * (path.count("/") - 2) + name,
                state,
                why,
                _pct(shift.oee if shift else None, dim=stale),
                _pct(shift.availability if shift else None, dim=stale),
                _pct(shift.performance if shift else None, dim=stale),
                _pct(
                    shift.quality if shift else None,
                    dim=stale,
                    flagged=bool(shift and "quality_assumed" in shift.flags),
                ),
                _pct(hour.oee if hour else None, dim=stale),
            )
        return table

    def _name(self, path: DevicePath) -> str:
        if (path.enterprise, path.site) == self.home:
            return "/".join(path.levels[2:])
        return str(path)

    def _state(self, path: DevicePath) -> tuple[str, str]:
        """(state, style): online when every stream born is online."""
        streams = self.namespace.devices.get(path, {})
        born = {name: s for name, s in streams.items() if s.birth is not None or s.death}
        if not born:
            return "no birth", "dim"
        down = [n for n, s in sorted(born.items()) if not self.namespace.stream_online(path, s)]
        if not down:
            return "online", "green"
        if "raw" in down or len(down) == len(born):
            return f"offline{_why(streams.get('raw') or born[down[0]], self.namespace)}", "red"
        return f"{', '.join(down)} offline", "yellow"

    def _device_table(self, now: float) -> Table:
        table = _table(
            ("device", "left"),
            ("state", "left"),
            ("score", "right"),
            ("threshold", "right"),
            ("rul", "right"),
            ("model", "left"),
            ("open events", "left"),
            ("msg/s", "right"),
            ("last seen", "right"),
        )
        for path in sorted(self.devices):
            d = self.devices[path]
            state, style = self._state(path)
            stale = d.scored_at is None or now - d.scored_at > STALE_S
            score = Text("-", style="dim")
            if d.score is not None:
                breach = d.threshold is not None and d.score >= d.threshold
                score = Text(_figure(d.score), style="bold red" if breach else "green")
                if stale:
                    score.stylize("dim")
            table.add_row(
                self._name(path),
                Text(state, style=style),
                score if d.score is not None or self._scored(path) else Text("no model", "dim"),
                _num(d.threshold),
                _num(d.rul, self._rul_unit(path)),
                Text(d.model or "-", style="dim"),
                _events(d.events),
                f"{self.rate(d, now):.1f}",
                _ago(None if d.last_seen is None else now - d.last_seen),
            )
        return table

    def _scored(self, path: DevicePath) -> bool:
        return "scores" in self.namespace.devices.get(path, {})

    def _rul_unit(self, path: DevicePath) -> str:
        stream = self.namespace.devices.get(path, {}).get("scores")
        for metric in stream.birth.metrics if stream and stream.birth else []:
            if metric.name == RUL:
                return metric.unit
        return ""

    def _node_table(self) -> Table:
        table = _table(
            ("node", "left"),
            ("service", "left"),
            ("version", "left"),
            ("host", "left"),
            ("state", "left"),
            ("up", "right"),
            ("restarts", "right"),
            ("connected", "left"),
            ("reconnects", "right"),
            ("drops", "right"),
            ("journal", "right"),
        )
        for key in sorted(self.namespace.nodes):
            info = self.namespace.nodes[key]
            state = self.nodes.get(key, NodeState())
            m = state.metrics or {}
            birth = info.birth
            alive = self.namespace.node_online(*key)  # at a central broker: its site's relay too
            up = (p.now_ms() - birth.ts) / 1000 if birth and alive else None
            if alive:
                online = Text("online", style="green")
            elif info.online:  # its birth stands, but its box is cut off from this broker
                online = Text(f"offline{self.namespace.cut_off_note(*key)}", style="red")
            else:
                reason = f" ({info.death.reason})" if info.death and info.death.reason else ""
                online = Text(f"offline{reason}", style="red")
            connected = Text("-", style="dim")
            if state.metrics_error and info.online:
                connected = Text(state.metrics_error, style="yellow")
            elif "uns_connected" in m:
                yes = m["uns_connected"] >= 1
                connected = Text("yes" if yes else "no", style="green" if yes else "red")
            table.add_row(
                info.node_id if key[:2] == self.home else "/".join(key),
                (birth.service if birth else "") or "-",
                (birth.version if birth else "") or "-",
                (birth.host if birth else "") or "-",
                online,
                _ago(up, suffix=""),
                str(state.restarts),
                connected,
                _count(m.get("uns_reconnects_total")),
                _count(m.get("uns_messages_dropped_total")),
                _count(m.get("uns_bridge_journal_messages")),
            )
        return table

    # ---- the services' /metrics -------------------------------------------------------------

    def metrics_urls(self) -> dict[tuple[str, str, str], str]:
        """The ``/metrics`` URL of every online node whose birth names one."""
        return {
            key: info.birth.metrics_url
            for key, info in self.namespace.nodes.items()
            if info.online and info.birth and info.birth.metrics_url
        }

    def set_metrics(self, key: tuple[str, str, str], values: dict[str, float] | str) -> None:
        state = self.nodes.setdefault(key, NodeState())
        if isinstance(values, str):
            state.metrics_error = values
        else:
            state.metrics, state.metrics_error = values, ""


WANTED: Final = (
    "uns_connected",
    "uns_reconnects_total",
    "uns_messages_dropped_total",
    "uns_bridge_journal_messages",
)


def scrape(url: str, timeout: float = METRICS_TIMEOUT_S) -> dict[str, float] | str:
    """The `WANTED` series of one ``/metrics`` page (summed over labels), or why not."""
    from prometheus_client.parser import text_string_to_metric_families

    host = url.replace("://0.0.0.0:", "://127.0.0.1:")  # a node listening on every address
    try:
        with urllib.request.urlopen(host, timeout=timeout) as response:
            text = response.read(1_000_000).decode("utf-8", errors="replace")
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in WANTED:
                    out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
        return out
    except (OSError, ValueError) as exc:
        return f"no /metrics ({type(exc).__name__})"


class LastLine(io.TextIOBase):
    """Stands in for stderr under the live screen: keeps the last line written (the
    reconnect helper's "...; retrying in 2.0 s"), for the header to show."""

    def __init__(self) -> None:
        self.line = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str | bytes) -> int:  # type: ignore[override]
        text = s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            self.line = lines[-1]
        return len(s)


def _why(stream: StreamInfo, namespace: NamespaceView) -> str:
    if stream.death is not None:
        return f" ({stream.death.reason})" if stream.death.reason else ""
    if stream.birth is not None:
        return f" (node {stream.birth.node} offline)"
    return ""


def _events(events: dict[str, p.Event]) -> Text:
    if not events:
        return Text("-", style="dim")
    out = Text()
    styles = {"critical": "bold red", "warning": "red", "info": "yellow"}
    for i, kind in enumerate(sorted(events)):
        e = events[kind]
        if i:
            out.append(", ")
        out.append(kind, style=styles.get(e.severity, "red"))
        out.append(f" {e.severity}" + (f" x{e.count}" if e.count > 1 else ""), style="dim")
    return out


def _pct(value: float | None, *, dim: bool = False, flagged: bool = False) -> Text:
    """A factor as a percentage; ``flagged``: assumed, not measured (a trailing ``*``)."""
    if value is None:
        return Text("-", style="dim")
    return Text(f"{value:.1%}{'*' if flagged else ''}", style="dim" if dim else "")


def _num(value: float | None, unit: str = "") -> Text:
    if value is None:
        return Text("-", style="dim")
    return Text(_figure(value) + (f" {unit}" if unit and unit != "1" else ""))


def _figure(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 10_000 else f"{value:.3g}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _ago(seconds: float | None, suffix: str = " ago") -> Text:
    if seconds is None:
        return Text("-", style="dim")
    seconds = max(seconds, 0.0)
    if seconds < 10:
        text = f"{seconds:.1f} s"
    elif seconds < 120:
        text = f"{seconds:.0f} s"
    elif seconds < 7200:
        text = f"{seconds / 60:.0f} min"
    else:
        text = f"{seconds / 3600:.0f} h"
    return Text(text + suffix)


# ---- running it ------------------------------------------------------------------------------

METRICS_EVERY_S: Final = 5.0


@dataclass
class Link:
    """The connection as the header tells it."""

    url: str
    connected: bool = False
    since: float = field(default_factory=time.time)
    connections: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    last_error: LastLine = field(default_factory=LastLine)

    def header(self, view: PlantView, *, live: bool) -> Text:
        out = Text("uns top", style="bold")
        if view.home != ("", ""):
            out.append(f"  {'/'.join(view.home)}", style="bold")
        out.append(f"  {self.url}  ")
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        if self.connected:
            out.append(f"connected since {since}", style="green")
        elif self.connections:
            out.append(f"broker unreachable since {since}", style="bold red")
        else:
            out.append("connecting", style="yellow")
        online, total = view.online_devices(), len(view.devices)
        out.append(
            f"  devices {online}/{total} online", style="green" if online == total else "red"
        )
        events = view.open_events()
        out.append(f"  open events {events}", style="red" if events else "")
        out.append(f"  {time.strftime('%H:%M:%S')}", style="dim")
        if live:
            out.append("  q quits", style="dim")
        if not self.connected and self.last_error.line:
            out.append(f"\n{self.last_error.line}", style="red")
        return out


async def watch(
    view: PlantView,
    url: str,
    shown_url: str,
    settings: BrokerSettings,
    stop: Stop,
    *,
    once: bool,
    wait_s: float,
    refresh_s: float,
    scrape_metrics: bool,
) -> int:
    """Run the view until ``stop`` (q, Ctrl-C), or print one frame (``once``); the exit code."""
    link = Link(shown_url)

    async def work(bus: Bus) -> None:
        view.reconnected()
        for f in FILTERS:
            await bus.subscribe(f, qos=1)
        await bus.subscribe(DATA_FILTER, qos=0)
        link.connected, link.since = True, time.time()
        link.connections += 1
        link.reached.set()
        try:
            async for message in bus.messages():
                view.add(message.topic, message.payload, message.retain)
        finally:
            link.connected, link.since = False, time.time()

    if once:
        return await _once(view, link, url, settings, stop, work, wait_s, scrape_metrics)
    return await _live(view, link, url, settings, stop, work, refresh_s, scrape_metrics)


async def _once(
    view: PlantView,
    link: Link,
    url: str,
    settings: BrokerSettings,
    stop: Stop,
    work: Callable[[Bus], Awaitable[None]],
    wait_s: float,
    scrape_metrics: bool,
) -> int:
    task = asyncio.create_task(on_broker(url, settings, stop, work))
    ended = asyncio.create_task(stop.wait())
    try:
        reached = asyncio.create_task(link.reached.wait())
        await asyncio.wait(
            {reached, task, ended}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
        )
        reached.cancel()
        if link.connections:
            await asyncio.wait({task, ended}, timeout=wait_s)
    finally:
        shown = link.connected, link.since  # the frame is of what the connection showed
        ended.cancel()
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        link.connected, link.since = shown
    if not link.connections:
        print(f"never reached the broker at {link.url}", file=sys.stderr)
        return 1
    if scrape_metrics:
        await _scrape_all(view)
    console = Console() if sys.stdout.isatty() else Console(width=240)
    console.print(view.render(link.header(view, live=False)))
    return 0


async def _live(
    view: PlantView,
    link: Link,
    url: str,
    settings: BrokerSettings,
    stop: Stop,
    work: Callable[[Bus], Awaitable[None]],
    refresh_s: float,
    scrape_metrics: bool,
) -> int:
    from rich.live import Live

    async def paint(live: Live) -> None:
        while True:
            live.update(view.render(link.header(view, live=True)), refresh=True)
            await asyncio.sleep(refresh_s)

    async def scraper() -> None:
        while True:
            await _scrape_all(view)
            await asyncio.sleep(METRICS_EVERY_S)

    err = sys.stderr
    sys.stderr = link.last_error  # the reconnect helper's lines go to the header
    tasks: list[asyncio.Task[None]] = []
    try:
        with _keys(stop), Live(auto_refresh=False, screen=True, redirect_stderr=False) as live:
            tasks.append(asyncio.create_task(paint(live)))
            if scrape_metrics:
                tasks.append(asyncio.create_task(scraper()))
            await on_broker(url, settings, stop, work)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=1.0)
    finally:
        sys.stderr = err
    return 0


async def _scrape_all(view: PlantView) -> None:
    urls = view.metrics_urls()
    results = await asyncio.gather(*(asyncio.to_thread(scrape, u) for u in urls.values()))
    for key, values in zip(urls, results, strict=True):
        view.set_metrics(key, values)


@contextmanager
def _keys(stop: Stop) -> Iterator[None]:
    """``q`` stops the view as Ctrl-C does: the terminal in cbreak mode (keys without
    Enter, Ctrl-C still a signal) while the view runs, as it was afterwards."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def key() -> None:
        if b"q" in os.read(fd, 64).lower():
            # as Ctrl-C does: the stop and its grace (a connect stuck in a thread cannot
            # hold the exit); the code stays 0
            os.kill(os.getpid(), signal.SIGINT)

    tty.setcbreak(fd)
    loop.add_reader(fd, key)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _table(*columns: tuple[str, str]) -> Table:
    """A frame's table: (header, justify) per column, one line per row."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    return table
