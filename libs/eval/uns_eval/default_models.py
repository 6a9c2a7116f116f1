"""``make model``: the example plant's default models, rebuilt reproducibly.

Healthy running of the simulated presses and conveyors (fixed seeds, the
featurizer's own maths, see ``uns_eval.simdata``) -> ``uns model train``
(vibration features) -> ``build/models/<asset>-anomaly/``. Same data and code, same
``model.onnx`` bytes: the check compares them with the shipped, signed models in
``models/`` (a shipped version is never replaced). A model with no shipped version is
signed and promoted with the signing key (``keys/models.key``, never committed).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from uns_eval.simdata import feature_records, slow_feature_records
from uns_inference import model_promote, model_sign, model_train

ASSETS = ("press", "conveyor", "robot")
VERSION = "1.0.0"
CREATED = "2026-11-22T00:00:00Z"  # fixed: the card is signed too

ROBOT_TAGS = {"gearbox_temp": 1.0, "cabinet_temp": 1.0, "air_pressure": 1.0, "motor_current": 0.2}
"""The weld robot has no vibration sensor: its model reads the slow tags its controller
gives over Modbus (name -> the example plant's poll period, s): the gearbox temperature
(bearing wear heats it), the cabinet temperature, the gripper air pressure and the motor
current (a leak drops the pressure and raises the current). Means and standard deviations
of each 60 s window: the slope and the extremes of a window that began before the
featurizer did (the first minute after a start) are too noisy to be told from a fault."""
ROBOT_FEATURES = tuple(f"{tag}.{stat}" for tag in ROBOT_TAGS for stat in ("mean", "std"))


def _records(asset: str) -> Iterator[dict[str, Any]]:
    if asset == "robot":
        return slow_feature_records(asset, ROBOT_TAGS, machines=4, minutes=120, seed=7)
    return feature_records(asset, machines=4, minutes=240, seed=7, window_every_s=30.0)


def build(root: Path) -> list[Path]:
    out = []
    for asset in ASSETS:
        data = root / "build" / f"sim-healthy-{asset}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        with data.open("wb") as f:
            for rec in _records(asset):
                f.write(msgspec.json.encode(rec) + b"\n")
        target = root / "build" / "models" / f"{asset}-anomaly"
        slow = asset == "robot"
        model_train(
            [data],
            "anomaly",
            target,
            asset=asset,
            name=f"{asset}-anomaly",
            version=VERSION,
            include=ROBOT_FEATURES if slow else ("vibration.*",),
            created=CREATED,
            # a slow window every 10 s, each 60 s long: a breach must outlast the windows
            # of a (re)start, which hold only the seconds since it (up to 50 s of them)
            min_raise_s=60.0 if slow else 10.0,
            min_clear_s=60.0 if slow else 30.0,
        )
        out.append(target)
    return out


def main() -> int:
    root = Path.cwd()
    key = root / "keys" / "models.key"
    pub = root / "keys" / "models.pub"
    status = 0
    for target in build(root):
        card = msgspec.json.decode((target / "card.json").read_bytes())
        sha = hashlib.sha256((target / "model.onnx").read_bytes()).hexdigest()
        shipped = root / "models" / card["asset"] / "anomaly" / card["version"] / "model.onnx"
        if shipped.exists():  # a version is immutable: compare, never replace
            same = hashlib.sha256(shipped.read_bytes()).hexdigest() == sha
            print(
                f"{card['name']} {card['version']}: sha256 {sha} "
                + ("= the shipped, signed model" if same else "DIFFERS from the shipped model")
            )
            status |= 0 if same else 1
        elif key.exists():
            model_sign(target, key)
            model_promote(
                target, root / "models", audit_log=root / "var" / "model-audit.jsonl", pubkey=pub
            )
            print(f"{card['name']} {card['version']}: sha256 {sha}, signed and promoted")
        else:
            print(f"{card['name']}: built in {target}; no key to sign it ({key})")
    return status


if __name__ == "__main__":
    sys.exit(main())
