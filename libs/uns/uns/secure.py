"""``uns up --secure``: the embedded broker with the site's policy, each service with its
own credential.

The files come from ``uns broker secure --out DIR`` (run as a command: the broker package
writes them, and `uns` imports no service). The broker reads its users and ACL from the
environment (``UNS_SERVICES__BROKER__*``); a service gets its user name and the path of
its password file the same way (``UNS_BROKER__USERNAME``, ``UNS_BROKER__PASSWORD_FILE``),
never a password on a command line, which every user of the box can read.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import msgspec

from uns.config import LoadedConfig
from uns.errors import ConfigError
from uns.plugins import services
from uns.policy import APP

PROBE_USER = APP
"""The readiness probe of `uns up` logs in as the read-only app."""


@dataclass(frozen=True)
class SecureRun:
    directory: Path
    broker_env: dict[str, str]
    """The embedded broker's users and ACL, as ``UNS_SERVICES__BROKER__*`` variables."""

    def service_env(self, node_id: str) -> dict[str, str]:
        """A service's login: its user name and the file holding its password."""
        secret = self.directory / "secrets" / f"{node_id}.password"
        if not secret.exists():
            raise ConfigError(f"{secret}: no credential for node {node_id!r}")
        return {"UNS_BROKER__USERNAME": node_id, "UNS_BROKER__PASSWORD_FILE": str(secret)}

    def probe_login(self) -> tuple[str, str]:
        secret = self.directory / "secrets" / f"{PROBE_USER}.password"
        return PROBE_USER, secret.read_text(encoding="utf-8").strip()


def node_id(loaded: LoadedConfig, service: str) -> str:
    """The node id (its user name) of an installed service under this config."""
    settings = loaded.service(service, services()[service].load_settings())
    return settings.node_id or service


def prepare(directory: Path, argv: list[str]) -> SecureRun:
    """Write (or refresh: passwords kept) the policy files under ``directory`` with the
    command ``argv`` (``uns broker secure ...``), and read the broker's section of them."""
    directory = directory.resolve()
    done = subprocess.run(
        [*argv, "--out", str(directory)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ConfigError(f"uns broker secure: {done.stderr.strip() or done.stdout.strip()}")
    section = msgspec.yaml.decode((directory / "amqtt" / "broker.yaml").read_bytes())
    env = {f"UNS_SERVICES__BROKER__{key.upper()}": json.dumps(v) for key, v in section.items()}
    return SecureRun(directory, env)
