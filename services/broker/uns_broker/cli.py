"""``uns broker``: run the embedded broker, and keep its password file.

`uns up` starts it as ``uns broker --host H --port N``; ``uns run broker`` is the same
(a container's command line), through this group.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from uns.commands import ConfigOpt, LogOpt, fail, load_config, run, setup_logging
from uns.errors import ConfigError
from uns_broker.settings import BrokerServerSettings

app = typer.Typer(help="The embedded MQTT broker (amqtt).", invoke_without_command=True)


@app.callback()
def broker(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Listen address [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [default: 1883]")] = None,
    tls_port: Annotated[
        int | None,
        typer.Option(help="A TLS listener too (services.broker.certfile/keyfile), e.g. 8883"),
    ] = None,
    config: ConfigOpt = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Run the embedded broker: anonymous by default, users and ACLs when configured."""
    if ctx.invoked_subcommand is not None:
        return
    from uns_broker.server import serve  # amqtt: only to run it

    setup_logging(log_level)
    loaded = load_config(config)
    settings = loaded.service("broker", BrokerServerSettings)
    changes: dict[str, Any] = {}
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    if tls_port is not None:
        changes["tls_port"] = tls_port
    try:
        settings = msgspec.structs.replace(settings, **changes)
        settings.__post_init__()  # replace() does not run the checks
    except ValueError as exc:
        raise fail(f"services.broker: {exc}") from None
    run(lambda stop: serve(settings, stop))


@app.command("passwd")
def passwd(
    file: Annotated[Path, typer.Argument(help="Password file to create or update")],
    username: Annotated[str, typer.Argument()],
) -> None:
    """Add or change a user in a password file (argon2 hash); the password is read from stdin."""
    from uns_broker.users import set_password

    try:
        set_password(file, username, sys.stdin.readline().rstrip("\n"))
    except ConfigError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{username} written to {file}")


def _owner(option: str, text: str) -> tuple[int, int]:
    """``UID[:GID]`` or a user name (its own group) as (uid, gid)."""
    import pwd

    user, _, group = text.partition(":")
    try:
        if user.isdigit():
            uid = int(user)
            gid = int(group) if group else uid
        else:
            entry = pwd.getpwnam(user)
            uid, gid = entry.pw_uid, int(group) if group else entry.pw_gid
    except (KeyError, ValueError):
        raise fail(f"{option}: {text!r} is not UID[:GID] or a user of this machine") from None
    return uid, gid


@app.command("secure")
def secure(
    out: Annotated[
        Path, typer.Option("--out", help="Directory to write the secrets and broker files to")
    ] = Path("var/secrets"),
    rotate: Annotated[
        bool, typer.Option(help="New passwords and a new CA, not the ones in DIR")
    ] = False,
    tls_host: Annotated[
        list[str] | None,
        typer.Option(
            "--tls-host",
            help="A name or address clients reach the broker by (repeat it); the server"
            " certificate is valid for these [default: localhost, 127.0.0.1, this host name]",
        ),
    ] = None,
    compose: Annotated[
        bool,
        typer.Option(
            help="Give each container's files to the user it runs as in docker-compose.yml:"
            " Mosquitto's to uid 1883, each service's password to uid 10001 (needs root)",
        ),
    ] = False,
    broker_user: Annotated[
        str | None,
        typer.Option(
            help="UID[:GID] or user name the broker reads its files as (instead of --compose's)"
        ),
    ] = None,
    service_user: Annotated[
        str | None,
        typer.Option(
            help="UID[:GID] or user name the services read their passwords as"
            " (instead of --compose's)"
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Least-privilege broker policy for the config: one random credential per service, an
    operator (may send commands) and a read-only app; Mosquitto's password_file and
    acl_file, and the embedded broker's users and ACL. Passwords are never printed."""
    from uns_broker.secure import COMPOSE_OWNERS, Owners, write_policy

    loaded = load_config(config)
    owners = None
    if compose or broker_user or service_user:
        owners = Owners(
            _owner("--broker-user", broker_user) if broker_user else COMPOSE_OWNERS.broker,
            _owner("--service-user", service_user) if service_user else COMPOSE_OWNERS.services,
        )
    try:
        written = write_policy(loaded, out, rotate=rotate, hosts=tls_host, owners=owners)
    except (ConfigError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(
        f"{len(written.secrets)} users ({', '.join(written.policy)}); passwords in {out}/secrets/"
    )
    typer.echo(
        f"Mosquitto: password_file {written.mosquitto_passwords}, acl_file {written.mosquitto_acl}"
    )
    typer.echo(f"embedded broker: services.broker as in {written.amqtt_settings}")
    typer.echo(f"health check login: XDG_CONFIG_HOME={written.healthcheck.parent} mosquitto_sub")
    if owners is not None:
        typer.echo(
            f"owners: the broker's files uid {owners.broker[0]}, the services' passwords"
            f" uid {owners.services[0]}"
        )
    tls = written.tls
    typer.echo(
        f"TLS: CA {tls.ca_cert} (give it to clients), server certificate {tls.server_cert}"
        f" for {', '.join(tls.hosts)}; Mosquitto listener {tls.mosquitto_conf}"
    )
    for name in written.undeclared:
        typer.echo(
            f"warning: {name} declares no topics (ServiceSettings.scope): its user may use"
            " its node's birth, death and command only",
            err=True,
        )
