"""The online rules `uns tree` applies, and any application at a central broker may: a
node of a site relayed by a box's bridge is stale while that bridge is dead there."""

from __future__ import annotations

from uns import DeviceBirth, NodeBirth, NodeDeath, encode
from uns.topics import DevicePath
from uns.tree import NamespaceView


def birth(node: str, relays: list[str] | None = None) -> bytes:
    return encode(NodeBirth(ts=1, node=node, service=node, bdseq=0, relays=relays or []))


def death(node: str, reason: str = "lost") -> bytes:
    return encode(NodeDeath(ts=2, node=node, bdseq=0, reason=reason))


def view(*messages: tuple[str, bytes]) -> NamespaceView:
    v = NamespaceView()
    for topic, payload in messages:
        v.add(topic, payload)
    return v


def test_a_site_whose_relay_died_is_stale_the_other_site_and_the_relay_as_they_are() -> None:
    v = view(
        ("acme/pune/_node/featurizer/birth", birth("featurizer")),
        ("acme/pune/_node/bridge/birth", birth("bridge", ["acme/pune"])),
        ("acme/chennai/_node/featurizer/birth", birth("featurizer")),
        ("acme/chennai/_node/bridge/birth", birth("bridge", ["acme/chennai"])),
    )
    assert v.node_online("acme", "pune", "featurizer")
    v.add("acme/pune/_node/bridge/death", death("bridge"))
    assert not v.node_online("acme", "pune", "featurizer")  # its birth still stands
    assert [r.node_id for r in v.cut_off("acme", "pune", "featurizer")] == ["bridge"]
    assert not v.node_online("acme", "pune", "bridge")  # dead itself, not cut off
    assert v.cut_off("acme", "pune", "bridge") == []
    assert v.node_online("acme", "chennai", "featurizer")
    rendered = v.cut_off_note("acme", "pune", "featurizer")
    assert rendered == " (site cut off: relay bridge lost)"
    v.add("acme/pune/_node/bridge/death", b"")  # born again: the death cleared
    assert v.node_online("acme", "pune", "featurizer")


def test_a_devices_stream_follows_its_node_and_without_relays_nothing_changes() -> None:
    path = DevicePath.parse("acme/pune/stamping/line-3/cell-a/press-01")
    stream = DeviceBirth(ts=1, node="featurizer", device=str(path), bdseq=0, seq=1, metrics=[])
    v = view(
        ("acme/pune/_node/featurizer/birth", birth("featurizer")),
        (f"{path}/features/birth", encode(stream)),
    )
    info = v.devices[path]["features"]
    assert v.stream_online(path, info)  # a box's own broker: no relay, the old rules
    v.add("acme/pune/_node/bridge/birth", birth("bridge", ["acme/pune"]))
    v.add("acme/pune/_node/bridge/death", death("bridge", "shutdown"))
    assert not v.stream_online(path, info)


def test_uns_top_at_the_centre_shows_a_cut_off_sites_services_and_devices_stale() -> None:
    from rich.console import Console

    from uns.top import PlantView

    path = DevicePath.parse("acme/pune/stamping/line-3/cell-a/press-01")
    stream = DeviceBirth(ts=1, node="featurizer", device=str(path), bdseq=0, seq=1, metrics=[])
    view = PlantView()
    for topic, payload in (
        ("acme/pune/_node/featurizer/birth", birth("featurizer")),
        (f"{path}/features/birth", encode(stream)),
        ("acme/pune/_node/bridge/birth", birth("bridge", ["acme/pune"])),
        ("acme/pune/_node/bridge/death", death("bridge")),
    ):
        view.add(topic, payload, retained=True)
    console = Console(width=200, record=True)
    console.print(view.render("centre"))
    out = console.export_text()
    assert "offline (site cut off: relay bridge lost)" in out, out
    assert view.online_devices() == 0
