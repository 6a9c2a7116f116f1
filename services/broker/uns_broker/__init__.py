"""``uns broker``: the embedded MQTT broker (amqtt), the default of a one-command run.

What amqtt 0.12 gives, and what it does not (use Mosquitto for the latter):

* MQTT 3.1.1 over TCP, QoS 0/1/2, retained messages, Last Will;
* anonymous access (dev mode, the default) or users from a password file
  (argon2 hashes, ``uns broker passwd``), with per-user publish and subscribe
  ACLs in ``services.broker.acl``;
* no MQTT 5, no shared subscriptions, no persistence of retained messages
  across a restart (services re-publish their births on reconnect, so the
  namespace heals by itself), no TLS listener configured here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uns.plugins import lazy_exports

if TYPE_CHECKING:
    from uns_broker.server import serve
    from uns_broker.settings import AclEntry, BrokerServerSettings
    from uns_broker.users import set_password

__all__ = [
    "AclEntry",
    "BrokerServerSettings",
    "serve",
    "set_password",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "AclEntry": "settings",
        "BrokerServerSettings": "settings",
        "serve": "server",
        "set_password": "users",
    },
)
