"""The broker policy of a site, made from the services' own declared scopes.

One user per service (its node id), with exactly the topics its settings declare plus its
node's own (`uns.scope`); an ``operator`` who may send commands (``cmd`` topics, to
devices and to nodes) and read the site; an ``app`` that reads the site and may publish
nothing. No one else, and no anonymous access: what a broker does with this policy is
up to ``uns broker secure`` (Mosquitto's ``password_file``/``acl_file``, the embedded
broker's settings).
"""

from __future__ import annotations

from typing import Final

from uns.config import LoadedConfig
from uns.plugins import services
from uns.scope import REPLY_FILTER, Scope, node_scope
from uns.shard import peers_scope, replica_ids

OPERATOR: Final = "operator"
APP: Final = "app"


NAMESPACE_SHAPES: Final = ("+/+/+/+/+/+/+/+", "+/+/_node/+/+")
"""Every device and node topic, by its shape: a reader that subscribes by level
(``+/+/+/+/+/+/+/birth``, as ``uns top`` does) is let in by amqtt too, which grants a
subscription only inside an ACL filter (the box's broker carries one site anyway)."""


def operator_scope(enterprise: str, site: str) -> Scope:
    """Sends commands to any device or node of the site; reads the namespace and replies."""
    base = f"{enterprise}/{site}"
    return Scope(
        publish=(f"{base}/+/+/+/+/cmd/+", f"{base}/_node/+/cmd"),
        subscribe=(f"{base}/#", *NAMESPACE_SHAPES, REPLY_FILTER),
    )


def app_scope(enterprise: str, site: str) -> Scope:
    """Reads the namespace (dashboards, ``uns top``, a historian); publishes nothing."""
    return Scope(subscribe=(f"{enterprise}/{site}/#", *NAMESPACE_SHAPES))


def site_policy(loaded: LoadedConfig, undeclared: list[str] | None = None) -> dict[str, Scope]:
    """User -> scope for every installed service that is a bus client, the operator and the
    app. A service that declares no scope gets its node's own topics only (its name is
    added to ``undeclared``, to be told)."""
    ns = loaded.config.namespace
    policy: dict[str, Scope] = {}
    peers: dict[str, Scope] = {}  # users the enabled services' peers need (ServiceSettings.peers)
    for name, plugin in sorted(services().items()):
        settings_cls = plugin.load_settings()
        if not settings_cls.bus_client:
            continue
        settings = loaded.service(name, settings_cls)
        declared = settings.scope(loaded.config)
        n = settings.replicas
        # replicas (uns.shard): one user each, reading the others' births and deaths
        for node_id in (
            replica_ids(settings.node_id or name, n) if n > 1 else [settings.node_id or name]
        ):
            own = node_scope(ns.enterprise, ns.site, node_id)
            if n > 1:
                own = own | peers_scope(ns.enterprise, ns.site, node_id, n)
            policy[node_id] = own if declared is None else own | declared
        if declared is None and undeclared is not None:
            undeclared.append(name)
        if settings.enabled:
            for user, scope in settings.peers(loaded.config).items():
                if user in policy and policy[user] != scope:
                    raise ValueError(f"{name} asks for user {user!r}, which the policy has")
                peers[user] = scope
    for user in (OPERATOR, APP, *peers):
        if user in policy:
            raise ValueError(f"a service's node id is {user!r}, a name the policy keeps")
    policy[OPERATOR] = operator_scope(ns.enterprise, ns.site)
    policy[APP] = app_scope(ns.enterprise, ns.site)
    return policy | peers
