"""``uns run demo``: one synthetic device, the smallest service built on the runtime.

Publishes ``{enterprise}/{site}/demo/line-0/cell-0/demo-01/raw/{birth,data}``
(temperature, running, counter) every ``interval_s`` and obeys ``cmd/set``
commands (``{"type": "cmd", "ts": 0, "name": "set", "args": {"running": false}}``).
It is the service the foundation's tests and ``uns up`` use until the simulator
and adapters exist; set ``services.demo.enabled: false`` once a plant is attached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_demo.service import DemoService
    from uns_demo.settings import DemoSettings

__all__ = [
    "DemoService",
    "DemoSettings",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "DemoService": "service",
        "DemoSettings": "settings",
    },
)
