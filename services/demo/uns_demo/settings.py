from typing import Annotated, ClassVar

import msgspec

from uns import ServiceSettings
from uns.config import DevicePathText


class DemoSettings(ServiceSettings, frozen=True):
    default_metrics_port: ClassVar[int] = 9400

    device: DevicePathText | None = None
    """Device path to publish as; ``{enterprise}/{site}/demo/line-0/cell-0/demo-01`` if absent."""
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    """Seconds between data messages."""
    seed: int = 1
