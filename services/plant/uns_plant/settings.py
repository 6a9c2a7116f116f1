"""The plant service's settings: light (uns and the package's pure logic only)."""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from uns import ServiceSettings
from uns.config import FieldError, Slug, Strict, UnsConfig
from uns.scope import Scope
from uns.topics import HEALTH_LEVEL, OEE_LEVEL
from uns_plant.oee import AssetSpec, Calendar, ShiftSpec, hhmm


class Break(Strict, frozen=True):
    start: str
    """Local time of day, HH:MM, within its shift."""
    minutes: Annotated[int, msgspec.Meta(gt=0)]


class Shift(Strict, frozen=True):
    name: Slug
    start: str
    """Local time of day, HH:MM (a shift may run past midnight)."""
    hours: Annotated[float, msgspec.Meta(gt=0, le=24)] = 8.0
    breaks: list[Break] = []
    """Planned stops: not planned production time."""


class AssetOee(Strict, frozen=True):
    """Which tags of an asset type OEE reads (raw stream), and its ideal cycle time."""

    ideal_cycle_s: Annotated[float, msgspec.Meta(gt=0)]
    """Seconds per part (or stroke) at the rated speed."""
    counter: str
    """The part or stroke counter."""
    run_state: str = "run_state"
    scrap: str | None = None
    """The scrap counter, where the machine has one."""
    good: str | None = None
    """The good-part counter, where the machine has one (preferred over scrap)."""


DEFAULT_SHIFTS = [
    Shift(name="early", start="06:00", breaks=[Break(start="10:00", minutes=30)]),
    Shift(name="late", start="14:00", breaks=[Break(start="18:00", minutes=30)]),
    Shift(name="night", start="22:00", breaks=[Break(start="02:00", minutes=30)]),
]
DEFAULT_ASSETS = {
    "press": AssetOee(ideal_cycle_s=2.0, counter="stroke_count", scrap="scrap_count"),
    "robot": AssetOee(ideal_cycle_s=5.0, counter="cycle_count"),
    "conveyor": AssetOee(ideal_cycle_s=2.0, counter="item_count"),
}


class OeeSettings(Strict, frozen=True):
    shifts: list[Shift] = msgspec.field(default_factory=lambda: list(DEFAULT_SHIFTS))
    """Three shifts of 8 h from 06:00, each with a 30 min break, unless told."""
    timezone: str = "UTC"
    """The IANA time zone of the shift times (Asia/Kolkata)."""
    assets: dict[str, AssetOee] = msgspec.field(default_factory=lambda: dict(DEFAULT_ASSETS))
    """Per asset type of plant.yaml; a device of another type has no OEE."""
    publish_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """How often the OEE of every line and cell is published."""

    def calendar(self) -> Calendar:
        """The shift calendar; ValueError naming the field of a wrong time or zone."""
        specs = []
        for i, shift in enumerate(self.shifts):
            where = f"oee.shifts[{i}]"
            start = _time(shift.start, f"{where}.start")
            minutes = round(shift.hours * 60)
            breaks = []
            for j, b in enumerate(shift.breaks):
                at = (_time(b.start, f"{where}.breaks[{j}].start") - start) % (24 * 60)
                if at + b.minutes > minutes:
                    raise FieldError(
                        f"{where}.breaks[{j}]",
                        f"{b.start} for {b.minutes} min ends after its shift",
                    )
                breaks.append((at, b.minutes))
            specs.append(ShiftSpec(shift.name, start, minutes, tuple(breaks)))
        try:
            return Calendar(specs, self.timezone)
        except (KeyError, ValueError) as exc:  # ZoneInfoNotFoundError is a KeyError
            raise FieldError("oee.timezone", f"unknown time zone {self.timezone!r}") from exc

    def spec(self, asset: str) -> AssetSpec | None:
        a = self.assets.get(asset)
        if a is None:
            return None
        return AssetSpec(a.ideal_cycle_s, a.counter, a.run_state, a.scrap, a.good)


def _time(text: str, where: str) -> int:
    try:
        return hhmm(text)
    except ValueError as exc:
        raise FieldError(where, str(exc)) from None


class PlantSettings(ServiceSettings, frozen=True):
    default_metrics_port: ClassVar[int] = 9407

    rul_warning: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """A device whose RUL (scores stream, ``rul``) is at most this is ``warning``; None:
    RUL does not count."""

    state_file: str = "var/plant-events.json"
    """Where the open events it has seen are kept (written before each event is
    acknowledged): a restart goes on with them, and its persistent broker session delivers
    what was raised or cleared while it was away (uns-schema/README.md, Health)."""

    oee: OeeSettings = OeeSettings()
    """Shifts, breaks and which tags make each asset type's OEE (uns-schema/README.md, OEE)."""

    def check_config(self, config: UnsConfig) -> None:
        """A shift time, break or time zone that cannot be read: exit 2 naming it."""
        self.oee.calendar()

    def scope(self, config: UnsConfig) -> Scope:
        """Publishes the retained health of every site, area, line and cell and the OEE of
        every line and cell; reads every device's raw births, data and deaths, scores and
        events."""
        base = f"{config.namespace.enterprise}/{config.namespace.site}"
        devices = f"{base}/+/+/+/+"
        return Scope(
            publish=(
                *("/".join((base, *("+",) * n, HEALTH_LEVEL)) for n in range(4)),
                *("/".join((base, *("+",) * n, OEE_LEVEL, "+")) for n in (2, 3)),
            ),
            subscribe=(
                f"{devices}/raw/birth",
                f"{devices}/raw/data",
                f"{devices}/raw/death",
                f"{devices}/scores/data",
                f"{devices}/events/+",
            ),
        )
