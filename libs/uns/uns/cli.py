"""The ``uns`` command line: the generic commands, and every installed package's groups.

`uns` itself has the commands that know no service (`run`, `up`, `sub`, `tree`, `top`, `pub`,
`schema`); `uns sim`, `uns model`, `uns broker`, ... come from the packages that own them,
found through the ``uns.commands`` entry points (`uns.plugins`) and imported only when
one of their commands runs or `uns --help` lists them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, Final, NamedTuple

import msgspec
import typer
from typer.core import TyperGroup

from uns import payloads as p
from uns import plugins
from uns import schema as schema_files
from uns.bus import Bus, Message
from uns.commands import (
    GRACE_S,
    BrokerOpt,
    ConfigOpt,
    LogOpt,
    Stop,
    broker_target,
    fail,
    load_config,
    on_broker,
    run_client,
    setup_logging,
    watch_target,
)
from uns.commands import run as run_main
from uns.config import LoadedConfig, parse_broker_url, redact_url
from uns.errors import ConfigError, PayloadError, TopicError, UnsError
from uns.topics import DevicePath, matches, node_topic, validate_filter

log = logging.getLogger("uns")


class _WithInstalledGroups(TyperGroup):
    """The root group: its own commands, then each installed package's group, loaded
    from its entry point when it is run or listed."""

    def list_commands(self, ctx: Any) -> list[str]:
        own = super().list_commands(ctx)
        return own + [name for name in plugins.commands() if name not in self.commands]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in plugins.commands():
            command = self.commands[cmd_name] = plugins.load_command(cmd_name)
        return command


app = typer.Typer(
    name="uns",
    cls=_WithInstalledGroups,
    help="An edge Unified Namespace: OPC UA and Modbus into one ISA-95 MQTT namespace.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
schema_app = typer.Typer(help="The payload contract in uns-schema/.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")


# ---- services ------------------------------------------------------------------------


@app.command()
def run(
    service: Annotated[str, typer.Argument(help="Service name (see `uns up --help`)")],
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Port of /metrics [default: the service's, or services.NAME.metrics_port]"
        ),
    ] = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Run one service in the foreground (what a container runs)."""
    setup_logging(log_level)
    loaded = load_config(config)
    found = plugins.services()
    if service not in found and service == "broker" and "broker" in plugins.commands():
        # the embedded broker is no Service (no node, no births): its own group runs it
        config_args = ["--config", str(loaded.path)] if loaded.path else []
        plugins.load_command("broker").main(
            [*config_args, "--log-level", log_level], prog_name="uns broker"
        )
        return
    if service not in found:
        known = ", ".join(sorted([*found, *(["broker"] if "broker" in plugins.commands() else [])]))
        raise fail(f"no service named {service!r}; installed: {known}")
    cls = found[service].load_service()
    try:
        settings = loaded.service(service, cls.Settings)
        if metrics_port is not None:
            settings = msgspec.structs.replace(settings, metrics_port=metrics_port)
    except (ConfigError, msgspec.ValidationError) as exc:
        raise fail(f"config: {exc}") from None
    url, _ = broker_target(loaded, broker)

    async def main(stop: asyncio.Event) -> None:
        from uns.runtime import Node

        node = Node(service, settings, loaded.config, broker_url=url, version=cls.version)
        await node.serve(cls(node), stop)

    run_main(main)


class _Planned(NamedTuple):
    name: str
    enabled: bool
    default_port: int
    node_ids: tuple[str, ...]
    """One node id, or each replica's (``replicas: N``, `uns.shard`)."""
    idle: str | None = None
    """Why the service would have nothing to do (`ServiceSettings.idle_reason`)."""


REPLICA_PORT_STEP = 100
"""Replica j's /metrics port is its service's + 100 j (featurizer-1 on 9505)."""


def _plan(loaded: LoadedConfig) -> list[_Planned]:
    """Every installed service, in name order, with its node ids under ``loaded``.

    Only the settings modules are imported (light by rule: `uns` and each package's pure
    logic), so the supervisor keeps no service's libraries resident.
    """
    from uns.shard import replica_ids

    plan = []
    for name, plugin in plugins.services().items():
        settings_cls = plugin.load_settings()
        try:
            settings = loaded.service(name, settings_cls)
        except ConfigError as exc:
            raise fail(f"config: {exc}") from None
        base = settings.node_id or name
        n = settings.replicas
        ids = replica_ids(base, n) if n > 1 else (base,)
        plan.append(
            _Planned(
                name,
                settings.enabled,
                settings_cls.default_metrics_port,
                ids,
                settings.idle_reason(),
            )
        )
    return plan


def _port_free(host: str, port: int, option: str, other: str = "") -> None:
    """Exit 2 before anything starts when ``port`` is taken (an edge box with Mosquitto
    installed has 1883 busy): the broker child would fail in a loop while the services
    connected to whatever listens there."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker binds
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise fail(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            raise fail(
                f"port {port} on {host} is already in use: choose another with {option} N{other}"
            ) from None


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Port of the embedded broker")] = 1883,
    host: Annotated[str, typer.Option(help="Listen address of the embedded broker")] = "127.0.0.1",
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            envvar="UNS_BROKER_URL",
            show_default=False,
            help="Use the broker at this URL and start none",
        ),
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(help="First /metrics port; service i gets this + i (0: any free port)")
    ] = 9400,
    opcua_port: Annotated[
        int | None,
        typer.Option(help="OPC UA port of the simulator (and the adapter's URL) [default: config]"),
    ] = None,
    modbus_port: Annotated[
        int | None,
        typer.Option(help="Modbus TCP port of the simulator (and the adapter's) [default: config]"),
    ] = None,
    cloud_port: Annotated[
        int | None,
        typer.Option(help="Also run a second local broker on this port as the bridge's cloud"),
    ] = None,
    config: ConfigOpt = None,
    log_level: LogOpt = "INFO",
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Print what would run (each installed service, its metrics port) and exit",
        ),
    ] = False,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Users and ACLs from the services' declared topics (uns broker secure):"
            " no anonymous client, each service logs in as itself (with --broker, that"
            " broker reads the generated Mosquitto files)",
        ),
    ] = False,
    secrets: Annotated[
        Path,
        typer.Option(help="Directory of the --secure credentials (written when missing)"),
    ] = Path("var/secrets"),
    tls_port: Annotated[
        int | None,
        typer.Option(
            help="With --secure: the embedded broker's TLS listener for other machines"
            " (all addresses, e.g. 8883; the certificate from DIR/tls/)",
        ),
    ] = None,
) -> None:
    """Start the broker and every installed service; restart crashed ones; Ctrl-C stops all."""
    from uns.supervisor import Child, supervise, uns_argv

    setup_logging(log_level)
    loaded = load_config(config)
    config_args = ["--config", str(loaded.path)] if loaded.path else []
    common = [*config_args, "--log-level", log_level]
    broker_child = None
    policy = None
    if tls_port is not None and not (secure and broker is None):
        raise fail("--tls-port: with --secure and the embedded broker only")
    if secure and broker is None and host not in ("127.0.0.1", "localhost", "::1"):
        # users and ACLs are no use if the passwords cross the OT network in the clear
        raise fail(
            f"--secure --host {host}: plaintext stays on the loopback; other machines"
            " connect over TLS (--tls-port 8883)"
        )
    if secure:
        from uns.secure import prepare

        if not plan:
            try:
                policy = prepare(secrets, uns_argv("broker", "secure", *config_args))
            except ConfigError as exc:
                raise fail(str(exc)) from None
            if broker is not None:  # Mosquitto on the box: it reads the same policy
                log.info(
                    "--secure: the broker at %s must read %s and %s",
                    redact_url(broker),
                    policy.directory / "mosquitto" / "password_file",
                    policy.directory / "mosquitto" / "acl_file",
                )
    if broker is None:
        url = f"mqtt://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        if not plan:
            _port_free(host, port, "--port", f" or --broker {url} to use the broker that is there")
    if cloud_port is not None and not plan:
        _port_free("127.0.0.1", cloud_port, "--cloud-port")
    if tls_port is not None and not plan:
        _port_free("0.0.0.0", tls_port, "--tls-port")
    if broker is None:
        broker_child = Child(
            "broker",
            uns_argv(
                "broker",
                *("--host", host, "--port", str(port)),
                *(("--tls-port", str(tls_port)) if tls_port is not None else ()),
                *common,
            ),
            env=policy.broker_env if policy else {},
        )
    else:
        url, _ = broker_target(loaded, broker)
    env: dict[str, str] = {}  # the simulator's ports, and the adapters that read them
    if opcua_port is not None:
        env["UNS_SERVICES__SIMULATOR__OPCUA__PORT"] = str(opcua_port)
        env["UNS_SERVICES__OPCUA_ADAPTER__URL"] = f"opc.tcp://127.0.0.1:{opcua_port}"
    if modbus_port is not None:
        env["UNS_SERVICES__SIMULATOR__MODBUS__PORT"] = str(modbus_port)
        env["UNS_SERVICES__MODBUS_ADAPTER__PORT"] = str(modbus_port)
    children = []
    if cloud_port is not None:  # a stand-in cloud: amqtt speaks MQTT 3.1.1
        children.append(
            Child(
                "cloud-broker",
                uns_argv("broker", "--host", "127.0.0.1", "--port", str(cloud_port), *common),
            )
        )
        env["UNS_SERVICES__BRIDGE__REMOTE__URL"] = f"mqtt://127.0.0.1:{cloud_port}"
        env["UNS_SERVICES__BRIDGE__REMOTE__ALLOW_PLAINTEXT"] = "true"
        env["UNS_SERVICES__BRIDGE__REMOTE__PROTOCOL"] = "4"
    planned = []
    for i, service in enumerate(_plan(loaded)):
        name = service.name
        if not service.enabled:
            planned.append(f"{name:<16} disabled in the config")
            if not plan:
                log.info("%s is disabled in the config; not starting it", name)
            continue
        idle = None if name == "bridge" and cloud_port is not None else service.idle
        if idle:  # a process with nothing to do costs a box 40-45 MB
            planned.append(f"{name:<16} not started: {idle}")
            if not plan:
                log.info("%s: %s; not starting it", name, idle)
            continue
        # a service keeps its own port's offset (demo 9400, opcua-adapter 9401, ...)
        offset = service.default_port - 9400 if service.default_port >= 9400 else 50 + i
        replicated = len(service.node_ids) > 1
        for j, node in enumerate(service.node_ids):
            step = REPLICA_PORT_STEP * j
            mport = str(metrics_port + offset + step if metrics_port else 0)
            where = f"metrics port {mport}" if mport != "0" else "metrics on a free port"
            label = node if replicated else name
            planned.append(f"{label:<16} {where}")
            # a replica is told its node id: `uns.shard` gives it its share of the devices
            section = f"UNS_SERVICES__{name.upper().replace('-', '_')}__NODE_ID"
            children.append(
                Child(
                    label,
                    uns_argv("run", name, "--metrics-port", mport, *common),
                    # in the environment, not argv: every user of the box can read a command
                    # line (ps), and the URL may carry the broker password
                    env={
                        **env,
                        **({section: node} if replicated else {}),
                        "UNS_BROKER_URL": url,
                        **(policy.service_env(node) if policy else {}),
                    },
                )
            )
    shown = redact_url(url)  # the log must not carry the broker password
    if plan:
        where = f"embedded on {host}:{port}" if broker_child else shown
        where += ", users and ACLs (--secure)" if secure else ""
        typer.echo(f"{'broker':<16} {where}")
        typer.echo("\n".join(planned))
        return
    log.info("namespace on %s; services: %s", shown, ", ".join(c.name for c in children) or "none")
    log.info("watch it with: uns sub '#' --json --broker %s", shown)
    target = parse_broker_url(url)
    asyncio.run(
        supervise(
            broker_child,
            children,
            broker_address=(target.host, target.port) if broker_child else None,
            broker_login=policy.probe_login() if policy else None,
        )
    )


# ---- looking at the namespace ---------------------------------------------------------


def _describe(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"topic": message.topic, "retained": message.retain}
    if not message.payload:
        out["payload"] = None
        return out
    try:
        out["payload"] = p.decode(message.payload)
    except PayloadError as exc:
        out["payload"] = message.payload.decode("utf-8", errors="replace")
        out["error"] = str(exc)
    return out


_json = msgspec.json.Encoder()


@app.command()
def sub(
    topic_filter: Annotated[str, typer.Argument(metavar="FILTER", help="MQTT topic filter")],
    count: Annotated[int | None, typer.Option(help="Exit after N messages")] = None,
    timeout: Annotated[float | None, typer.Option(help="Exit after S seconds")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print decoded messages. Exits 1 if the broker was never reached or --count was not
    reached before --timeout."""
    url, settings = watch_target(topic_filter, config, broker)
    seen = 0
    connections = 0

    async def work(bus: Bus) -> None:
        nonlocal seen, connections
        await bus.subscribe(topic_filter, qos=1)
        connections += 1
        if connections > 1:
            typer.echo(f"reconnected; subscribed to {topic_filter!r} again", err=True)
        async for message in bus.messages():
            line = _describe(message)
            if as_json:
                sys.stdout.write(_json.encode(line).decode() + "\n")
            else:
                flag = " (retained)" if message.retain else ""
                body = _json.encode(line.get("payload")).decode()
                sys.stdout.write(f"{message.topic}{flag} {body}\n")
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                return

    async def main(stop: Stop) -> int:
        try:
            async with asyncio.timeout(timeout):
                await on_broker(url, settings, stop, work)
        except TimeoutError:
            pass
        if not connections:
            typer.echo(f"never reached the broker at {redact_url(url)}", err=True)
            return 1
        if count is not None and seen < count:
            typer.echo(f"received {seen} of {count} messages", err=True)
            return 1
        return 0

    # a stop by signal keeps the codes above (0 after a reached broker): ending `uns sub`
    # with Ctrl-C is its normal end
    code = run_main(main, grace_s=GRACE_S)
    raise typer.Exit(code)


TREE_FILTERS: Final = (
    "+/+/+/+/+/+/+/birth",
    "+/+/+/+/+/+/+/death",
    "+/+/_node/+/birth",
    "+/+/_node/+/death",
)


@app.command()
def tree(
    topic_filter: Annotated[str, typer.Argument(metavar="[FILTER]", help="e.g. acme/pune/#")] = "#",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for retained births")] = 3.0,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The namespace as a tree: nodes, devices, streams, metrics with units, online state."""
    try:
        validate_filter(topic_filter)
    except TopicError as exc:
        raise fail(str(exc)) from None
    from uns.tree import NamespaceView  # rich: not resident in `uns up`

    loaded = load_config(config)
    url, settings = broker_target(loaded, broker)
    view = NamespaceView()
    # The end of the retained burst: a command to a node id of our own, sent after the
    # subscriptions, comes back after every retained message they brought. It is a valid
    # `cmd` on a `_node/{id}/cmd` topic, so an app watching `#` sees nothing outside the
    # contract (a plain `uns-cli/tree/<id>` "end" marker crashed naive apps); no node has
    # that id, so nobody acts on it.
    ns = loaded.config.namespace
    marker_topic = node_topic(ns.enterprise, ns.site, f"uns-tree-{uuid.uuid4().hex[:12]}", "cmd")
    marker = p.Command(ts=p.now_ms(), name="sync", sender="uns-cli", id=uuid.uuid4().hex)

    def is_marker(message: Message) -> bool:
        try:
            return p.decode(message.payload, p.Command).id == marker.id
        except PayloadError:
            return False

    async def work(bus: Bus) -> None:
        for f in TREE_FILTERS:
            await bus.subscribe(f, qos=1)
        await bus.subscribe(marker_topic, qos=1)
        await bus.publish(marker_topic, p.encode(marker), qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for message in bus.messages():
                    if message.topic == marker_topic:
                        if is_marker(message):
                            return
                    elif message.retain and matches(topic_filter, message.topic):
                        view.add(message.topic, message.payload)
        except TimeoutError:
            pass

    run_client(lambda stop: on_broker(url, settings, stop, work))
    from rich.console import Console

    if not view.nodes and not view.devices:
        typer.echo(
            f"nothing under {topic_filter!r} on {redact_url(url)} (no retained births)", err=True
        )
        raise typer.Exit(1)
    Console().print(view.render())


@app.command()
def top(
    topic_filter: Annotated[str, typer.Argument(metavar="[FILTER]", help="e.g. acme/pune/#")] = "#",
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit")] = False,
    wait: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="With --once: seconds to reach the broker, then of traffic the frame shows",
        ),
    ] = 3.0,
    refresh: Annotated[float, typer.Option(min=0.1, help="Seconds between frames")] = 1.0,
    metrics: Annotated[
        bool, typer.Option(help="Read each service's /metrics (connected, reconnects, drops)")
    ] = True,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A live view of the plant: every device (online, score, RUL, open events, message
    rate, last seen) and the services beneath; q or Ctrl-C ends it."""
    try:
        validate_filter(topic_filter)
    except TopicError as exc:
        raise fail(str(exc)) from None
    if not once and not sys.stdout.isatty():
        raise fail("uns top draws on a terminal; --once prints one frame")
    from uns.top import PlantView, watch  # rich: not resident in `uns up`

    loaded = load_config(config)
    url, settings = broker_target(loaded, broker)
    ns = loaded.config.namespace
    view = PlantView(
        (DevicePath.parse(d.path) for d in loaded.config.plant.devices),
        home=(ns.enterprise, ns.site),
        topic_filter=topic_filter,
    )

    def main(stop: Stop) -> Any:
        return watch(
            view,
            url,
            redact_url(url),
            settings,
            stop,
            once=once,
            wait_s=wait,
            refresh_s=refresh,
            scrape_metrics=metrics,
        )

    # like `uns sub`: q or Ctrl-C is its normal end (0 once the broker was reached)
    raise typer.Exit(run_main(main, grace_s=GRACE_S))


@app.command()
def pub(
    topic: Annotated[str, typer.Argument()],
    payload: Annotated[str, typer.Argument(help="Payload text (JSON for typed messages)")],
    retain: Annotated[bool, typer.Option(help="Retain the message")] = False,
    qos: Annotated[int, typer.Option(min=0, max=2)] = 1,
    check: Annotated[bool, typer.Option(help="Refuse a payload that does not decode")] = True,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Publish one message (e.g. a command); the payload is checked against the contract."""
    data = payload.encode()
    if check and data:
        try:
            p.decode(data)
        except PayloadError as exc:
            raise fail(f"payload: {exc} (use --no-check to send it anyway)") from None
    if "+" in topic or "#" in topic or not topic:
        raise fail(f"topic: {topic!r} is not a topic to publish to (no wildcards)")
    loaded = load_config(config)
    url, settings = broker_target(loaded, broker)

    async def work(bus: Bus) -> None:
        await bus.publish(topic, data, qos=qos, retain=retain)

    run_client(lambda stop: on_broker(url, settings, stop, work))


# ---- the contract ----------------------------------------------------------------------


@schema_app.command("export")
def schema_export(
    directory: Annotated[
        Path, typer.Option("--dir", help="Target directory")
    ] = schema_files.SCHEMA_DIR,
) -> None:
    """Write the JSON Schemas generated from the code into uns-schema/."""
    for path in schema_files.export(directory):
        typer.echo(f"wrote {path}")


@schema_app.command("check")
def schema_check(
    directory: Annotated[
        Path, typer.Option("--dir", help="Directory to check")
    ] = schema_files.SCHEMA_DIR,
) -> None:
    """Exit 1 if the JSON Schemas in uns-schema/ are stale (run `uns schema export`)."""
    stale = schema_files.stale(directory)
    if stale:
        typer.echo(f"stale: {', '.join(stale)} in {directory}; run `uns schema export`", err=True)
        raise typer.Exit(1)
    typer.echo("uns-schema is up to date")


def main() -> None:
    from uns.supervisor import follow_supervisor

    follow_supervisor()  # a child of `uns up` ends with it, even after a kill -9
    try:
        app()
    except UnsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
