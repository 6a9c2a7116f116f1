"""``uns opcua browse URL``: walk a server's address space, print a starter config section."""

from __future__ import annotations

from uns.errors import UnsError
from uns_opcua_adapter.logic import starter_config
from uns_opcua_adapter.settings import OpcUaAdapterSettings, Security, credentials
from uns_opcua_adapter.ua import UaSession, UaUnavailable, browse_objects


class BrowseError(UnsError):
    """The server could not be browsed; the message says why (for the command line)."""


async def browse(
    url: str,
    *,
    root: str = "/Objects",
    max_depth: int = 6,
    security: Security | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout_s: float = 5.0,
    enterprise: str = "acme",
    site: str = "pune",
) -> str:
    """The YAML of a ``services.opcua-adapter`` section for the server at ``url``.

    One device per object under ``root`` (a browse path from the Root folder, or a
    NodeId) that has variables, down to ``max_depth`` levels; the Server object is
    skipped. Tags carry NodeIds, datatypes from the variables' types, units from
    ``EngineeringUnits`` and ``low``/``high`` from ``EURange`` where the server has them.
    Raises `BrowseError` (server unreachable, refused, root not found) or `ConfigError`
    (a certificate file that cannot be read).
    """
    settings = OpcUaAdapterSettings(
        url=url,
        security=security or Security(),
        username=username,
        password=password,
        timeout_s=timeout_s,
    )
    session = UaSession(url, credentials(settings, prefix=""), timeout_s=timeout_s)
    try:
        await session.connect()
        objects = await browse_objects(session, root, max_depth)
    except UaUnavailable as exc:
        raise BrowseError(f"{url}: {exc} (browsing from {root})") from None
    finally:
        await session.close()
    return starter_config(url, objects, enterprise=enterprise, site=site)
