"""Settings of ``services.opcua-adapter``: the server, its security, and the tag map.

Everything that can be checked without the server is checked here, when the
config is loaded, and every error names the entry (``devices[2]``, ``tags[0]``,
``templates.press``): unknown templates, duplicate metric names, NodeIds that
do not parse, waveforms without a sample rate, deadbands on non-numeric tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import msgspec

from uns import ServiceSettings
from uns.config import DevicePathText, PositiveFloat, Strict, UnsConfig
from uns.errors import ConfigError
from uns.payloads import DataType
from uns.scope import Scope, devices_scope
from uns_opcua_adapter import logic, nodetext

if TYPE_CHECKING:
    from uns_opcua_adapter.ua import Credentials

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Security(Strict, frozen=True):
    """How the secure channel is protected; ``none`` needs no certificate."""

    mode: Literal["none", "sign", "sign_encrypt"] = "none"
    policy: Literal["Basic256Sha256"] = "Basic256Sha256"
    certificate: str | None = None
    """The client's application instance certificate (PEM or DER file)."""
    private_key: str | None = None
    """Its private key (PEM or DER file, unencrypted)."""
    server_certificate: str | None = None
    """The server's certificate to pin (PEM or DER); when absent, the one it presents is used."""

    def __post_init__(self) -> None:
        if self.mode != "none":
            missing = [f for f in ("certificate", "private_key") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"{' and '.join(missing)} required when mode is {self.mode!r}"
                    " (the client certificate and key files)"
                )


class Tag(Strict, frozen=True):
    """One OPC UA variable published as one metric."""

    name: NonEmpty
    """Metric name in the namespace."""
    node: NonEmpty
    """A NodeId (``ns=2;s=Press01.BearingTemp``, ``{prefix}.BearingTemp``) or a browse path
    from the Root folder (``/Objects/2:Plant/2:Press01/2:BearingTemp``)."""
    datatype: DataType = "double"
    unit: str = ""
    low: float | None = None
    high: float | None = None
    description: str = ""
    deadband: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Absolute deadband the server applies (a DataChangeFilter); 0 reports every change."""
    sampling_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    """Server-side sampling interval; the publishing interval when absent."""
    rate_hz: PositiveFloat | None = None
    """Sample rate of a ``waveform`` tag (an array node whose every value is one block)."""


class UaDevice(Strict, frozen=True):
    """One machine: its ISA-95 path and its tags (a template's, its own, or both)."""

    path: DevicePathText
    template: str | None = None
    prefix: str = ""
    """Replaces ``{prefix}`` in every tag's node, e.g. ``ns=3;s="DB_Press01"``."""
    tags: list[Tag] = []


class OpcUaAdapterSettings(ServiceSettings, frozen=True):
    default_metrics_port: ClassVar[int] = 9401

    url: str = "opc.tcp://127.0.0.1:4840"
    security: Security = Security()
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    """File holding the password (a mounted secret), instead of ``password``."""
    publishing_interval_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 100
    """How often the server sends what changed; one data message per device per cycle."""
    timeout_s: PositiveFloat = 5.0
    """Timeout of every request to the server, the keep-alive reads too."""
    watchdog_s: PositiveFloat = 1.0
    """Pause between two keep-alive reads of the server's state."""
    keepalive_failures: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    """Keep-alive reads in a row left unanswered (``timeout_s`` each, no Publish response
    meanwhile) before the session counts as lost: a slow server is not a dead one. A
    silent link is noticed within about ``keepalive_failures * (watchdog_s + timeout_s)``."""
    login_retry_min_s: PositiveFloat = 60.0
    """Wait after a refused login (user token), doubling on each refusal in a row ..."""
    login_retry_max_s: PositiveFloat = 1800.0
    """... up to this: many PLCs lock an account after a few failed logins."""
    certificate_retry_s: PositiveFloat = 60.0
    """Wait after the server rejected our certificate (or presented another than the pinned
    one): someone has to trust it on the PLC first; retrying faster only fills logs."""
    templates: dict[str, list[Tag]] = {}
    """Tag lists shared by devices of one kind; nodes may use ``{prefix}``."""
    devices: list[UaDevice] = []

    def __post_init__(self) -> None:
        if not self.url.startswith("opc.tcp://"):
            raise ValueError(f"url: {self.url!r} is not an OPC UA URL (opc.tcp://host:port[/path])")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file: give one of them")
        if self.login_retry_max_s < self.login_retry_min_s:
            raise ValueError(
                f"login_retry_max_s ({self.login_retry_max_s:g}) is below"
                f" login_retry_min_s ({self.login_retry_min_s:g})"
            )
        self.plan()  # every tag-map error, naming the entry

    def plan(self) -> list[logic.DevicePlan]:
        """The devices with their templates expanded and ``{prefix}`` substituted."""
        return logic.expand_devices(
            self.devices, self.templates, self.publishing_interval_ms, _node_problem
        )

    def scope(self, config: UnsConfig) -> Scope:
        """Publishes the raw stream of each device of its tag map, nothing else."""
        return Scope(publish=devices_scope([d.path for d in self.devices], "raw"))


def _node_problem(text: str) -> str | None:
    try:
        nodetext.check_node(text, _is_reference_type)
    except ValueError as exc:
        return str(exc)
    return None


def _is_reference_type(name: str) -> bool:
    # asyncua's table of names, for the rare browse path that names a reference type
    # (<HasComponent>): the one part of a config check that imports asyncua
    from uns_opcua_adapter.ua import is_reference_type

    return is_reference_type(name)


@dataclass(frozen=True, slots=True)
class Secrets:
    """What the adapter reads from files before it connects."""

    certificate: bytes | None = None
    private_key: bytes | None = None
    server_certificate: bytes | None = None
    application_uri: str | None = None
    """The URI in the client certificate, which the session must announce."""
    username: str | None = None
    password: str | None = None


def read_secrets(s: OpcUaAdapterSettings, prefix: str = "services.opcua-adapter") -> Secrets:
    """Read the certificate, key and password files; raise `ConfigError` naming the field."""

    def read(field: str, path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            where = f"{prefix}.{field}" if prefix else field
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None

    password = s.password
    if s.password_file is not None:
        raw = read("password_file", s.password_file)
        assert raw is not None
        password = raw.decode("utf-8").strip()
    sec = s.security
    if sec.mode == "none":
        return Secrets(username=s.username, password=password)
    certificate = read("security.certificate", sec.certificate)
    private_key = read("security.private_key", sec.private_key)
    server_certificate = read("security.server_certificate", sec.server_certificate)
    assert certificate is not None and private_key is not None
    from uns_opcua_adapter.ua import read_certificate  # on connecting, not on a config check

    try:
        uri = read_certificate(certificate, private_key, server_certificate)
    except ValueError as exc:
        raise ConfigError(f"{prefix}.security: {exc}" if prefix else f"security: {exc}") from None
    return Secrets(
        certificate=certificate,
        private_key=private_key,
        server_certificate=server_certificate,
        application_uri=uri,
        username=s.username,
        password=password,
    )


def credentials(s: OpcUaAdapterSettings, prefix: str = "services.opcua-adapter") -> Credentials:
    """What a session needs to log in, the files read (`ConfigError` naming a bad one)."""
    from uns_opcua_adapter.ua import Credentials

    secrets = read_secrets(s, prefix)
    return Credentials(
        mode=s.security.mode,
        certificate_path=s.security.certificate or "",
        server_certificate_path=s.security.server_certificate or "",
        certificate=secrets.certificate,
        private_key=secrets.private_key,
        server_certificate=secrets.server_certificate,
        application_uri=secrets.application_uri,
        username=secrets.username,
        password=secrets.password,
    )
