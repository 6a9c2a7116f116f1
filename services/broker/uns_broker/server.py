from __future__ import annotations

import asyncio
import logging
import warnings

from amqtt.broker import Broker
from amqtt.errors import BrokerError, PluginError
from amqtt.plugins.authentication import PasswordFileError

from uns import ConfigError
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
            broker = Broker(amqtt_config(settings))
        except (PasswordFileError, PluginError) as exc:
            raise ConfigError(f"services.broker.password_file: {exc}") from None
        try:
            await broker.start()
        except (BrokerError, OSError) as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(
                f"services.broker: cannot listen on {settings.host}:{settings.port}: {cause}"
            ) from None
    log.info(
        "broker listening on mqtt://%s:%d (%s)",
        settings.host,
        settings.port,
        "users required" if settings.password_file else "anonymous allowed",
    )
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()
        log.info("broker stopped")
