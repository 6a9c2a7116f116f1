"""The installed services and command groups, found from entry points alone.

A package plugs in through its own ``pyproject.toml``; nothing else names it::

    [project.entry-points."uns.services"]   # imported only to run the service
    featurizer = "uns_featurizer.service:Featurizer"

    [project.entry-points."uns.settings"]   # light: uns and the package's pure logic
    featurizer = "uns_featurizer.settings:FeaturizerSettings"

    [project.entry-points."uns.commands"]   # a Typer app, or a function for one command
    sim = "uns_simulator.cli:app"

Listing reads the installed packages' metadata and imports none of them: `uns --help`,
`uns up` and a config check stay free of a service's heavy libraries (asyncua, numpy,
onnxruntime). `uns up` loads only the settings classes, for each service's ``enabled``
flag and its ``default_metrics_port``; the service class is loaded by `uns run` alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import typer.core

    from uns.runtime import Service, ServiceSettings

SERVICES: Final = "uns.services"
SETTINGS: Final = "uns.settings"
COMMANDS: Final = "uns.commands"


@dataclass(frozen=True, slots=True)
class Plugin:
    """One installed service: where its settings and its service class are."""

    name: str
    service_ref: str
    """``module:Class`` of its `Service` subclass."""
    settings_ref: str | None
    """``module:Class`` of its settings; None when the package declares none (then the
    service class is imported to find them)."""

    def load_settings(self) -> type[ServiceSettings]:
        """The settings class; imports the settings module only, when declared."""
        if self.settings_ref is None:
            return self.load_service().Settings
        cls: type[ServiceSettings] = _load(self.settings_ref)
        return cls

    def load_service(self) -> type[Service[Any]]:
        cls: type[Service[Any]] = _load(self.service_ref)
        return cls

    @property
    def default_metrics_port(self) -> int:
        """Its ``/metrics`` port when the config gives none (a ClassVar of its settings)."""
        return self.load_settings().default_metrics_port


def _load(ref: str) -> Any:
    return EntryPoint(name="", value=ref, group="").load()


def _group(group: str) -> dict[str, EntryPoint]:
    """A group's entry points by name, in name order (a later duplicate wins)."""
    return {ep.name: ep for ep in sorted(entry_points(group=group), key=lambda ep: ep.name)}


def service_classes() -> dict[str, EntryPoint]:
    """The ``uns.services`` entry points by name, in name order."""
    return _group(SERVICES)


def services() -> dict[str, Plugin]:
    """Every installed service by name, in name order; nothing is imported."""
    settings = _group(SETTINGS)
    return {
        name: Plugin(name, ep.value, settings[name].value if name in settings else None)
        for name, ep in service_classes().items()
    }


def commands() -> dict[str, EntryPoint]:
    """The installed command groups (``uns.commands``) by name, in name order."""
    return _group(COMMANDS)


def load_command(name: str) -> typer.core.TyperCommand | typer.core.TyperGroup:
    """The click command of group ``name``: its package's cli module is imported now.

    The entry point names a Typer app (a group of commands) or a plain function (one
    command, like `uns record`); `KeyError` when no package declares ``name``.
    """
    import typer
    import typer.main

    target = commands()[name].load()
    command: typer.core.TyperCommand | typer.core.TyperGroup
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)  # a group even with one command (audit verify)
    else:
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        single.command(name)(target)
        command = typer.main.get_command(single)  # type: ignore[assignment]
    command.name = name
    return command


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` (PEP 562) that imports a public name's submodule
    when the name is first used, so that ``import pkg.settings`` does not import the
    service (and its asyncua, numpy, ...) through ``pkg/__init__.py``.

    ``exports`` maps each public name to its submodule (``"service"``), or to
    ``"submodule:attribute"`` when the name differs (``"journal:Item"``)::

        __all__ = ["Bridge", "BridgeSettings"]
        __getattr__ = lazy_exports(__name__, {"Bridge": "service", "BridgeSettings": "settings"})
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = where.partition(":")
        value = getattr(importlib.import_module(f"{package}.{module}"), attribute or name)
        namespace[name] = value  # found by plain lookup from now on
        return value

    return __getattr__
