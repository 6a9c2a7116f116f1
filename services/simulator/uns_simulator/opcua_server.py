"""The simulator's OPC UA server (the only module importing asyncua).

Address space: ``Objects/Plant/{area}/{line}/{cell}/{device}/{tag}`` with string
NodeIds ``ns=2;s={area}.{line}.{cell}.{device}.{tag}`` (see `catalog.opcua_node_id`).
The vibration tag is a Float array: one block of samples per write, its
SourceTimestamp the time of the first sample.
"""

from __future__ import annotations

import errno
import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np
from asyncua import Server, ua

from uns import DevicePath
from uns.errors import ConfigError
from uns_simulator.catalog import NAMESPACE_URI, VIBRATION, Tag, opcua_node_id, opcua_object

log = logging.getLogger(__name__)

_VARIANT = {
    "float": ua.VariantType.Double,
    "double": ua.VariantType.Double,
    "uint32": ua.VariantType.UInt32,
    "bool": ua.VariantType.Boolean,
}


class OpcUaSim:
    def __init__(self, host: str, port: int) -> None:
        self.endpoint = f"opc.tcp://{host}:{port}"
        self.server = Server()
        self.ns = 2
        self._nodes: dict[str, ua.NodeId] = {}
        self._types: dict[str, ua.VariantType] = {}

    async def build(self, machines: list[tuple[DevicePath, list[Tag], int]]) -> None:
        """Create the address space: ``machines`` = (path, slow tags, waveform block size)."""
        s = self.server
        await s.init()
        s.set_endpoint(self.endpoint)
        s.set_server_name("uns simulator")
        s.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.ns = await s.register_namespace(NAMESPACE_URI)
        plant = await s.nodes.objects.add_folder(
            ua.NodeId("Plant", self.ns), ua.QualifiedName("Plant", self.ns)
        )
        folders: dict[tuple[str, ...], Any] = {}
        for path, tags, block in machines:
            parent = plant
            for depth in range(2, 5):  # area, line, cell
                key = path.levels[2 : depth + 1]
                if key not in folders:
                    folders[key] = await parent.add_folder(
                        ua.NodeId(".".join(key), self.ns), ua.QualifiedName(key[-1], self.ns)
                    )
                parent = folders[key]  # type: ignore[assignment]
            device = await parent.add_object(
                ua.NodeId(opcua_object(path), self.ns), ua.QualifiedName(path.device, self.ns)
            )
            for tag in tags:
                vt = _VARIANT[tag.datatype]
                initial = False if vt == ua.VariantType.Boolean else 0
                await self._add(device, path, tag.name, ua.Variant(initial, vt))
            wave = await self._add(
                device, path, VIBRATION, ua.Variant([0.0] * block, ua.VariantType.Float)
            )
            await wave.write_value_rank(ua.ValueRank.OneDimension)
            await wave.write_attribute(
                ua.AttributeIds.ArrayDimensions,
                ua.DataValue(ua.Variant([block], ua.VariantType.UInt32)),
            )

    async def _add(self, parent: Any, path: DevicePath, name: str, value: ua.Variant) -> Any:
        nid = opcua_node_id(path, name, self.ns)
        node = await parent.add_variable(  # type: ignore[attr-defined]
            ua.NodeId.from_string(nid),
            ua.QualifiedName(name, self.ns),
            value,
            varianttype=value.VariantType,
        )
        self._nodes[nid] = node.nodeid
        self._types[nid] = value.VariantType
        return node

    async def start(self) -> None:
        quiet = logging.getLogger("asyncua.server.server")  # it logs a bind error's traceback
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            await self.server.start()
        except OSError as exc:  # a port in use: one clear line, not a traceback
            why = "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)
            raise ConfigError(
                f"simulator.opcua.port: cannot listen on {self.endpoint}: {why}"
            ) from None
        finally:
            quiet.setLevel(level)
        log.info("OPC UA on %s (namespace %s = %d)", self.endpoint, NAMESPACE_URI, self.ns)

    async def stop(self) -> None:
        await self.server.stop()

    async def write(
        self,
        path: DevicePath,
        tag: str,
        value: float | int | bool,
        status: str | None,
        ts: datetime,
    ) -> None:
        nid = opcua_node_id(path, tag, self.ns)
        vt = self._types[nid]
        if vt == ua.VariantType.Double:
            value = float(value)
        code = ua.StatusCode(getattr(ua.StatusCodes, status)) if status else ua.StatusCode()
        await self.server.write_attribute_value(
            self._nodes[nid],
            ua.DataValue(
                ua.Variant(value, vt),
                StatusCode=code,
                SourceTimestamp=ts,
                ServerTimestamp=datetime.now(UTC),
            ),
        )

    async def write_block(self, path: DevicePath, samples: np.ndarray, t0: datetime) -> None:
        nid = opcua_node_id(path, VIBRATION, self.ns)
        await self.server.write_attribute_value(
            self._nodes[nid],
            ua.DataValue(
                ua.Variant(samples.tolist(), ua.VariantType.Float),
                SourceTimestamp=t0,
                ServerTimestamp=datetime.now(UTC),
            ),
        )
