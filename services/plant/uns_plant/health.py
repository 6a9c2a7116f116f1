"""The health rule (also in uns-schema/README.md, Health): pure, so it is tested alone.

A device's own state is the worst of its signals:

* ``critical``: it is offline (its raw stream's death), or a ``critical`` event is open;
* ``warning``: a ``warning`` event is open, its latest anomaly score is above its threshold,
  or its RUL is at most ``rul_warning`` (settings);
* ``ok`` otherwise (also before anything was heard of it: unknown is not a fault).

Its criticality caps what it does to its groups: a ``low`` or ``medium`` asset makes them
at most ``warning``, a ``high`` or ``critical`` one can make them ``critical``. A cell,
line, area and site is the worst of its devices so capped (worst-of: critical > warning >
ok). So a critical open event on a critical asset makes its cell, line, area and site
critical; the same event on a medium conveyor makes them warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uns.payloads import HealthCause, HealthState

RANK: dict[HealthState, int] = {"ok": 0, "warning": 1, "critical": 2}
CAP: dict[str, HealthState] = {
    "low": "warning",
    "medium": "warning",
    "high": "critical",
    "critical": "critical",
}


def worst(states: list[HealthState]) -> HealthState:
    return max(states, key=RANK.__getitem__, default="ok")


@dataclass
class DeviceState:
    """What the namespace said of one device lately."""

    path: str
    criticality: str = "medium"
    online: bool | None = None
    """None until its raw stream's birth or death is seen."""
    score: float | None = None
    threshold: float | None = None
    rul: float | None = None
    events: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Open events: id -> (kind, severity)."""

    def signals(self, rul_warning: float | None) -> list[tuple[HealthState, str]]:
        """Each fault it shows, with its state before the criticality cap."""
        out: list[tuple[HealthState, str]] = []
        if self.online is False:
            out.append(("critical", "offline"))
        for kind, severity in self.events.values():
            if severity == "critical":
                out.append(("critical", f"critical {kind} event open"))
            elif severity == "warning":
                out.append(("warning", f"warning {kind} event open"))
        if self.score is not None and self.threshold is not None and self.score > self.threshold:
            out.append(("warning", f"anomaly score {self.score:g} above {self.threshold:g}"))
        if self.rul is not None and rul_warning is not None and self.rul <= rul_warning:
            out.append(("warning", f"RUL {self.rul:g} at most {rul_warning:g}"))
        return out

    def health(self, rul_warning: float | None) -> tuple[HealthState, str]:
        """Its state as its groups count it (capped by criticality), and why."""
        signals = self.signals(rul_warning)
        if not signals:
            return "ok", ""
        own = worst([s for s, _ in signals])
        capped = own if RANK[own] <= RANK[CAP[self.criticality]] else CAP[self.criticality]
        reason = "; ".join(r for s, r in signals if s == own)
        return capped, f"{reason} on a {self.criticality} asset"


def group_health(
    devices: list[DeviceState], rul_warning: float | None
) -> tuple[HealthState, list[HealthCause]]:
    """The worst-of of a group's devices and the devices at that state."""
    rated = [(d, *d.health(rul_warning)) for d in devices]
    state = worst([s for _, s, _ in rated])
    causes = [
        HealthCause(device=d.path, state=s, reason=r) for d, s, r in rated if s == state != "ok"
    ]
    return state, causes
