"""What every ``uns`` command group is made of, for the packages that bring their own.

A package adds a group with an entry point (``[project.entry-points."uns.commands"]``,
``sim = "uns_simulator.cli:app"``) whose Typer app uses these, so that every command
takes the broker, config and log options alike, reports a bad input the same way
(``error: ...`` on stderr, exit 2; exit 1 when the work itself failed) and ends alike on
SIGINT/SIGTERM::

    from uns.commands import BrokerOpt, ConfigOpt, broker_target, fail, load_config, run_client

Keep a command module light: `uns --help` imports it to list its commands, so heavy
libraries (asyncua, numpy, onnxruntime) are imported inside the command functions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import random
import signal
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar, get_args, get_origin

import msgspec
import typer

from uns.bus import Bus, connect
from uns.config import BrokerSettings, LoadedConfig, load, parse_broker_url
from uns.errors import BusError, ConfigError, TopicError
from uns.topics import DevicePath, validate_filter

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("uns")

__all__ = [
    "GRACE_S",
    "BrokerOpt",
    "ConfigOpt",
    "LogOpt",
    "Stop",
    "broker_target",
    "device_path",
    "fail",
    "load_config",
    "on_broker",
    "run",
    "run_client",
    "setup_logging",
    "struct_options",
    "watch_target",
]

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


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``; chatty third-party libraries at WARNING at most."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in ("amqtt", "transitions", "asyncua", "pymodbus"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: MESSAGE`` on stderr; ``raise fail(...) from None`` exits with ``code``
    (2: the input is wrong, the default; 1: the work was tried and failed)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def load_config(config: Path | None) -> LoadedConfig:
    """The config (the example plant when None); a bad one exits 2 naming the field."""
    try:
        return load(config)
    except ConfigError as exc:
        raise fail(f"config: {exc}") from None


def broker_target(loaded: LoadedConfig, url: str | None) -> tuple[str, BrokerSettings]:
    """The broker URL to use (``--broker``, else the config's) and the config's broker
    settings (TLS, credentials); a malformed ``--broker`` exits 2."""
    if url is None:
        return loaded.config.broker.url, loaded.config.broker
    try:
        parse_broker_url(url, "--broker")
    except ConfigError as exc:
        raise fail(str(exc)) from None
    return url, loaded.config.broker


def watch_target(
    topic_filter: str, config: Path | None, broker: str | None
) -> tuple[str, BrokerSettings]:
    """Validate a filter, then the config and broker URL of a command that watches."""
    try:
        validate_filter(topic_filter)
    except TopicError as exc:
        raise fail(str(exc)) from None
    return broker_target(load_config(config), broker)


def device_path(text: str) -> DevicePath:
    """A device path given on the command line; a malformed one exits 2."""
    try:
        return DevicePath.parse(text)
    except TopicError as exc:
        raise fail(str(exc)) from None


def struct_options(
    kind: type[msgspec.Struct], param: str, fields: Sequence[str] | None = None
) -> Callable[[F], F]:
    """Give a command one option per field of ``kind`` (or of ``fields``), in its place
    of parameter ``param``, and hand the command the struct built from them.

    The option's name, default, bounds and help come from the struct field (its
    ``msgspec.Meta`` ``description``, ``ge`` and ``le``; the struct's other constraints
    are checked when it is built, exit 2), so a library function that takes its
    defaults from the same struct and the command line state them once.
    """

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        chosen = [f for f in msgspec.structs.fields(kind) if fields is None or f.name in fields]
        options = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=f.default,
                annotation=Annotated[_base(f.type), typer.Option(**_option(f.type))],
            )
            for f in chosen
        ]
        params = []
        for p in signature.parameters.values():
            if p.name == param:
                params.extend(options)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in chosen}
            try:
                kwargs[param] = msgspec.convert(values, kind)
            except msgspec.ValidationError as exc:  # "Expected ... - at `$.field`"
                message, _, where = str(exc).rpartition(" - at `$.")
                raise fail(f"--{where.rstrip('`').replace('_', '-')}: {message}") from None
            return command(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _base(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _option(annotation: Any) -> dict[str, Any]:
    """typer.Option arguments from the ``msgspec.Meta`` of a field's annotation."""
    out: dict[str, Any] = {}
    metas = get_args(annotation)[1:] if get_origin(annotation) is Annotated else ()
    for meta in metas:
        if isinstance(meta, msgspec.Meta):
            if meta.description:
                out["help"] = meta.description
            if meta.ge is not None:
                out["min"] = meta.ge
            if meta.le is not None:
                out["max"] = meta.le
    return out


# ---- running -----------------------------------------------------------------------------


class Stop(asyncio.Event):
    """Set by SIGINT/SIGTERM; ``signal`` says which (None while running, or when the work
    ended by itself)."""

    signal: signal.Signals | None = None

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + int(self.signal) if self.signal is not None else 0


def run(main: Callable[[Stop], Any], *, grace_s: float | None = None) -> Any:
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
        raise fail(f"config: {exc}") from None
    except BaseExceptionGroup as group:  # a service's task group: a config error found late
        found: BaseException | None = group.subgroup(ConfigError)
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        if found is None:
            raise
        raise fail(f"config: {found}") from None


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


# ---- talking to the broker ------------------------------------------------------------------


RETRY_MIN_S: Final = 0.5
RETRY_MAX_S: Final = 5.0
GRACE_S: Final = 1.5
"""How long a command that talks to the broker may take to end after SIGINT/SIGTERM."""


async def on_broker(
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


def run_client(main: Callable[[Stop], Awaitable[T]]) -> T:
    """`run` for a command that talks to the broker: it ends within `GRACE_S` of SIGINT or
    SIGTERM, with exit code 130 or 143 when the signal stopped it before it was done."""
    stops: list[Stop] = []

    async def runner(stop: Stop) -> T:
        stops.append(stop)
        return await main(stop)

    result: T = run(runner, grace_s=GRACE_S)
    if stops and stops[0].signal is not None:
        raise typer.Exit(stops[0].exit_code)
    return result
