"""Configuration: one YAML file for the edge box, overridden by ``UNS_*`` variables.

The file has a section per concern (``namespace``, ``broker``, ``plant``) and a
section per service under ``services.<name>``, each decoded into that service's
own frozen settings struct, which rejects unknown fields. Every error names the
field (``services.demo.interval_s``) and where it came from (file or variable).

Environment overrides: ``UNS_<SECTION>__<FIELD>`` with ``__`` between levels,
e.g. ``UNS_BROKER__URL=mqtt://10.0.0.5:1883`` or
``UNS_SERVICES__DEMO__INTERVAL_S=0.5`` (a service name's ``-`` is written
``_`` there: ``UNS_SERVICES__OPCUA_ADAPTER__...``). Values are read as YAML scalars.
Variables without ``__`` (``UNS_CONFIG``, ``UNS_BROKER_URL``, ``UNS_DATASETS``)
belong to the command line, not to this overlay.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import msgspec

from uns.errors import ConfigError

ENV_PREFIX: Final = "UNS_"
DEFAULT_BROKER_URL: Final = "mqtt://127.0.0.1:1883"
REPO_ROOT: Final = Path(__file__).resolve().parents[3]
EXAMPLE_CONFIG: Final = REPO_ROOT / "uns-schema" / "plant.yaml"

Slug = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
_SLUG6 = r"[a-z0-9][a-z0-9_-]{0,63}"
DevicePathText = Annotated[str, msgspec.Meta(pattern=rf"^{_SLUG6}(/{_SLUG6}){{5}}$")]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]

T = TypeVar("T")


class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every settings struct: frozen, keyword-only, unknown fields rejected."""


class BrokerUrl(msgspec.Struct, frozen=True):
    """A parsed ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://`` / ``memory://name`` URL."""

    scheme: Literal["mqtt", "mqtts", "memory"]
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        if self.scheme == "memory":
            return f"memory://{self.host}"
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_broker_url(url: str, field: str = "broker.url") -> BrokerUrl:
    """Parse a broker URL; raise `ConfigError` naming ``field`` if it is not one."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in ("mqtt", "mqtts", "memory"):
        raise ConfigError(
            f"{field}: {url!r} is not a broker URL; use mqtt://host:port, mqtts://host:port"
            " (or memory://name in tests)"
        )
    if not parts.hostname:
        raise ConfigError(f"{field}: {url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{field}: {url!r} has an invalid port") from None
    if port is None:
        port = 8883 if scheme == "mqtts" else 1883
    return BrokerUrl(
        scheme=scheme,  # type: ignore[arg-type]
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


class BrokerSettings(Strict, frozen=True):
    """How every service and CLI command reaches the local broker."""

    url: str = DEFAULT_BROKER_URL
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    """File holding the password (a mounted secret), instead of ``password``."""
    ca_file: str | None = None
    """CA bundle for ``mqtts://``; the system store when absent."""
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30

    def __post_init__(self) -> None:
        parse_broker_url(self.url)
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")

    def credentials(self) -> tuple[str | None, str | None]:
        """Username and password, from the URL, the fields or the password file."""
        url = parse_broker_url(self.url)
        username = self.username or url.username
        password = self.password or url.password
        if self.password_file:
            try:
                password = Path(self.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"broker.password_file: cannot read it: {exc}") from None
        return username, password


class Namespace(Strict, frozen=True):
    """The top two ISA-95 levels this edge box publishes under."""

    enterprise: Slug = "acme"
    site: Slug = "pune"


class Device(Strict, frozen=True):
    """One machine of the plant."""

    path: DevicePathText
    asset: Slug
    """Asset type (press, robot, conveyor, ...): selects simulator physics and models."""
    description: str = ""


class Plant(Strict, frozen=True):
    devices: list[Device] = []


class UnsConfig(Strict, frozen=True):
    """The whole file."""

    namespace: Namespace = Namespace()
    broker: BrokerSettings = BrokerSettings()
    plant: Plant = Plant()
    services: dict[str, dict[str, Any]] = {}
    """One section per service, decoded by that service's own settings struct."""


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def describe(exc: msgspec.ValidationError | msgspec.DecodeError, prefix: str = "") -> str:
    """Turn msgspec's ``Expected int - at `$.a.b``` into ``a.b: Expected int``."""
    m = _AT.match(str(exc))
    assert m is not None
    path = (m.group("path") or "").lstrip(".")
    field = ".".join(p for p in (prefix, path) if p)
    return f"{field}: {m.group('msg')}" if field else m.group("msg")


def _env_overlay(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Apply ``UNS_A__B=v`` variables to ``data`` in place; return field -> variable."""
    origin: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"{name}: empty level in the variable name")
        if path[0] == "services" and len(path) > 1:  # UNS_SERVICES__OPCUA_ADAPTER__X
            path[1] = path[1].replace("_", "-")
        try:
            value = msgspec.yaml.decode(environ[name]) if environ[name] else ""
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{name}: cannot read the value: {exc}") from None
        node = data
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
        origin[".".join(path)] = name
    return origin


def _source(field: str, origin: Mapping[str, str], path: Path | None) -> str:
    for key, var in origin.items():
        if field == key or field.startswith(key + ".") or field.startswith(key + "["):
            return f"environment variable {var}"
    return str(path) if path else "defaults"


class LoadedConfig(msgspec.Struct, frozen=True):
    """A validated config plus what is needed to validate service sections later."""

    config: UnsConfig
    path: Path | None
    origin: dict[str, str]

    def service(self, name: str, kind: type[T]) -> T:
        """Decode ``services.<name>`` into the service's settings (exit-2 material on error)."""
        section = self.config.services.get(name) or {}
        try:
            return msgspec.convert(section, kind, strict=False)
        except msgspec.ValidationError as exc:
            message = describe(exc, f"services.{name}")
            field = message.split(":", 1)[0]
            raise ConfigError(
                f"{message} (from {_source(field, self.origin, self.path)})"
            ) from None


def resolve_path(path: str | os.PathLike[str] | None) -> Path | None:
    """The config file to read: the argument, ``UNS_CONFIG``, or the example plant."""
    if path:
        return Path(path)
    if os.environ.get("UNS_CONFIG"):
        return Path(os.environ["UNS_CONFIG"])
    return EXAMPLE_CONFIG if EXAMPLE_CONFIG.exists() else None


def load(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Read, overlay and validate the configuration; raise `ConfigError` naming the field."""
    env = os.environ if environ is None else environ
    file = resolve_path(path)
    data: dict[str, Any] = {}
    if file is not None:
        try:
            text = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config file {file}: {exc.strerror or exc}") from None
        try:
            loaded = msgspec.yaml.decode(text) if text.strip() else {}
        except msgspec.DecodeError as exc:
            raise ConfigError(f"config file {file}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file}: expected a mapping at the top level")
        data = loaded
    origin = _env_overlay(data, env)
    try:
        config = msgspec.convert(data, UnsConfig, strict=False)
    except msgspec.ValidationError as exc:
        message = describe(exc)
        field = message.split(":", 1)[0]
        raise ConfigError(f"{message} (from {_source(field, origin, file)})") from None
    except ConfigError as exc:  # raised by a __post_init__ with its own field name
        raise ConfigError(f"{exc} (from {_source('broker.url', origin, file)})") from None
    return LoadedConfig(config=config, path=file, origin=origin)
