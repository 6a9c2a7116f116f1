from typing import Annotated, ClassVar

import msgspec

from uns import ServiceSettings
from uns.config import DevicePathText, UnsConfig
from uns.scope import Scope


class DemoSettings(ServiceSettings, frozen=True):
    default_metrics_port: ClassVar[int] = 9400

    device: DevicePathText | None = None
    """Device path to publish as; ``{enterprise}/{site}/demo/line-0/cell-0/demo-01`` if absent."""
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    """Seconds between data messages."""
    seed: int = 1

    def scope(self, config: UnsConfig) -> Scope:
        """Publishes its one device's raw stream, obeys that device's ``cmd/set``."""
        ns = config.namespace
        path = self.device or f"{ns.enterprise}/{ns.site}/demo/line-0/cell-0/demo-01"
        return Scope(publish=(f"{path}/raw/+",), subscribe=(f"{path}/cmd/set",))
