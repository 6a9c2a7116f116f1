"""The ``uns`` command line."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import msgspec
import typer

from uns import payloads as p
from uns import schema as schema_files
from uns.bus import Bus, Message, connect
from uns.config import BrokerSettings, LoadedConfig, load, parse_broker_url, redact_url
from uns.errors import BusError, ConfigError, PayloadError, TopicError, UnsError
from uns.runtime import Node, Service
from uns.topics import DevicePath, matches, node_topic, validate_filter
from uns.tree import NamespaceView

T = TypeVar("T")

log = logging.getLogger("uns")

app = typer.Typer(
    name="uns",
    help="An edge Unified Namespace: OPC UA and Modbus into one ISA-95 MQTT namespace.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
schema_app = typer.Typer(help="The payload contract in uns-schema/.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")

BrokerOpt = Annotated[
    str | None,
    typer.Option(
        "--broker",
        envvar="UNS_BROKER_URL",
        show_default=False,
        help="Broker URL, mqtt://host:port or mqtts://host:port"
        " [default: broker.url of the config, mqtt://127.0.0.1:1883]",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="UNS_CONFIG",
        show_default=False,
        help="Config file [default: the example plant, uns-schema/plant.yaml]",
    ),
]
LogOpt = Annotated[
    str, typer.Option("--log-level", envvar="UNS_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR")
]


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # chatty third-party libraries: their warnings and errors only
    for name in ("amqtt", "transitions", "asyncua", "pymodbus"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _load(config: Path | None) -> LoadedConfig:
    try:
        return load(config)
    except ConfigError as exc:
        raise _fail(f"config: {exc}") from None


def _broker(loaded: LoadedConfig, url: str | None) -> tuple[str, BrokerSettings]:
    if url is None:
        return loaded.config.broker.url, loaded.config.broker
    try:
        parse_broker_url(url, "--broker")
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    return url, loaded.config.broker


def _watch_target(
    topic_filter: str, config: Path | None, broker: str | None
) -> tuple[str, BrokerSettings]:
    """Validate a filter, then the config and broker URL of a command that watches."""
    try:
        validate_filter(topic_filter)
    except TopicError as exc:
        raise _fail(str(exc)) from None
    return _broker(_load(config), broker)


class Stop(asyncio.Event):
    """Set by SIGINT/SIGTERM; ``signal`` says which (None while running, or when the work
    ended by itself)."""

    signal: signal.Signals | None = None

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + int(self.signal) if self.signal is not None else 0


def _run(main: Callable[[Stop], Any], *, grace_s: float | None = None) -> Any:
    """Run a coroutine with SIGINT/SIGTERM setting its stop event.

    ``grace_s`` (the commands that watch or publish; not services, which publish their
    death, nor the broker): once stopped, the process ends at the latest ``grace_s`` later
    whatever it is waiting for (a connect blocked in a thread, a stuck broker), and at
    once on a second signal, with exit code 128 + the signal.
    """

    async def runner() -> Any:
        stop = Stop()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _stopper(stop, sig, grace_s))
        return await main(stop)

    try:
        return asyncio.run(runner())
    except ConfigError as exc:
        raise _fail(f"config: {exc}") from None


def _stopper(stop: Stop, sig: signal.Signals, grace_s: float | None) -> Callable[[], None]:
    def handler() -> None:
        if stop.is_set() and grace_s is not None:
            _hard_exit(128 + int(sig))
        log.info("%s received: stopping", sig.name)
        stop.signal = stop.signal or sig
        stop.set()
        if grace_s is not None:
            # a daemon thread, not the loop: it fires even if the loop cannot run again
            timer = threading.Timer(grace_s, _hard_exit, (stop.exit_code,))
            timer.daemon = True
            timer.start()

    return handler


def _hard_exit(code: int) -> None:
    """End the process now: what is printed so far is kept, nothing else is waited for (an
    executor thread in a blocking connect would hold a normal exit for up to its timeout)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def service_classes() -> dict[str, Any]:
    """Installed services (entry point group ``uns.services``), by name."""
    return {ep.name: ep for ep in entry_points(group="uns.services")}


def _service_class(name: str) -> type[Service[Any]]:
    found = service_classes()
    if name not in found:
        known = ", ".join(sorted([*found, "broker"]))
        raise _fail(f"no service named {name!r}; installed: {known}")
    cls: type[Service[Any]] = found[name].load()
    return cls


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
    _logging(log_level)
    loaded = _load(config)
    if service == "broker":
        _broker_main(loaded, None, None)
        return
    cls = _service_class(service)
    try:
        settings = loaded.service(service, cls.Settings)
        if metrics_port is not None:
            settings = msgspec.structs.replace(settings, metrics_port=metrics_port)
    except (ConfigError, msgspec.ValidationError) as exc:
        raise _fail(f"config: {exc}") from None
    url, _ = _broker(loaded, broker)

    async def main(stop: asyncio.Event) -> None:
        node = Node(service, settings, loaded.config, broker_url=url, version=cls.version)
        await node.serve(cls(node), stop)

    _run(main)


broker_app = typer.Typer(help="The embedded MQTT broker (amqtt).", invoke_without_command=True)
app.add_typer(broker_app, name="broker")


def _broker_main(loaded: LoadedConfig, host: str | None, port: int | None) -> None:
    try:
        from uns_broker import BrokerServerSettings, serve
    except ImportError:
        raise _fail(
            "the embedded broker is not installed (pip install -e services/broker)"
        ) from None
    settings = loaded.service("broker", BrokerServerSettings)
    changes: dict[str, Any] = {}
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    settings = msgspec.structs.replace(settings, **changes)
    _run(lambda stop: serve(settings, stop))


@broker_app.callback()
def broker_cmd(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Listen address [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [default: 1883]")] = None,
    config: ConfigOpt = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Run the embedded broker: anonymous by default, users and ACLs when configured."""
    if ctx.invoked_subcommand is not None:
        return
    _logging(log_level)
    _broker_main(_load(config), host, port)


@broker_app.command("passwd")
def broker_passwd(
    file: Annotated[Path, typer.Argument(help="Password file to create or update")],
    username: Annotated[str, typer.Argument()],
) -> None:
    """Add or change a user in a password file (argon2 hash); the password is read from stdin."""
    try:
        from uns_broker import set_password
    except ImportError:
        raise _fail(
            "the embedded broker is not installed (pip install -e services/broker)"
        ) from None
    try:
        set_password(file, username, sys.stdin.readline().rstrip("\n"))
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{username} written to {file}")


def _plan(config: Path | None) -> list[tuple[str, bool, int]]:
    """(name, enabled, default metrics port) of every installed service, in name order."""
    loaded = load(config)
    found = service_classes()
    plan = []
    for name in sorted(found):
        cls: type[Service[Any]] = found[name].load()
        plan.append((name, loaded.service(name, cls.Settings).enabled, cls.default_metrics_port))
    return plan


def _plan_elsewhere(config: Path | None) -> list[tuple[str, bool, int]]:
    """`_plan` in a short-lived process: it imports every service (numpy, onnxruntime,
    asyncua, ...), which the supervisor would otherwise keep resident for nothing
    (58 MB of the example plant's RSS, measured by `uns bench plant`)."""
    import subprocess

    code = "from uns.cli import _print_plan; _print_plan()"
    argv = [sys.executable, "-c", code, str(config) if config else ""]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise _fail(lines[-1])
    return [(name, enabled, port) for name, enabled, port in msgspec.json.decode(done.stdout)]


def _print_plan() -> None:
    try:
        plan = _plan(Path(sys.argv[1]) if sys.argv[1] else None)
    except ConfigError as exc:
        sys.stderr.write(f"config: {exc}\n")
        sys.exit(2)
    sys.stdout.write(msgspec.json.encode(plan).decode())


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
) -> None:
    """Start the broker and every installed service; restart crashed ones; Ctrl-C stops all."""
    from uns.supervisor import Child, supervise, uns_argv

    _logging(log_level)
    loaded = _load(config)
    config_args = ["--config", str(loaded.path)] if loaded.path else []
    common = [*config_args, "--log-level", log_level]
    broker_child = None
    if broker is None:
        url = f"mqtt://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        broker_child = Child(
            "broker", uns_argv("broker", "--host", host, "--port", str(port), *common)
        )
    else:
        url, _ = _broker(loaded, broker)
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
    for i, (name, enabled, default_port) in enumerate(_plan_elsewhere(loaded.path)):
        if not enabled:
            log.info("%s is disabled in the config; not starting it", name)
            continue
        # a service keeps its own port's offset (demo 9400, opcua-adapter 9401, ...)
        offset = default_port - 9400 if default_port >= 9400 else 50 + i
        mport = str(metrics_port + offset if metrics_port else 0)
        children.append(
            Child(
                name,
                uns_argv("run", name, "--metrics-port", mport, *common),
                # in the environment, not argv: every user of the box can read a command
                # line (ps), and the URL may carry the broker password
                env={**env, "UNS_BROKER_URL": url},
            )
        )
    shown = redact_url(url)  # the log must not carry the broker password
    log.info("namespace on %s; services: %s", shown, ", ".join(c.name for c in children) or "none")
    log.info("watch it with: uns sub '#' --json --broker %s", shown)
    target = parse_broker_url(url)
    asyncio.run(
        supervise(
            broker_child,
            children,
            broker_address=(target.host, target.port) if broker_child else None,
        )
    )


# ---- looking at the namespace ---------------------------------------------------------


RETRY_MIN_S: Final = 0.5
RETRY_MAX_S: Final = 5.0
GRACE_S: Final = 1.5
"""How long a command that talks to the broker may take to end after SIGINT/SIGTERM."""


async def _on_broker(
    url: str, settings: BrokerSettings, stop: Stop, work: Callable[[Bus], Awaitable[T]]
) -> T | None:
    """``work(bus)`` on a connection to the broker, and again on a new connection whenever
    the broker refuses or drops it, until it returns (its result) or ``stop`` is set (None).

    Each failed attempt is one line on stderr (never a traceback), then a wait that doubles
    from 0.5 s to 5 s: nothing spins while the broker is away. ``stop`` wins over a connect,
    a wait or ``work`` in progress. The attempts run in a task of their own because a
    cancellation can be lost inside them (Python 3.11's `asyncio.wait_for` drops one that
    races its result): a lost one must not keep the process alive, as it did the old
    retry helper (35 minutes at 0.7 core after SIGTERM).
    """
    task = asyncio.create_task(_attempts(url, settings, work))
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)  # then abandoned (`GRACE_S` ends it)
    if task.done() and not task.cancelled():
        return task.result()  # work's own errors are raised here
    return None


async def _attempts(url: str, settings: BrokerSettings, work: Callable[[Bus], Awaitable[T]]) -> T:
    loop = asyncio.get_running_loop()
    delay = RETRY_MIN_S
    while True:
        connected_at: float | None = None
        try:
            async with connect(
                url, settings=settings, client_id=f"uns-cli-{uuid.uuid4().hex[:8]}"
            ) as bus:
                connected_at = loop.time()
                return await work(bus)
        except BusError as exc:
            if connected_at is not None and loop.time() - connected_at >= RETRY_MAX_S:
                delay = RETRY_MIN_S  # it worked for a while: the broker restarted
            typer.echo(f"{exc}; retrying in {delay:.1f} s", err=True)
        # jittered, so that every client of a restarted broker does not come back at once
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, RETRY_MAX_S)


def _run_client(main: Callable[[Stop], Awaitable[T]]) -> T:
    """`_run` for a command that talks to the broker: it ends within `GRACE_S` of SIGINT or
    SIGTERM, with exit code 130 or 143 when the signal stopped it before it was done."""
    stops: list[Stop] = []

    async def run(stop: Stop) -> T:
        stops.append(stop)
        return await main(stop)

    result: T = _run(run, grace_s=GRACE_S)
    if stops and stops[0].signal is not None:
        raise typer.Exit(stops[0].exit_code)
    return result


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
    url, settings = _watch_target(topic_filter, config, broker)
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
                await _on_broker(url, settings, stop, work)
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
    code = _run(main, grace_s=GRACE_S)
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
        raise _fail(str(exc)) from None
    loaded = _load(config)
    url, settings = _broker(loaded, broker)
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

    _run_client(lambda stop: _on_broker(url, settings, stop, work))
    from rich.console import Console

    if not view.nodes and not view.devices:
        typer.echo(
            f"nothing under {topic_filter!r} on {redact_url(url)} (no retained births)", err=True
        )
        raise typer.Exit(1)
    Console().print(view.render())


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
            raise _fail(f"payload: {exc} (use --no-check to send it anyway)") from None
    if "+" in topic or "#" in topic or not topic:
        raise _fail(f"topic: {topic!r} is not a topic to publish to (no wildcards)")
    loaded = _load(config)
    url, settings = _broker(loaded, broker)

    async def work(bus: Bus) -> None:
        await bus.publish(topic, data, qos=qos, retain=retain)

    _run_client(lambda stop: _on_broker(url, settings, stop, work))


@app.command()
def replay(
    file: Annotated[Path, typer.Argument(help="A CSV (one column per metric) or an .npz waveform")],
    device: Annotated[str, typer.Option(help="Device path to publish as")],
    time_column: Annotated[
        str | None,
        typer.Option(
            help="CSV column of timestamps (ISO 8601 or epoch s/ms) [default: timestamp/time/ts]"
        ),
    ] = None,
    speed: Annotated[
        float,
        typer.Option(
            min=0.0, help="1 = as recorded, 60 = an hour a minute, 0 = as fast as acknowledged"
        ),
    ] = 1.0,
    interval: Annotated[
        float, typer.Option(help="Seconds between CSV rows without timestamps")
    ] = 1.0,
    rate: Annotated[float | None, typer.Option(help="Sample rate of an .npz (Hz)")] = None,
    block: Annotated[int, typer.Option(min=16, help="Samples per waveform block")] = 1000,
    node_id: Annotated[str, typer.Option("--node", help="Edge node id to publish as")] = "replay",
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Publish a recorded file as one device's raw metrics, with the file's own timestamps."""
    try:
        from uns_replay import ReplaySettings, read_csv, read_npz
        from uns_replay import replay as run_replay
    except ImportError:
        raise _fail("replay is not installed (pip install -e services/replay)") from None
    _logging(log_level)
    path = _device(device)
    loaded = _load(config)
    url, _ = _broker(loaded, broker)
    if not file.exists():
        raise _fail(f"{file}: no such file")
    try:
        recording = (
            read_npz(file, rate_hz=rate, block=block)
            if file.suffix == ".npz"
            else read_csv(file, time_column=time_column, interval_s=interval)
        )
        settings = msgspec.convert(
            {"speed": speed, "node_id": node_id, "metrics_port": 0}, ReplaySettings
        )
    except msgspec.ValidationError as exc:
        raise _fail(f"--node: {exc}") from None
    except ConfigError as exc:
        raise _fail(str(exc)) from None

    async def main(stop: asyncio.Event) -> int:
        node = Node("replay", settings, loaded.config, broker_url=url)
        return await run_replay(node, path, recording, stop)

    sent = _run(main)
    typer.echo(f"{sent} messages published to {path}/raw/data", err=True)


opcua_app = typer.Typer(help="OPC UA helpers.", no_args_is_help=True)
app.add_typer(opcua_app, name="opcua")


@opcua_app.command("browse")
def opcua_browse(
    url: Annotated[str, typer.Argument(help="opc.tcp://host:port of the server")],
    out: Annotated[Path | None, typer.Option(help="Write the YAML here [default: stdout]")] = None,
    root: Annotated[str, typer.Option(help="Browse path to start at")] = "/Objects",
    max_depth: Annotated[int, typer.Option(min=1, max=20)] = 6,
    security_mode: Annotated[str, typer.Option(help="none, sign or sign_encrypt")] = "none",
    certificate: Annotated[Path | None, typer.Option(help="Client certificate (PEM/DER)")] = None,
    private_key: Annotated[Path | None, typer.Option(help="Its private key")] = None,
    server_certificate: Annotated[Path | None, typer.Option(help="Pin this server cert")] = None,
    username: Annotated[str | None, typer.Option()] = None,
    password_file: Annotated[Path | None, typer.Option(help="File holding the password")] = None,
    config: ConfigOpt = None,
) -> None:
    """Write a starter opcua-adapter config (tags, NodeIds, units, ranges) from a live server."""
    try:
        from uns_opcua_adapter import Security, browse
    except ImportError:
        raise _fail(
            "the OPC UA adapter is not installed (pip install -e services/opcua-adapter)"
        ) from None
    ns = _load(config).config.namespace
    try:
        security = msgspec.convert(
            {
                "mode": security_mode,
                "certificate": str(certificate) if certificate else None,
                "private_key": str(private_key) if private_key else None,
                "server_certificate": str(server_certificate) if server_certificate else None,
            },
            Security,
        )
        password = password_file.read_text().strip() if password_file else None
    except msgspec.ValidationError as exc:
        raise _fail(f"--security-mode/--certificate/--private-key: {exc}") from None
    except OSError as exc:
        raise _fail(f"--password-file: {exc}") from None
    try:
        text = asyncio.run(
            browse(
                url,
                root=root,
                max_depth=max_depth,
                security=security,
                username=username,
                password=password,
                enterprise=ns.enterprise,
                site=ns.site,
            )
        )
    except UnsError as exc:
        raise _fail(str(exc), code=1) from None
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}", err=True)


@opcua_app.command("cert")
def opcua_cert(
    out: Annotated[Path, typer.Option(help="Certificate file (DER: import it on the PLC)")] = Path(
        "pki/opcua-adapter.der"
    ),
    key: Annotated[Path, typer.Option(help="Private key file (PEM, mode 0600)")] = Path(
        "pki/opcua-adapter.key.pem"
    ),
    uri: Annotated[
        str | None, typer.Option(help="Application URI [default: urn:<host>:uns:opcua-adapter]")
    ] = None,
    host: Annotated[
        list[str] | None, typer.Option(help="DNS name or IP of this box (repeatable)")
    ] = None,
    days: Annotated[int, typer.Option(min=1)] = 3650,
    force: Annotated[bool, typer.Option(help="Replace existing files")] = False,
) -> None:
    """Create the adapter's OPC UA client certificate and key (then trust it on the PLC)."""
    try:
        from uns_opcua_adapter import create_certificate, describe_certificate
    except ImportError:
        raise _fail(
            "the OPC UA adapter is not installed (pip install -e services/opcua-adapter)"
        ) from None
    try:
        made = create_certificate(
            out, key, application_uri=uri, hostnames=host, days=days, overwrite=force
        )
    except UnsError as exc:
        raise _fail(str(exc)) from None
    typer.echo(describe_certificate(made))


# ---- the simulator ---------------------------------------------------------------------

sim_app = typer.Typer(
    help="Drive the simulated plant: inject and clear faults.", no_args_is_help=True
)
app.add_typer(sim_app, name="sim")
FAULT_KINDS = ("bearing_wear", "hydraulic_leak", "sensor_drift", "stuck_sensor", "dropout")


def _device(text: str) -> DevicePath:
    try:
        return DevicePath.parse(text)
    except TopicError as exc:
        raise _fail(str(exc)) from None


async def _command_and_wait(
    url: str,
    settings: BrokerSettings,
    stop: Stop,
    topic: str,
    command: p.Command,
    answer: str,
    match: Callable[[Any], bool],
    timeout: float,
) -> Any:
    """Publish ``command`` to ``topic`` and return the first payload on ``answer`` that matches
    within ``timeout`` of the connection (None if none); again after a reconnect."""

    async def work(bus: Bus) -> Any:
        await bus.subscribe(answer, qos=1)
        await bus.publish(topic, p.encode(command), qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for message in bus.messages():
                    if not message.payload:
                        continue
                    try:
                        payload: Any = p.decode(message.payload)
                    except PayloadError:
                        continue
                    if match(payload):
                        return payload
        except TimeoutError:
            return None
        return None

    return await _on_broker(url, settings, stop, work)


@sim_app.command("fault")
def sim_fault(
    device: Annotated[
        str,
        typer.Argument(
            metavar="DEVICE_PATH", help="e.g. acme/pune/stamping/line-3/cell-a/press-01"
        ),
    ],
    kind: Annotated[str, typer.Argument(help=", ".join(FAULT_KINDS))],
    severity: Annotated[float, typer.Option(min=0.0, max=1.0, help="Final severity")] = 1.0,
    ramp: Annotated[float, typer.Option(min=0.0, help="Seconds (simulated) to reach it")] = 0.0,
    tag: Annotated[str, typer.Option(help="Sensor of sensor_drift/stuck_sensor")] = "bearing_temp",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the simulator")] = 5.0,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Inject a fault into a simulated machine; waits until the simulator confirms it."""
    if kind not in FAULT_KINDS:
        raise _fail(f"kind: {kind!r} is not one of {', '.join(FAULT_KINDS)}")
    path = _device(device)
    url, settings = _broker(_load(config), broker)
    command = p.Command(
        ts=p.now_ms(),
        name="fault",
        sender="uns-cli",
        id=uuid.uuid4().hex,
        args={"kind": kind, "severity": severity, "ramp_s": ramp, "tag": tag},
    )
    event = _run_client(
        lambda stop: _command_and_wait(
            url,
            settings,
            stop,
            path.topic("cmd", "fault"),
            command,
            path.topic("events", "sim_fault"),
            lambda e: (
                isinstance(e, p.Event) and e.state == "raised" and e.details.get("fault") == kind
            ),
            timeout,
        )
    )
    if event is None:
        raise _fail(f"no simulator confirmed the fault on {path} within {timeout:g} s", code=1)
    typer.echo(f"{kind} injected on {path}: severity {severity:g}, ramp {ramp:g} s")


@sim_app.command("clear")
def sim_clear(
    device: Annotated[str, typer.Argument(metavar="DEVICE_PATH")],
    kind: Annotated[str | None, typer.Argument(help="Only this fault [default: all]")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the simulator")] = 5.0,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Clear a machine's faults; waits until the simulator confirms it."""
    path = _device(device)
    url, settings = _broker(_load(config), broker)
    command = p.Command(
        ts=p.now_ms(),
        name="clear",
        sender="uns-cli",
        id=uuid.uuid4().hex,
        args={"kind": kind} if kind else {},
    )

    async def main(stop: Stop) -> Any:
        return await _command_and_wait(
            url,
            settings,
            stop,
            path.topic("cmd", "clear"),
            command,
            path.topic("events", "sim_fault"),
            lambda e: isinstance(e, p.Event) and e.state == "cleared",
            timeout,
        )

    if _run_client(main) is None:
        raise _fail(
            f"no fault cleared on {path} within {timeout:g} s (none active, or no simulator)",
            code=1,
        )
    typer.echo(f"faults cleared on {path}")


@sim_app.command("status")
def sim_status(
    node: Annotated[str, typer.Option(help="The simulator's node id")] = "simulator",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="The raw answer as JSON")] = False,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Machines of the simulator and their active faults."""
    loaded = _load(config)
    url, settings = _broker(loaded, broker)
    ns = loaded.config.namespace
    reply_to = f"uns-cli/{uuid.uuid4().hex}/reply"
    command = p.Command(
        ts=p.now_ms(),
        name="status",
        sender="uns-cli",
        id=uuid.uuid4().hex,
        args={"reply_to": reply_to},
    )
    reply = _run_client(
        lambda stop: _command_and_wait(
            url,
            settings,
            stop,
            node_topic(ns.enterprise, ns.site, node, "cmd"),
            command,
            reply_to,
            lambda r: isinstance(r, p.Reply) and r.id == command.id,
            timeout,
        )
    )
    if reply is None:
        raise _fail(f"no simulator node {node!r} answered within {timeout:g} s", code=1)
    if as_json:
        typer.echo(_json.encode(reply.result).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("device", "asset", "unit", "faults (level/severity)")
    for path, d in sorted(reply.result.get("devices", {}).items()):
        faults = (
            ", ".join(f"{k} {f['level']:.2f}/{f['severity']:.2f}" for k, f in d["faults"].items())
            or "-"
        )
        table.add_row(path, d["asset"], str(d["unit_id"]), faults)
    Console().print(table)
    typer.echo(
        f"OPC UA {reply.result.get('opcua')}, Modbus {reply.result.get('modbus')}, "
        f"time x{reply.result.get('time_scale')}"
    )


@sim_app.command("plant")
def sim_plant(
    machines: Annotated[int, typer.Option(min=1, max=247, help="How many machines")] = 40,
    out: Annotated[Path | None, typer.Option(help="Write it here [default: stdout]")] = None,
    config: ConfigOpt = None,
) -> None:
    """A whole config for a bigger simulated plant: N machines in the example's mix, the
    simulator and both adapters set up to read them (for demos and benchmarks)."""
    try:
        from uns_simulator import SimulatorSettings, adapter_config, scaled_plant
    except ImportError:
        raise _fail("the simulator is not installed (pip install -e services/simulator)") from None
    loaded = _load(config)
    ns = loaded.config.namespace
    s = loaded.service("simulator", SimulatorSettings)
    devices = scaled_plant(machines, enterprise=ns.enterprise, site=ns.site)
    host = "127.0.0.1" if s.opcua.host in ("0.0.0.0", "::") else s.opcua.host
    document = {
        "namespace": {"enterprise": ns.enterprise, "site": ns.site},
        "broker": {"url": loaded.config.broker.url},
        "plant": {"devices": [{"path": str(p), "asset": a} for p, a in devices]},
        "services": {
            "demo": {"enabled": False},
            "simulator": {"opcua": {"port": s.opcua.port}, "modbus": {"port": s.modbus.port}},
            **adapter_config(
                devices,
                opcua_url=f"opc.tcp://{host}:{s.opcua.port}",
                modbus_host=host,
                modbus_port=s.modbus.port,
                rate_hz=s.rate_hz,
            ),
        },
    }
    text = f"# {machines} simulated machines: `uns sim plant --machines {machines}`\n"
    text += msgspec.yaml.encode(document).decode()
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}", err=True)


@sim_app.command("tagmap")
def sim_tagmap(
    config: ConfigOpt = None,
) -> None:
    """Print the opcua-adapter and modbus-adapter config sections that read the simulator."""
    try:
        from uns_simulator import SimulatorSettings, adapter_config
    except ImportError:
        raise _fail("the simulator is not installed (pip install -e services/simulator)") from None
    loaded = _load(config)
    s = loaded.service("simulator", SimulatorSettings)
    devices = [
        (DevicePath.parse(d.path), d.asset)
        for d in loaded.config.plant.devices
        if s.devices is None or d.path in s.devices
    ]
    host = "127.0.0.1" if s.opcua.host in ("0.0.0.0", "::") else s.opcua.host
    sections = adapter_config(
        devices,
        opcua_url=f"opc.tcp://{host}:{s.opcua.port}",
        modbus_host=host,
        modbus_port=s.modbus.port,
        rate_hz=s.rate_hz,
    )
    typer.echo(msgspec.yaml.encode({"services": sections}).decode())


# ---- recording and the model lifecycle (services/inference) --------------------------------


def _inference() -> Any:
    try:
        from uns_inference import cli as cli_commands
    except ImportError:
        raise _fail("inference is not installed (pip install -e services/inference)") from None
    return cli_commands


def _inference_defaults(loaded: LoadedConfig) -> Any:
    from uns_inference import InferenceSettings

    try:
        return loaded.service("inference", InferenceSettings)
    except ConfigError as exc:
        raise _fail(f"config: {exc}") from None


@app.command()
def record(
    topic_filter: Annotated[
        str, typer.Argument(metavar="FILTER", help="e.g. '+/+/+/+/+/+/features/#'")
    ],
    out: Annotated[Path, typer.Option(help="JSON-lines file to append to")],
    duration: Annotated[float | None, typer.Option(min=0.0, help="Stop after S seconds")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after N messages")] = None,
    broker: BrokerOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Record messages into a file for training: one {"topic", "ts", "retained", "payload"}
    per line (whichever of --duration and --count comes first; Ctrl-C stops too)."""
    cmd = _inference()
    url, settings = _watch_target(topic_filter, config, broker)

    async def main(stop: asyncio.Event) -> int:
        n: int = await cmd.record_messages(
            url,
            settings,
            topic_filter,
            out,
            stop=stop,
            duration=duration,
            count=count,
            say=lambda line: typer.echo(line, err=True),
        )
        return n

    try:
        written = _run(main)
    except cmd.CommandError as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(f"{written} messages written to {out}", err=True)


model_app = typer.Typer(
    help="Train, sign, check and promote models (ONNX + model card).", no_args_is_help=True
)
app.add_typer(model_app, name="model")
audit_app = typer.Typer(help="The model audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@model_app.command("train")
def model_train(
    data: Annotated[
        list[Path], typer.Option("--data", help="A recording (uns record); repeat for several")
    ],
    kind: Annotated[str, typer.Option(help="anomaly or rul")],
    out: Annotated[Path, typer.Option(help="Directory for model.onnx and card.json")],
    name: Annotated[str | None, typer.Option(help="[default: ASSET-KIND]")] = None,
    version: Annotated[
        str | None, typer.Option(help="[default: the UTC time, e.g. 2025.11.22-091500]")
    ] = None,
    asset: Annotated[
        str | None,
        typer.Option(help="Asset type [default: that of the recorded devices in the config]"),
    ] = None,
    features: Annotated[
        list[str] | None, typer.Option("--features", help="Only features matching (glob, repeat)")
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Leave out features matching (glob, repeat) [default: counter levels]"),
    ] = None,
    device: Annotated[
        list[str] | None, typer.Option(help="Only devices matching (glob, repeat)")
    ] = None,
    min_raise_s: Annotated[
        float, typer.Option(min=0.0, help="Anomaly: seconds of breach before an event")
    ] = 10.0,
    min_clear_s: Annotated[
        float, typer.Option(min=0.0, help="Anomaly: seconds healthy before it clears")
    ] = 30.0,
    rul_unit: Annotated[str, typer.Option(help="RUL: s, min, h or d")] = "h",
    rul_cap: Annotated[
        float, typer.Option(min=0.0, help="RUL: the target is clipped here")
    ] = 125.0,
    config: ConfigOpt = None,
) -> None:
    """Fit a model on recorded features; writes model.onnx and card.json (sign it next)."""
    cmd = _inference()
    loaded = _load(config)
    plant = {d.path: d.asset for d in loaded.config.plant.devices}
    options: dict[str, Any] = {}
    if exclude is not None:
        options["exclude"] = exclude
    try:
        _, notes = cmd.model_train(
            data,
            kind,
            out,
            asset=asset,
            plant=plant,
            name=name,
            version=version,
            include=features or (),
            devices=device or (),
            min_raise_s=min_raise_s,
            min_clear_s=min_clear_s,
            rul_unit=rul_unit,
            rul_cap=rul_cap,
            **options,
        )
    except cmd.CommandError as exc:
        raise _fail(str(exc), code=1) from None
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(cmd.model_info(out))
    typer.echo(f"\nwrote {out}; next: uns model sign {out} --key KEYFILE", err=True)


@model_app.command("sign")
def model_sign(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A model directory")],
    key: Annotated[Path, typer.Option(help="Ed25519 private key (PEM), from uns model keygen")],
) -> None:
    """Sign a model: writes DIR/model.onnx.sig over the digests of model.onnx and card.json."""
    cmd = _inference()
    try:
        path = cmd.model_sign(directory, key)
    except cmd.CommandError as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(f"wrote {path}")


@model_app.command("verify")
def model_verify(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A model directory")],
    pubkey: Annotated[Path, typer.Option(help="Ed25519 public key (PEM)")],
) -> None:
    """Check a model as the inference service does (sha256, signature, loadable); exit 1 if not."""
    cmd = _inference()
    try:
        card = cmd.model_verify(directory, pubkey)
    except cmd.CommandError as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(f"ok: {card.name} {card.version} sha256 {card.sha256}, signed by {pubkey}")


@model_app.command("info")
def model_info(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A model directory")],
) -> None:
    """Show a model's card: features, thresholds, training data, evaluation, method."""
    cmd = _inference()
    try:
        typer.echo(cmd.model_info(directory))
    except cmd.CommandError as exc:
        raise _fail(str(exc), code=1) from None


@model_app.command("promote")
def model_promote(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A (signed) model directory")],
    models_dir: Annotated[
        Path | None,
        typer.Option(help="[default: services.inference.models_dir of the config, models]"),
    ] = None,
    pubkey: Annotated[
        Path | None,
        typer.Option(help="Verify with this key first [default: services.inference.pubkey]"),
    ] = None,
    audit_log: Annotated[
        Path | None,
        typer.Option(help="[default: services.inference.audit_log, var/model-audit.jsonl]"),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Make DIR the current model of its asset type: copied to MODELS/<asset>/<kind>/<version>/,
    the `current` pointer replaced atomically; the running service hot-loads it. Promoting a
    version already there (MODELS/press/anomaly/1.0.0) is a rollback."""
    cmd = _inference()
    s = _inference_defaults(_load(config))
    key = pubkey or (Path(s.pubkey) if s.pubkey else None)
    try:
        card, dest, previous = cmd.model_promote(
            directory,
            models_dir or Path(s.models_dir),
            audit_log=audit_log or Path(s.audit_log),
            pubkey=key,
        )
    except cmd.CommandError as exc:
        raise _fail(str(exc), code=1) from None
    checked = "signature verified" if key else "signature NOT checked here (no --pubkey)"
    replaced = f", replacing {previous}" if previous and previous != card.version else ""
    typer.echo(f"{card.name} {card.version} is current for {card.asset}/{card.kind}{replaced}")
    typer.echo(f"  {dest} ({checked})")


@model_app.command("keygen")
def model_keygen(
    out: Annotated[Path, typer.Option(help="Writes OUT.key (private, 0600) and OUT.pub")],
) -> None:
    """Make an Ed25519 signing key pair: keep .key offline, give .pub to the edge boxes."""
    cmd = _inference()
    try:
        key, pub = cmd.model_keygen(out)
    except cmd.CommandError as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(f"wrote {key} (private: keep it off the edge box) and {pub}")


@audit_app.command("verify")
def audit_verify(
    file: Annotated[Path, typer.Argument(help="e.g. var/model-audit.jsonl")],
) -> None:
    """Check the hash chain of an audit log; exit 1 naming the first edited or missing line."""
    cmd = _inference()
    try:
        head = cmd.audit_verify(file)
    except cmd.CommandError as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(f"ok: {head.lines} lines, head sha256 {head.sha256}")


# ---- benchmarks (libs/bench) --------------------------------------------------------------


@app.command()
def bench(
    scenarios: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SCENARIO",
            help="broker, vibration, slowtags, alert, bridge, plant [default: all]",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="One short run of each at low load: checks the harness")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write every figure to this file")
    ] = None,
    log_level: LogOpt = "WARNING",
) -> None:
    """Measure the pipeline on this machine: services as processes, load from another one;
    loss first, then rates, latencies, CPU and peak RSS per service, as a Markdown table."""
    try:
        from uns_bench import SCENARIOS
        from uns_bench import run as run_bench
    except ImportError:
        raise _fail("the benchmarks are not installed (pip install -e libs/bench)") from None
    _logging(log_level)
    unknown = [s for s in scenarios or [] if s not in SCENARIOS]
    if unknown:
        raise _fail(f"no scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    run_bench(scenarios or [], quick=quick, json_path=json_out, say=typer.echo)


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
    try:
        app()
    except UnsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
