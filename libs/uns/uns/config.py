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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlsplit

import msgspec
import msgspec.inspect as mi

from uns.errors import ConfigError

ENV_PREFIX: Final = "UNS_"
DEFAULT_BROKER_URL: Final = "mqtt://127.0.0.1:1883"
REPO_ROOT: Final = Path(__file__).resolve().parents[3]
EXAMPLE_CONFIG: Final = REPO_ROOT / "uns-schema" / "plant.yaml"

# The end of the text: Python's `$` also matches before a final "\n" (so "acme\n" passed and
# services then crash-looped on TopicError); `\Z` is not ECMA-262, the dialect of the JSON
# Schema generated from these types. `(?!\n)$` means the same in both.
_END = r"(?!\n)$"
_SLUG = r"[a-z0-9][a-z0-9_-]{0,63}"
SLUG_PATTERN: Final = rf"^{_SLUG}{_END}"
DEVICE_PATH_PATTERN: Final = rf"^{_SLUG}(/{_SLUG}){{5}}{_END}"
Slug = Annotated[str, msgspec.Meta(pattern=SLUG_PATTERN)]
DevicePathText = Annotated[str, msgspec.Meta(pattern=DEVICE_PATH_PATTERN)]
"""A device path (six slugs); in a service's settings it must lie in ``namespace``."""
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


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (``mqtt://user:***@host``), for messages.

    Split as `urllib.parse.urlsplit` does (the user part ends at the last ``@`` of the
    network location), without its validation, so that a URL too broken to parse is
    redacted too.
    """
    scheme, sep, rest = url.partition("//")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}//{userinfo.partition(':')[0]}:***@{host}{tail}"


def parse_broker_url(url: str, field: str = "broker.url") -> BrokerUrl:
    """Parse a broker URL; raise `ConfigError` naming ``field`` if it is not one.

    The URL may hold a password: messages show it redacted (`redact_url`).
    """
    shown = repr(redact_url(url))
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise ConfigError(f"{field}: {shown} is not a URL: {exc}") from None
    scheme = parts.scheme
    if scheme not in ("mqtt", "mqtts", "memory"):
        raise ConfigError(
            f"{field}: {shown} is not a broker URL; use mqtt://host:port, mqtts://host:port"
            " (or memory://name in tests)"
        )
    if not parts.hostname:
        raise ConfigError(f"{field}: {shown} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{field}: {shown} has an invalid port") from None
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
    urls: list[str] = []
    """More brokers, tried in turn after ``url`` (or ``--broker``) when the one in use is
    unreachable or drops: the other nodes of a clustered broker. A node stays on the one
    it reached; credentials and TLS settings are shared."""
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
        for i, url in enumerate(self.urls):
            parse_broker_url(url, f"broker.urls[{i}]")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")

    def candidates(self, first: str | None = None) -> list[str]:
        """The brokers to try, in turn: ``first`` (``--broker``; else ``url``), then
        ``urls`` without it."""
        first = first or self.url
        return [first, *(u for u in dict.fromkeys(self.urls) if u != first)]

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


Criticality = Literal["low", "medium", "high", "critical"]


class Device(Strict, frozen=True):
    """One machine of the plant."""

    path: DevicePathText
    asset: Slug
    """Asset type (press, robot, conveyor, ...): selects simulator physics and models."""
    description: str = ""
    feeds: list[DevicePathText] = []
    """Devices this one supplies (material flow): the asset graph's edges, checked at load."""
    criticality: Criticality = "medium"
    """How much a fault on it weighs in its cell's, line's, area's and site's health."""


class Plant(Strict, frozen=True):
    devices: list[Device] = []


class UnsConfig(Strict, frozen=True):
    """The whole file."""

    namespace: Namespace = Namespace()
    broker: BrokerSettings = BrokerSettings()
    plant: Plant = Plant()
    services: dict[str, dict[str, Any]] = {}
    """One section per service, decoded by that service's own settings struct."""


_PATTERNS: Final = {
    SLUG_PATTERN: "that is a slug (lowercase letters, digits, '-' and '_', starting with a"
    " letter or digit, at most 64 characters, nothing else: no space or newline)",
    DEVICE_PATH_PATTERN: "that is a device path: enterprise/site/area/line/cell/device, each"
    " a slug (lowercase letters, digits, '-' and '_', at most 64 characters; no space or"
    " newline)",
}
_AT = re.compile(r"(?P<msg>.*?)(?: - at `(?:key` in `)?\$(?P<path>[^`]*)`)?", re.S)


def describe(exc: msgspec.ValidationError | msgspec.DecodeError, prefix: str = "") -> str:
    """Turn msgspec's ``Expected int - at `$.a.b``` into ``a.b: Expected int`` (a bad
    dictionary key, ``at `key` in `$.a```, is named by its dictionary ``a``)."""
    m = _AT.fullmatch(str(exc))
    assert m is not None
    path = (m.group("path") or "").lstrip(".")
    field = ".".join(p for p in (prefix, path) if p)
    msg = m.group("msg")
    for pattern, what in _PATTERNS.items():
        msg = msg.replace(f"matching regex {pattern!r}", what)
    return f"{field}: {msg}" if field else msg


_UNKNOWN = re.compile(r"unknown field `(?P<name>[^`]+)`")


def _field_of(message: str) -> str:
    """The field a `describe` message is about; an unknown field's own path (``namespace`` +
    ``sites``), since that is what the file or a variable set."""
    field, _, rest = message.partition(": ")
    unknown = _UNKNOWN.search(rest)
    return f"{field}.{unknown.group('name')}" if unknown else field


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
    """Where the value of ``field`` came from: the variable that set it or a section above
    it; else, for a check of a whole section (``cert_file and key_file go together``), the
    file and the variables that set fields inside it; else the file."""
    file = str(path) if path else "defaults"
    for key, var in origin.items():
        if field == key or field.startswith((key + ".", key + "[")):
            return f"environment variable {var}"
    inside = [var for key, var in origin.items() if field and key.startswith(field + ".")]
    if inside:
        return f"{file} and environment variable{'s' if len(inside) > 1 else ''} " + ", ".join(
            inside
        )
    return file


@runtime_checkable
class ChecksConfig(Protocol):
    """Settings whose values must agree with the rest of the config (``simulator.devices``
    must be devices of ``plant.devices``); `LoadedConfig.service` calls ``check_config``."""

    def check_config(self, config: UnsConfig) -> None:
        """Raise `FieldError` naming the field (relative to the service's section)."""


class FieldError(ValueError):
    """A value that contradicts another part of the config; ``field`` relative to its section."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _device_paths(
    value: Any, info: mi.Type, field: str, depth: int = 0
) -> Iterator[tuple[str, str]]:
    """(field, path) of every `DevicePathText` value in a decoded settings struct."""
    if depth > 20:  # settings are shallow; a recursive type is not followed forever
        return
    if isinstance(info, mi.StrType):
        if info.pattern == DEVICE_PATH_PATTERN and isinstance(value, str):
            yield field, value
    elif isinstance(info, mi.StructType):
        for f in info.fields:
            sub = f"{field}.{f.name}" if field else f.name
            yield from _device_paths(getattr(value, f.name, None), f.type, sub, depth + 1)
    elif isinstance(info, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)):
        if isinstance(value, (list, tuple, set, frozenset)):
            for i, item in enumerate(value):
                yield from _device_paths(item, info.item_type, f"{field}[{i}]", depth + 1)
    elif isinstance(info, mi.DictType):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from _device_paths(key, info.key_type, field, depth + 1)
                yield from _device_paths(item, info.value_type, f"{field}[{key!r}]", depth + 1)
    elif isinstance(info, mi.UnionType):
        for option in info.types:
            yield from _device_paths(value, option, field, depth + 1)
    elif isinstance(info, mi.Metadata):
        yield from _device_paths(value, info.type, field, depth + 1)


def _outside(path: str, namespace: Namespace) -> bool:
    return path.split("/", 2)[:2] != [namespace.enterprise, namespace.site]


class LoadedConfig(msgspec.Struct, frozen=True):
    """A validated config plus what is needed to validate service sections later."""

    config: UnsConfig
    path: Path | None
    origin: dict[str, str]

    def service(self, name: str, kind: type[T]) -> T:
        """Decode ``services.<name>`` into the service's settings (exit-2 material on error).

        Beyond the types: every device path in them lies in ``namespace`` (an edge box
        publishes one site), and settings that are `ChecksConfig` are checked against
        the rest of the config.
        """
        section = self.config.services.get(name) or {}
        prefix = f"services.{name}"
        try:
            settings = msgspec.convert(section, kind, strict=False)
        except msgspec.ValidationError as exc:
            raise self._error(describe(exc, prefix)) from None
        ns = self.config.namespace
        for field, path in _device_paths(settings, mi.type_info(kind), prefix):
            if _outside(path, ns):
                raise self._error(
                    f"{field}: {path!r} is outside this edge box's namespace"
                    f" {ns.enterprise}/{ns.site}",
                    also=("namespace.enterprise", "namespace.site"),
                )
        if isinstance(settings, ChecksConfig):
            try:
                settings.check_config(self.config)
            except FieldError as exc:
                raise self._error(f"{prefix}.{exc.field}: {exc.message}") from None
        return settings

    def _error(self, message: str, also: tuple[str, ...] = ()) -> ConfigError:
        """The message with the source of its field (and of the fields it was checked against
        when they came from variables)."""
        source = _source(_field_of(message), self.origin, self.path)
        others = [
            f"{f} from environment variable {self.origin[f]}" for f in also if f in self.origin
        ]
        if others:
            source += "; " + ", ".join(others)
        return ConfigError(f"{message} (from {source})")


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
    result = LoadedConfig(config=UnsConfig(), path=file, origin=origin)
    try:
        config = msgspec.convert(data, UnsConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise result._error(describe(exc)) from None
    except ConfigError as exc:  # raised by a __post_init__ with its own field name
        raise result._error(str(exc)) from None
    result = LoadedConfig(config=config, path=file, origin=origin)
    ns = config.namespace
    for i, device in enumerate(config.plant.devices):
        if _outside(device.path, ns):
            raise result._error(
                f"plant.devices[{i}].path: {device.path!r} is outside this edge box's"
                f" namespace {ns.enterprise}/{ns.site}",
                also=("namespace.enterprise", "namespace.site"),
            )
    problem = check_relations(config.plant.devices)
    if problem is not None:
        raise result._error(problem)
    return result


def check_relations(devices: list[Device]) -> str | None:
    """Why the ``feeds`` relations are wrong, naming the entry, or None when they are fine:
    every fed device must be in the plant, and material cannot flow in a circle."""
    index = {d.path: i for i, d in enumerate(devices)}
    for i, device in enumerate(devices):
        for j, fed in enumerate(device.feeds):
            if fed not in index:
                return f"plant.devices[{i}].feeds[{j}]: {fed!r} is not a device of the plant"
    state: dict[str, int] = {}  # 1 on the current walk, 2 done

    def walk(path: str, trail: list[str]) -> list[str] | None:
        state[path] = 1
        for fed in devices[index[path]].feeds:
            if state.get(fed) == 1:
                return [*trail, path, fed]
            if fed not in state and (cycle := walk(fed, [*trail, path])) is not None:
                return cycle
        state[path] = 2
        return None

    for device in devices:
        if device.path not in state and (cycle := walk(device.path, [])) is not None:
            loop = cycle[cycle.index(cycle[-1]) :]
            return f"plant.devices[{index[loop[0]]}].feeds: a cycle, " + " -> ".join(loop)
    return None
