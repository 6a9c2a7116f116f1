"""``uns plant``: the health the plant service publishes, and the asset graph's questions."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

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
    from uns import Bus, PayloadError, decode
    from uns.errors import TopicError
    from uns.payloads import Health, NodeDeath
    from uns.topics import HEALTH_LEVEL, NODE_LEVEL, health_topic

    loaded = load_config(config)
    ns = loaded.config.namespace
    group = tuple((path or f"{ns.enterprise}/{ns.site}").strip("/").split("/"))
    try:
        health_topic(group)
    except TopicError as exc:
        raise fail(str(exc)) from None
    url, settings = broker_target(loaded, broker)
    filters = ["/".join((*group, *("+",) * n, HEALTH_LEVEL)) for n in range(6 - len(group))]
    births = f"{ns.enterprise}/{ns.site}/{NODE_LEVEL}/+/birth"
    deaths = f"{ns.enterprise}/{ns.site}/{NODE_LEVEL}/+/death"

    async def work(bus: Bus) -> tuple[dict[str, Health], set[str], dict[str, NodeDeath]]:
        for f in (*filters, births, deaths):
            await bus.subscribe(f, qos=1)
        found: dict[str, Health] = {}
        born: set[str] = set()
        dead: dict[str, NodeDeath] = {}
        wait = timeout
        messages = aiter(bus.messages())
        try:
            while True:
                async with asyncio.timeout(wait):
                    message = await anext(messages)
                if not message.payload:
                    continue
                levels = message.topic.split("/")
                node = levels[3] if levels[2] == NODE_LEVEL else None
                if node is not None:  # retained: they come with the health, not alone
                    if message.topic.endswith("/birth"):
                        born.add(node)
                    else:
                        with contextlib.suppress(PayloadError):
                            dead[node] = decode(message.payload, NodeDeath)
                    continue
                wait = QUIET_S
                try:
                    found[message.topic] = decode(message.payload, Health)
                except PayloadError:
                    continue
        except (TimeoutError, StopAsyncIteration):
            return found, born, dead

    async def main(stop: Stop) -> tuple[dict[str, Health], set[str], dict[str, NodeDeath]] | None:
        return await on_broker(url, settings, stop, work)

    answer = run_client(main)
    found, born, dead = answer if answer is not None else ({}, set(), {})
    if not found:
        raise fail(f"no health published under {'/'.join(group)} (is `uns run plant` running?)", 1)
    stale: dict[str, str] = {}
    for h in found.values():
        if not h.node:  # from a plant service older than the node field: cannot tell
            continue
        if h.node in dead:
            stale[h.node] = f"its node {h.node!r} died ({dead[h.node].reason})"
        elif h.node not in born:
            stale[h.node] = f"its node {h.node!r} has no birth"
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
    if stale:
        raise fail(
            "stale: the plant service is offline, this is the last health it published ("
            + "; ".join(stale.values())
            + ")",
            1,
        )


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
