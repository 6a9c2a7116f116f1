"""The plant service's settings: light (uns and the package's pure logic only)."""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from uns import ServiceSettings
from uns.config import UnsConfig
from uns.scope import Scope
from uns.topics import HEALTH_LEVEL


class PlantSettings(ServiceSettings, frozen=True):
    default_metrics_port: ClassVar[int] = 9407

    rul_warning: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """A device whose RUL (scores stream, ``rul``) is at most this is ``warning``; None:
    RUL does not count."""

    state_file: str = "var/plant-events.json"
    """Where the open events it has seen are kept (written before each event is
    acknowledged): a restart goes on with them, and its persistent broker session delivers
    what was raised or cleared while it was away (uns-schema/README.md, Health)."""

    def scope(self, config: UnsConfig) -> Scope:
        """Publishes the retained health of every site, area, line and cell; reads every
        device's raw births and deaths, scores and events."""
        base = f"{config.namespace.enterprise}/{config.namespace.site}"
        devices = f"{base}/+/+/+/+"
        return Scope(
            publish=tuple("/".join((base, *("+",) * n, HEALTH_LEVEL)) for n in range(4)),
            subscribe=(
                f"{devices}/raw/birth",
                f"{devices}/raw/death",
                f"{devices}/scores/data",
                f"{devices}/events/+",
            ),
        )
