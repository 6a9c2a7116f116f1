"""Events -> work-order operations: one work order per fault, storms as one line incident
(pure: no I/O, no clock of its own; the service passes ``now_ms``).

* A work order's **key** is its idempotency key: a device fault's is the event id; a line
  incident's is its first event's id with ``-storm``. `State.events` maps every event id
  seen to its work order, so an event delivered again (a restart, a re-delivery) opens
  nothing and a clear finds what its raise opened.
* **Storm rule**: a raise (or an ``updated`` event never seen raised) of a device on a
  line with no open line incident is *held* for ``correlate_s`` from the line's first held
  raise. If raises of ``correlate_min`` distinct devices of the line are held together,
  one line incident is opened at once with them attached; later raises on that line, while
  it is open, are attached to it (an update) instead of opening their own. When the window
  ends with fewer devices, each held fault gets its own work order (already cleared ones
  are opened and resolved, so the technician still sees them).
* A clear resolves a device work order; a line incident is updated per clear and resolved
  when its last attached event has cleared.
* Each operation of a work order has a number ``n`` (0 = open), fixed when it is decided:
  the sender delivers each number once (`Order.sent`), so an operation journaled twice
  (a crash between the journal's commit and the state file's) is sent once.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from uns.payloads import Event

Action = Literal["open", "update", "resolve"]
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


class Member(msgspec.Struct, kw_only=True):
    """One device event as a work order carries it."""

    id: str
    device: str
    kind: str
    state: str
    """raised / updated / cleared (the last seen)."""
    severity: str
    started: int
    summary: str = ""
    score: float | None = None
    threshold: float | None = None
    ts: int = 0
    """Data time of the last transition seen (ms)."""
    details: dict[str, float | str] = {}

    @classmethod
    def of(cls, e: Event) -> Member:
        return cls(
            id=e.id,
            device=e.device,
            kind=e.kind,
            state=e.state,
            severity=e.severity,
            started=e.started,
            summary=e.summary,
            score=e.score,
            threshold=e.threshold,
            ts=e.data_ts or e.ts,
            details=dict(e.details),
        )


class Order(msgspec.Struct, kw_only=True):
    """A work order: a device's fault, or a line's storm."""

    key: str
    kind: Literal["device", "line"]
    path: str
    """The device (device work order) or the line (line incident): ServiceNow's cmdb_ci."""
    status: Literal["open", "resolved"] = "open"
    opened_ms: int
    resolved_ms: int | None = None
    members: dict[str, Member] = {}
    ops: int = 0
    """Operations decided so far (the next one's ``n``)."""
    sent: int = 0
    """Operations the webhook accepted or refused (delivered ``n`` < sent are skipped)."""
    ref: str | None = None
    """The receiver's record id (ServiceNow: the sys_id the create returned)."""
    refused: bool = False
    """Its open went to the dead letter: its updates go there too."""

    def severity(self) -> str:
        """The worst of its events'."""
        return max(
            (m.severity for m in self.members.values()),
            key=lambda s: SEVERITY_RANK.get(s, 0),
            default="warning",
        )


class Held(msgspec.Struct, kw_only=True):
    """Raises of one line waiting for the storm window to end."""

    line: str
    since_ms: int
    """When the first of them arrived (wall clock, ms): the window ends correlate_s later."""
    members: list[Member] = []


class State(msgspec.Struct, kw_only=True):
    """What the state file keeps."""

    orders: dict[str, Order] = {}
    events: dict[str, str] = {}
    """Event id -> its work order's key (every event seen, while its order is kept)."""
    held: dict[str, Held] = {}
    unknown_clears: int = 0


class Op(msgspec.Struct, kw_only=True, frozen=True):
    """One operation on a work order, as journaled (deterministic: decided again from the
    same state and event it is byte-identical, so the journal recognises a re-delivery)."""

    action: Action
    key: str
    n: int
    kind: Literal["device", "line"]
    path: str
    severity: str
    status: Literal["open", "resolved"]
    members: list[Member]
    cause: Member | None = None
    """The device event that made this operation."""
    window_s: float = 0.0


def line_of(device: str) -> str:
    return "/".join(device.split("/")[:4])


class Correlator:
    def __init__(self, state: State, correlate_s: float, correlate_min: int) -> None:
        self.state = state
        self.window_ms = round(correlate_s * 1000)
        self.min = correlate_min

    # ---- events ------------------------------------------------------------------------

    def on_event(self, e: Event, now_ms: int) -> list[Op]:
        """The operations ``e`` makes (none for an event seen already, or a clear of an
        event never seen)."""
        st = self.state
        m = Member.of(e)
        if (key := st.events.get(e.id)) is not None:
            order = st.orders.get(key)
            if order is None:
                return []
            return self._known(order, m)
        line = line_of(e.device)
        held = st.held.get(line)
        if held is not None:
            for i, h in enumerate(held.members):
                if h.id == e.id:
                    if _rank(m) >= _rank(h):
                        held.members[i] = _merge(h, m)
                    return []
        if e.state == "cleared":
            st.unknown_clears += 1
            return []
        incident = self._open_incident(line)
        if incident is not None:
            incident.members[m.id] = m
            st.events[m.id] = incident.key
            return [self._op(incident, "update", m)]
        if self.window_ms == 0:
            return self._device_orders([m], now_ms)
        if held is None:
            held = st.held[line] = Held(line=line, since_ms=now_ms)
        held.members.append(m)
        if len({h.device for h in held.members}) >= self.min:
            del st.held[line]
            return self._line_incident(held, now_ms)
        return []

    def due(self, now_ms: int) -> list[Op]:
        """Windows that have ended: each held fault its own work order."""
        ops: list[Op] = []
        for line, held in list(self.state.held.items()):
            if now_ms - held.since_ms >= self.window_ms:
                del self.state.held[line]
                ops += self._device_orders(held.members, now_ms)
        return ops

    def next_due_ms(self) -> int | None:
        ends = [h.since_ms + self.window_ms for h in self.state.held.values()]
        return min(ends) if ends else None

    def prune(self, now_ms: int, keep_ms: int) -> int:
        """Forget work orders resolved more than ``keep_ms`` ago; return how many."""
        st = self.state
        old = [
            k
            for k, o in st.orders.items()
            if o.status == "resolved"
            and o.resolved_ms is not None
            and now_ms - o.resolved_ms > keep_ms
            and o.sent >= o.ops
        ]
        for k in old:
            for event_id in st.orders.pop(k).members:
                st.events.pop(event_id, None)
        return len(old)

    # ---- internals ---------------------------------------------------------------------

    def _known(self, order: Order, m: Member) -> list[Op]:
        before = order.members.get(m.id)
        if before is None or before.state == "cleared" or m.state == "raised":
            return []  # a repeat: a raise seen already, or anything after the final clear
        if m.state == "updated" and (m.severity, m.summary) == (before.severity, before.summary):
            return []
        order.members[m.id] = _merge(before, m)
        if order.status == "resolved":
            return []
        if m.state == "cleared" and all(x.state == "cleared" for x in order.members.values()):
            order.status = "resolved"
            order.resolved_ms = m.ts
            return [self._op(order, "resolve", m)]
        return [self._op(order, "update", m)]

    def _open_incident(self, line: str) -> Order | None:
        for order in self.state.orders.values():
            if order.kind == "line" and order.path == line and order.status == "open":
                return order
        return None

    def _line_incident(self, held: Held, now_ms: int) -> list[Op]:
        first = held.members[0]
        order = Order(key=f"{first.id}-storm", kind="line", path=held.line, opened_ms=now_ms)
        return self._open(order, held.members, first)

    def _device_orders(self, members: list[Member], now_ms: int) -> list[Op]:
        ops: list[Op] = []
        for m in members:
            order = Order(key=m.id, kind="device", path=m.device, opened_ms=now_ms)
            ops += self._open(order, [m], m)
        return ops

    def _open(self, order: Order, members: list[Member], cause: Member) -> list[Op]:
        st = self.state
        st.orders[order.key] = order
        for m in members:
            order.members[m.id] = m
            st.events[m.id] = order.key
        ops = [self._op(order, "open", cause)]
        if all(m.state == "cleared" for m in members):
            order.status = "resolved"
            order.resolved_ms = max(m.ts for m in members)
            ops.append(self._op(order, "resolve", cause))
        return ops

    def _op(self, order: Order, action: Action, cause: Member) -> Op:
        n = order.ops
        order.ops += 1
        return Op(
            action=action,
            key=order.key,
            n=n,
            kind=order.kind,
            path=order.path,
            severity=order.severity(),
            status="resolved" if action == "resolve" else "open",
            members=[msgspec.structs.replace(m) for m in order.members.values()],
            cause=cause,
            window_s=self.window_ms / 1000,
        )


def _rank(m: Member) -> int:
    return 2 if m.state == "cleared" else 1


def _merge(before: Member, after: Member) -> Member:
    """The later view of one event (a clear keeps the raise's summary as well)."""
    if after.state == "cleared" and before.summary and after.summary != before.summary:
        return msgspec.structs.replace(after, summary=f"{before.summary}; {after.summary}")
    return after
