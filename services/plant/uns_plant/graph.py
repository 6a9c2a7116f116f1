"""The asset graph: ``feeds`` edges from plant.yaml (checked acyclic at load), ``partOf``
from the hierarchy. Pure: the command line answers from it without a broker."""

from __future__ import annotations

from collections.abc import Iterable

from uns.config import Device


class AssetGraph:
    """Which devices feed which, both ways."""

    def __init__(self, devices: Iterable[Device]) -> None:
        self.devices = {d.path: d for d in devices}
        self.feeds: dict[str, tuple[str, ...]] = {
            p: tuple(d.feeds) for p, d in self.devices.items()
        }
        fed_by: dict[str, list[str]] = {p: [] for p in self.devices}
        for path, fed in self.feeds.items():
            for f in fed:
                fed_by[f].append(path)
        self.fed_by = {p: tuple(v) for p, v in fed_by.items()}

    def downstream(self, device: str) -> list[str]:
        """Every device ``device`` feeds, directly or through others, nearest first."""
        return self._walk(device, self.feeds)

    def upstream(self, device: str) -> list[str]:
        """Every device that feeds ``device``, directly or through others, nearest first:
        where to look when it starves."""
        return self._walk(device, self.fed_by)

    def _walk(self, start: str, edges: dict[str, tuple[str, ...]]) -> list[str]:
        if start not in self.devices:
            raise KeyError(start)
        seen: list[str] = []
        frontier = [start]
        while frontier:
            following: list[str] = []
            for path in frontier:
                for n in edges[path]:
                    if n not in seen and n != start:
                        seen.append(n)
                        following.append(n)
            frontier = following
        return seen
