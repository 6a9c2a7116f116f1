"""What exists in the namespace, rebuilt from retained births and deaths (for ``uns tree``).

Online rules, the same any app can apply: a node is online while its retained
birth stands and no retained death does (a node clears its death when it is
born); a device stream is online while its birth stands, it has no death, and
the node that published it is online. At a central broker, where boxes' bridges
relay their sites (a birth with ``relays``), a node of a relayed site is online
only while one of its relays is too: a box cut off (power, WAN) leaves its nodes'
births retained there, and its bridge's Last Will says they are stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text
from rich.tree import Tree

from uns import payloads as p
from uns.errors import PayloadError, TopicError
from uns.topics import DevicePath, DeviceTopic, NodeTopic, parse


@dataclass
class NodeInfo:
    enterprise: str
    site: str
    node_id: str
    birth: p.NodeBirth | None = None
    death: p.NodeDeath | None = None

    @property
    def online(self) -> bool:
        return self.birth is not None and self.death is None


@dataclass
class StreamInfo:
    birth: p.DeviceBirth | None = None
    death: p.DeviceDeath | None = None


@dataclass
class NamespaceView:
    nodes: dict[tuple[str, str, str], NodeInfo] = field(default_factory=dict)
    devices: dict[DevicePath, dict[str, StreamInfo]] = field(default_factory=dict)
    ignored: int = 0

    def add(self, topic: str, payload: bytes) -> None:
        """Take one retained message; anything that is not a birth or death is ignored."""
        try:
            parsed = parse(topic)
        except TopicError:
            self.ignored += 1
            return
        if isinstance(parsed, NodeTopic):
            key = (parsed.enterprise, parsed.site, parsed.node_id)
            info = self.nodes.setdefault(key, NodeInfo(*key))
            self._node_message(info, parsed.message, payload)
        elif parsed.message in ("birth", "death"):
            self._device_message(parsed, payload)

    def _node_message(self, info: NodeInfo, message: str, payload: bytes) -> None:
        try:
            if message == "birth":
                info.birth = p.decode(payload, p.NodeBirth) if payload else None
            elif message == "death":
                info.death = p.decode(payload, p.NodeDeath) if payload else None
        except PayloadError:
            self.ignored += 1

    def _device_message(self, topic: DeviceTopic, payload: bytes) -> None:
        stream = self.devices.setdefault(topic.path, {}).setdefault(topic.stream, StreamInfo())
        try:
            if topic.message == "birth":
                stream.birth = p.decode(payload, p.DeviceBirth) if payload else None
            else:
                stream.death = p.decode(payload, p.DeviceDeath) if payload else None
        except PayloadError:
            self.ignored += 1

    def node_online(self, enterprise: str, site: str, node_id: str) -> bool:
        info = self.nodes.get((enterprise, site, node_id))
        return info is not None and info.online and not self.cut_off(enterprise, site, node_id)

    def relays(self, enterprise: str, site: str) -> list[NodeInfo]:
        """The nodes that relay ``enterprise/site`` to this broker (births with ``relays``)."""
        prefix = f"{enterprise}/{site}"
        return [n for n in self.nodes.values() if n.birth and prefix in n.birth.relays]

    def cut_off(self, enterprise: str, site: str, node_id: str) -> list[NodeInfo]:
        """The relays of the node's site when none of them is online (the box is cut off
        from this broker), else nothing. A relay is not cut off by itself."""
        relays = self.relays(enterprise, site)
        if any(r.online for r in relays) or any(r.node_id == node_id for r in relays):
            return []
        return relays

    def stream_online(self, path: DevicePath, stream: StreamInfo) -> bool:
        return (
            stream.birth is not None
            and stream.death is None
            and self.node_online(path.enterprise, path.site, stream.birth.node)
        )

    def render(self) -> Tree:
        root = Tree(Text("namespace", style="bold"))
        branches: dict[tuple[str, ...], Tree] = {}

        def branch(levels: tuple[str, ...]) -> Tree:
            if levels in branches:
                return branches[levels]
            parent = branch(levels[:-1]) if len(levels) > 1 else root
            branches[levels] = parent.add(Text(levels[-1], style="bold" if len(levels) < 3 else ""))
            return branches[levels]

        for key in sorted(self.nodes):
            info = self.nodes[key]
            label = Text(info.node_id)
            if info.birth:
                label.append(f"  {info.birth.service} {info.birth.version}".rstrip(), style="dim")
            online = self.node_online(*key)
            label.append("  online" if online else "  offline", style="green" if online else "red")
            label.append(self.cut_off_note(*key), style="red")
            branch((key[0], key[1], "_node")).add(label)
        for path in sorted(self.devices):
            streams = self.devices[path]
            device = branch(path.levels)
            for name in sorted(streams):
                sinfo = streams[name]
                online = self.stream_online(path, sinfo)
                label = Text(name, style="bold")
                if sinfo.birth:
                    label.append(f"  from {sinfo.birth.node}", style="dim")
                label.append(
                    "  online" if online else "  offline", style="green" if online else "red"
                )
                if sinfo.death and sinfo.death.reason:
                    label.append(f" ({sinfo.death.reason})", style="red")
                elif sinfo.birth:
                    note = self.cut_off_note(path.enterprise, path.site, sinfo.birth.node)
                    label.append(note, style="red")
                stream_branch = device.add(label)
                for metric in sinfo.birth.metrics if sinfo.birth else []:
                    stream_branch.add(_metric_label(metric))
        return root

    def cut_off_note(self, enterprise: str, site: str, node_id: str) -> str:
        """' (site cut off: relay bridge lost)' for a node cut off from this broker, else ''."""
        relays = self.cut_off(enterprise, site, node_id)
        if not relays:
            return ""
        names = ", ".join(sorted(r.node_id for r in relays))
        reasons = {r.death.reason for r in relays if r.death} or {"no birth"}
        return f" (site cut off: relay {names} {', '.join(sorted(reasons))})"


def _metric_label(metric: p.MetricDef) -> Text:
    label = Text(metric.name)
    label.append(f"  {metric.datatype}", style="cyan")
    if metric.unit:
        label.append(f"  [{metric.unit}]", style="yellow")
    if metric.low is not None or metric.high is not None:
        low = "" if metric.low is None else _number(metric.low)
        high = "" if metric.high is None else _number(metric.high)
        label.append(f"  {low}..{high}", style="dim")
    if metric.source:
        label.append(f"  {metric.source}", style="dim")
    return label


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
