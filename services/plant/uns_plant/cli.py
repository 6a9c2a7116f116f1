"""``uns plant``: the health the plant service publishes, and the asset graph's questions."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

import typer

from uns.commands import (
    BrokerOpt,
    ConfigOpt,
    Stop,
    broker_target,
    fail,
    load_config,
    on_broker,
    run_client,
)

app = typer.Typer(
    help="The asset graph and the health of cells, lines, areas and the site.", no_args_is_help=True
)

QUIET_S = 0.5
"""Retained messages come at once: this long without another ends the listing."""


def _retained(
    config: ConfigOpt, broker: BrokerOpt, timeout: float, filters: list[str], kind: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """The retained messages of ``kind`` on ``filters``, and why their nodes are stale
    (node id -> reason: died, or never born) from the retained node births and deaths."""
    from uns import Bus, PayloadError, decode
    from uns.payloads import NodeDeath
    from uns.topics import NODE_LEVEL

    loaded = load_config(config)
    ns = loaded.config.namespace
    url, settings = broker_target(loaded, broker)
    births = f"{ns.enterprise}/{ns.site}/{NODE_LEVEL}/+/birth"
    deaths = f"{ns.enterprise}/{ns.site}/{NODE_LEVEL}/+/death"
    Found = tuple[dict[str, Any], set[str], dict[str, NodeDeath]]

    async def work(bus: Bus) -> Found:
        for f in (*filters, births, deaths):
            await bus.subscribe(f, qos=1)
        found: dict[str, Any] = {}
        born: set[str] = set()
        dead: dict[str, NodeDeath] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        messages = aiter(bus.messages())
        try:
            while True:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    message = await anext(messages)
                if not message.payload or not message.retain:
                    continue  # a live one (OEE comes every publish_s) must not hold us up
                levels = message.topic.split("/")
                node = levels[3] if levels[2] == NODE_LEVEL else None
                if node is not None:  # retained: they come with the rest, not alone
                    if message.topic.endswith("/birth"):
                        born.add(node)
                    else:
                        with contextlib.suppress(PayloadError):
                            dead[node] = decode(message.payload, NodeDeath)
                    continue
                deadline = loop.time() + QUIET_S
                try:
                    found[message.topic] = decode(message.payload, kind)
                except PayloadError:
                    continue
        except (TimeoutError, StopAsyncIteration):
            return found, born, dead

    async def main(stop: Stop) -> Found | None:
        return await on_broker(url, settings, stop, work)

    answer = run_client(main)
    found, born, dead = answer if answer is not None else ({}, set(), {})
    stale: dict[str, str] = {}
    for message in found.values():
        if not message.node:  # from a plant service older than the node field: cannot tell
            continue
        if message.node in dead:
            stale[message.node] = f"its node {message.node!r} died ({dead[message.node].reason})"
        elif message.node not in born:
            stale[message.node] = f"its node {message.node!r} has no birth"
    return found, stale


def _stale(stale: dict[str, str], what: str) -> None:
    if stale:
        raise fail(
            f"stale: the plant service is offline, this is the last {what} it published ("
            + "; ".join(stale.values())
            + ")",
            1,
        )


def _group(path: str | None, config: ConfigOpt, levels: tuple[int, int]) -> tuple[str, ...]:
    ns = load_config(config).config.namespace
    group = tuple((path or f"{ns.enterprise}/{ns.site}").strip("/").split("/"))
    if not levels[0] <= len(group) <= levels[1] or not all(group):
        raise fail(f"{'/'.join(group)!r}: give a path of {levels[0]} to {levels[1]} levels")
    return group


@app.command("health")
def health(
    path: Annotated[
        str | None,
        typer.Argument(
            help="A site, area, line or cell: its path, 2 to 5 levels (the site when absent)"
        ),
    ] = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the first message")] = 3.0,
) -> None:
    """Print the retained health of PATH and of every group under it (exit 1: none, or
    stale: the plant service that published it is offline, so it may be out of date)."""
    from uns.errors import TopicError
    from uns.payloads import Health
    from uns.topics import HEALTH_LEVEL, health_topic

    group = _group(path, config, (2, 5))
    try:
        health_topic(group)
    except TopicError as exc:
        raise fail(str(exc)) from None
    filters = ["/".join((*group, *("+",) * n, HEALTH_LEVEL)) for n in range(6 - len(group))]
    found, stale = _retained(config, broker, timeout, filters, Health)
    if not found:
        raise fail(f"no health published under {'/'.join(group)} (is `uns run plant` running?)", 1)
    for topic in sorted(found):
        h = found[topic]
        depth = h.path.count("/") - len(group) + 1
        mark = " (stale)" if h.node in stale else ""
        typer.echo(
            f"{'  ' * depth}{h.state:<8} {h.level:<4} {h.path}  ({h.devices} devices,"
            f" {h.offline} offline, {h.open_events} open events){mark}"
        )
        for cause in h.causes:
            typer.echo(f"{'  ' * depth}    {cause.device}: {cause.reason}")
    _stale(stale, "health")


@app.command("oee")
def oee(
    path: Annotated[
        str | None,
        typer.Argument(help="A site, area, line or cell: its lines' and cells' OEE (the site's)"),
    ] = None,
    window: Annotated[str, typer.Option(help="shift or hour")] = "shift",
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the first message")] = 3.0,
) -> None:
    """Print the retained OEE of the lines and cells under PATH, with its inputs (exit 1:
    none, or stale)."""
    from uns.payloads import Oee
    from uns.topics import OEE_LEVEL, OEE_WINDOWS

    if window not in OEE_WINDOWS:
        raise fail(f"--window: one of {', '.join(OEE_WINDOWS)}, not {window!r}")
    group = _group(path, config, (2, 5))
    filters = [
        "/".join((*group, *("+",) * n, OEE_LEVEL, window))
        for n in range(6 - len(group))
        if 4 <= len(group) + n <= 5
    ]
    found, stale = _retained(config, broker, timeout, filters, Oee)
    if not found:
        raise fail(f"no OEE published under {'/'.join(group)} (is `uns run plant` running?)", 1)
    for topic in sorted(found):
        o = found[topic]
        label = f"shift {o.shift}{' (final)' if o.final else ''}" if o.shift else "last hour"
        flags = "".join(f"; {f}: {', '.join(d)}" for f, d in sorted(o.flags.items()))
        typer.echo(
            f"{'  ' * (len(o.path.split('/')) - 4)}{o.path}  {label}: OEE {o.oee:.1%}"
            f" = A {o.availability:.1%} x P {o.performance:.1%} x Q {o.quality:.1%}"
            f"{' (stale)' if o.node in stale else ''}"
        )
        typer.echo(
            f"{'  ' * (len(o.path.split('/')) - 4)}    run {o.run_s / 3600:.2f} h of"
            f" {o.planned_s / 3600:.2f} h planned, {o.count} made of {o.ideal_count:.0f} ideal,"
            f" {o.good} good, {o.scrap} scrap{flags}"
        )
    _stale(stale, "OEE")


def _graph_answer(device: str, config: ConfigOpt, downstream: bool) -> None:
    from uns_plant.graph import AssetGraph

    graph = AssetGraph(load_config(config).config.plant.devices)
    try:
        answer = graph.downstream(device) if downstream else graph.upstream(device)
    except KeyError:
        raise fail(f"{device!r} is not a device of the plant") from None
    for path in answer:
        typer.echo(path)


@app.command("upstream")
def upstream(
    device: Annotated[str, typer.Argument(help="A device path of plant.yaml")],
    config: ConfigOpt = None,
) -> None:
    """Every device that feeds DEVICE, directly or through others, nearest first."""
    _graph_answer(device, config, downstream=False)


@app.command("downstream")
def downstream(
    device: Annotated[str, typer.Argument(help="A device path of plant.yaml")],
    config: ConfigOpt = None,
) -> None:
    """Every device DEVICE feeds, directly or through others, nearest first."""
    _graph_answer(device, config, downstream=True)
