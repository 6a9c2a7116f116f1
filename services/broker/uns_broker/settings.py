from typing import Annotated, ClassVar

import msgspec

from uns import ServiceSettings
from uns.config import Port, Strict


class AclEntry(Strict, frozen=True):
    """Topic filters one user may publish to and subscribe to (``+``/``#`` allowed)."""

    publish: list[str] = []
    subscribe: list[str] = []


class BrokerServerSettings(ServiceSettings, frozen=True):
    bus_client: ClassVar[bool] = False

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 to accept other machines."""
    port: Port = 1883
    password_file: str | None = None
    """``user:argon2-hash`` lines (``uns broker passwd``); users must log in when set."""
    allow_anonymous: bool | None = None
    """Default: true without a password file, false with one."""
    acl: dict[str, AclEntry] | None = None
    """Per-user ACLs; ``anonymous`` names clients without a username. No ACL: all allowed."""
    max_connections: Annotated[int, msgspec.Meta(ge=0)] = 0
    """0 = unlimited."""
    tls_port: Port | None = None
    """A TLS listener (``mqtts://``) on this port too, for clients from outside the box;
    ``certfile``/``keyfile`` from `uns broker secure` (``DIR/tls/server.*``)."""
    tls_host: str = "0.0.0.0"
    certfile: str | None = None
    keyfile: str | None = None

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        if self.tls_port is not None and self.certfile is None:
            raise ValueError("tls_port needs certfile and keyfile (uns broker secure writes them)")
