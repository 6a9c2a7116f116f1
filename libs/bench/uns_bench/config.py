"""Config files for the services under test: N simulated presses, absolute paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from uns.config import REPO_ROOT


def write(
    workdir: Path, name: str, devices: list[str], services: dict[str, Any] | None = None
) -> Path:
    """A config with ``devices`` (all presses) and the example plant's signed models."""
    document: dict[str, Any] = {
        "namespace": {
            "enterprise": devices[0].split("/")[0] if devices else "bench",
            "site": "pune",
        },
        "plant": {"devices": [{"path": d, "asset": "press"} for d in devices]},
        "services": {
            "demo": {"enabled": False},
            "featurizer": {"waveform": {"window": 10_000}, "slow": {"window_s": 60, "hop_s": 10}},
            "inference": {
                "models_dir": str(REPO_ROOT / "models"),
                "pubkey": str(REPO_ROOT / "keys" / "models.pub"),
                "audit_log": str(workdir / f"{name}-audit.jsonl"),
            },
        },
    }
    for name, section in (services or {}).items():  # merged into the defaults above
        document["services"][name] = {**document["services"].get(name, {}), **section}
    path = workdir / f"{name}.yaml"
    path.write_bytes(msgspec.yaml.encode(document))
    return path
