"""``uns opcua ...``: a starter tag map from a live server, and the client certificate."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from uns.commands import ConfigOpt, fail, load_config
from uns.errors import UnsError
from uns_opcua_adapter.settings import Security

app = typer.Typer(help="OPC UA helpers.", no_args_is_help=True)


@app.command("browse")
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
    from uns_opcua_adapter.browsing import browse  # asyncua: only for this command

    ns = load_config(config).config.namespace
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
        raise fail(f"--security-mode/--certificate/--private-key: {exc}") from None
    except OSError as exc:
        raise fail(f"--password-file: {exc}") from None
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
        raise fail(str(exc), code=1) from None
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}", err=True)


@app.command("cert")
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
    from uns_opcua_adapter.certificate import create_certificate
    from uns_opcua_adapter.certificate import describe as describe_certificate

    try:
        made = create_certificate(
            out, key, application_uri=uri, hostnames=host, days=days, overwrite=force
        )
    except UnsError as exc:
        raise fail(str(exc)) from None
    typer.echo(describe_certificate(made))
