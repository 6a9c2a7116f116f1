from __future__ import annotations

import asyncio
import logging
import os
import warnings

from amqtt.errors import BrokerError, PluginError
from amqtt.plugins.authentication import PasswordFileError

from uns import ConfigError
from uns.watchdog import HEARTBEAT_ENV, LoopWatchdog
from uns_broker.amqtt_fixes import PatchedBroker
from uns_broker.logic import amqtt_config
from uns_broker.settings import BrokerServerSettings

log = logging.getLogger(__name__)


async def serve(
    settings: BrokerServerSettings, stop: asyncio.Event, started: asyncio.Event | None = None
) -> None:
    """Run the embedded broker until ``stop`` is set."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # amqtt's own 'acl' naming
        try:
            broker = PatchedBroker(amqtt_config(settings))
        except (PasswordFileError, PluginError) as exc:
            raise ConfigError(f"services.broker.password_file: {exc}") from None
        try:
            await broker.start()
        except (BrokerError, OSError) as exc:
            cause = exc.__cause__ or exc
            where = f"{settings.host}:{settings.port}"
            if settings.tls_port is not None:
                where += f" (TLS: {settings.tls_host}:{settings.tls_port})"
            raise ConfigError(f"services.broker: cannot listen on {where}: {cause}") from None
    log.info(
        "broker listening on mqtt://%s:%d (%s)",
        settings.host,
        settings.port,
        "users required" if settings.password_file else "anonymous allowed",
    )
    if settings.tls_port is not None:
        log.info("broker listening on mqtts://%s:%d (TLS)", settings.tls_host, settings.tls_port)
    if started is not None:
        started.set()
    # the broker's loop is watched like a service's: stuck, it exits and is restarted
    watchdog = LoopWatchdog(
        "broker", settings.loop_watchdog_s, heartbeat_file=os.environ.get(HEARTBEAT_ENV)
    )
    beat = asyncio.create_task(watchdog.run(), name="broker-heartbeat")
    try:
        await stop.wait()
    finally:
        beat.cancel()
        await broker.shutdown()
        log.info("broker stopped")
