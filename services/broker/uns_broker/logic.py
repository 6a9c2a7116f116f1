"""Settings -> amqtt broker configuration: pure, so it is tested without a network."""

from __future__ import annotations

from typing import Any

from uns_broker.settings import BrokerServerSettings


def amqtt_config(settings: BrokerServerSettings) -> dict[str, Any]:
    anonymous = settings.allow_anonymous
    if anonymous is None:
        anonymous = settings.password_file is None
    plugins: dict[str, Any] = {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": anonymous},
    }
    if settings.password_file:
        plugins["amqtt.plugins.authentication.FileAuthPlugin"] = {
            "password_file": settings.password_file
        }
    if settings.acl is not None:
        plugins["uns_broker.amqtt_fixes.TopicAcl"] = {
            "publish_acl": {user: list(e.publish) for user, e in settings.acl.items()},
            "acl": {user: list(e.subscribe) for user, e in settings.acl.items()},
        }
    listeners: dict[str, Any] = {
        "default": {
            "type": "tcp",
            "bind": f"{settings.host}:{settings.port}",
            "max_connections": settings.max_connections,
        }
    }
    if settings.tls_port is not None:
        listeners["tls"] = {
            "type": "tcp",
            "bind": f"{settings.tls_host}:{settings.tls_port}",
            "max_connections": settings.max_connections,
            "ssl": True,
            "certfile": settings.certfile,
            "keyfile": settings.keyfile,
        }
    return {"listeners": listeners, "plugins": plugins}
