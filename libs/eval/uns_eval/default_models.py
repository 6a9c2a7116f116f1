"""``make model``: the example plant's default models, rebuilt reproducibly.

Healthy running of the simulated presses and conveyors (fixed seeds, the
featurizer's own maths, see ``uns_eval.simdata``) -> ``uns model train``
(vibration features) -> ``build/models/<asset>-anomaly/``. Same data and code, same
``model.onnx`` bytes: the check compares them with the shipped, signed models in
``models/``. With the signing key (``keys/models.key``, never committed) it signs
and promotes the rebuilt ones instead.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import msgspec

from uns_eval.simdata import feature_records
from uns_inference import model_promote, model_sign, model_train

ASSETS = ("press", "conveyor")
VERSION = "1.0.0"
CREATED = "2026-11-22T00:00:00Z"  # fixed: the card is signed too


def build(root: Path) -> list[Path]:
    out = []
    for asset in ASSETS:
        data = root / "build" / f"sim-healthy-{asset}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        with data.open("wb") as f:
            for rec in feature_records(asset, machines=4, minutes=240, seed=7, window_every_s=30.0):
                f.write(msgspec.json.encode(rec) + b"\n")
        target = root / "build" / "models" / f"{asset}-anomaly"
        model_train(
            [data],
            "anomaly",
            target,
            asset=asset,
            name=f"{asset}-anomaly",
            version=VERSION,
            include=("vibration.*",),
            created=CREATED,
            min_raise_s=10.0,
            min_clear_s=30.0,
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
        if key.exists():
            model_sign(target, key)
            model_promote(
                target, root / "models", audit_log=root / "var" / "model-audit.jsonl", pubkey=pub
            )
            print(f"{card['name']} {card['version']}: sha256 {sha}, signed and promoted")
        elif shipped.exists():
            same = hashlib.sha256(shipped.read_bytes()).hexdigest() == sha
            print(
                f"{card['name']} {card['version']}: sha256 {sha} "
                + ("= the shipped, signed model" if same else "DIFFERS from the shipped model")
            )
            status |= 0 if same else 1
        else:
            print(f"{card['name']}: built in {target}; no key to sign it ({key})")
    return status


if __name__ == "__main__":
    sys.exit(main())
