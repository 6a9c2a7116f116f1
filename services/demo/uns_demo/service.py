from __future__ import annotations

import asyncio
import logging

from uns import Command, DevicePath, Inbound, Node, Reject, Service
from uns_demo.logic import METRICS, DemoDevice
from uns_demo.settings import DemoSettings

log = logging.getLogger(__name__)


class DemoService(Service[DemoSettings]):
    name = "demo"
    Settings = DemoSettings

    def __init__(self, node: Node[DemoSettings]) -> None:
        super().__init__(node)
        s = self.settings
        self.path = (
            DevicePath.parse(s.device)
            if s.device
            else DevicePath(node.enterprise, node.site, "demo", "line-0", "cell-0", "demo-01")
        )
        self.device = DemoDevice(s.seed)
        node.subscribe(self.path.topic("cmd", "set"), Command, self.on_set)

    async def run(self) -> None:
        await self.node.device_birth(self.path, "raw", METRICS)
        while True:
            await self.node.device_data(self.path, "raw", self.device.step())
            await asyncio.sleep(self.settings.interval_s)

    async def on_set(self, msg: Inbound[Command]) -> None:
        running = msg.payload.args.get("running")
        if not isinstance(running, bool):
            raise Reject("bad_command", f"'set' needs args.running true/false, got {running!r}")
        self.device.running = running
        log.info("%s: running=%s (by %s)", self.path, running, msg.payload.sender or "someone")
