"""`uns up` runs `replicas: N` as N processes: each replica with its own node id, /metrics
port and (with --secure) its own credential, and the replicas split the devices between
them (`uns.shard`): the example plant's OPC UA machines, featurized and scored by two
featurizers and two inference replicas, every device by the one replica that owns it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from clitools import Proc, start, uns
from fixtures.ports import free_port
from uns.shard import owner
from uns.testing import watching

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
FEATURIZERS = frozenset({"featurizer-0", "featurizer-1"})
SCORERS = frozenset({"inference-0", "inference-1"})


def replicated_plant(tmp_path: Path) -> Path:
    """The example plant with the featurizer and inference at two replicas each, and only
    the OPC UA side running (the presses and the conveyor have models)."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "uns-schema/plant.yaml").read_text())
    services = config["services"]
    services["featurizer"]["replicas"] = 2
    services.setdefault("inference", {})["replicas"] = 2
    services["inference"]["models_dir"] = str(ROOT / "models")
    services["inference"]["pubkey"] = str(ROOT / "keys/models.pub")
    services["inference"]["audit_log"] = str(tmp_path / "audit.jsonl")
    for name in ("modbus-adapter", "bridge", "plant", "demo", "sparkplug", "sparkplug-adapter"):
        services.setdefault(name, {})["enabled"] = False
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_uns_up_plan_lists_each_replica_with_its_own_metrics_port(tmp_path: Path) -> None:
    r = uns("up", "--plan", "--config", str(replicated_plant(tmp_path)))
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "featurizer" not in rows and "inference" not in rows
    assert rows["featurizer-0"].endswith("metrics port 9405")
    assert rows["featurizer-1"].endswith("metrics port 9505")
    assert rows["inference-1"].endswith("metrics port 9506")


async def test_uns_up_runs_the_replicas_and_each_device_is_handled_by_its_owner(
    tmp_path: Path, procs: list[Proc]
) -> None:
    config, secrets, port = replicated_plant(tmp_path), tmp_path / "secrets", free_port()
    start(
        procs,
        "up",
        *("--config", str(config), "--port", str(port), "--metrics-port", "0"),
        *("--opcua-port", str(free_port()), "--modbus-port", str(free_port())),
        *("--secure", "--secrets", str(secrets)),
        ready="births published",
    )
    app = (secrets / "secrets/app.password").read_text().strip()
    for replica in FEATURIZERS | SCORERS:  # each logged in as itself
        assert (secrets / "secrets" / f"{replica}.password").exists(), replica
    devices = [
        d["path"]
        for d in yaml.safe_load(config.read_text())["plant"]["devices"]
        if d["asset"] in ("press", "conveyor")
    ]
    url = f"mqtt://app:{app}@127.0.0.1:{port}"
    async with watching(url, "acme/pune/#") as w:
        w.timeout = 120.0
        births = "acme/pune/_node/{}/birth"

        def online() -> set[str]:
            return {
                node
                for node in FEATURIZERS | SCORERS
                if any(
                    m.topic == births.format(node)
                    and m.payload
                    and msgspec.json.decode(m.payload).get("type") == "nbirth"
                    for m in w.messages
                )
            }

        await w.wait(lambda: online() == FEATURIZERS | SCORERS, why=lambda: str(online()))
        settled = len(w.messages)  # every replica online: the shard is settled from here

        def producers(stream: str) -> dict[str, set[str]]:
            seen: dict[str, set[str]] = defaultdict(set)
            for m in w.messages[settled:]:
                path, _, rest = m.topic.rpartition(f"/{stream}/")
                if rest == "data" and path in devices:
                    seen[path].add(msgspec.json.decode(m.payload)["node"])
            return seen

        await w.wait(
            lambda: all(
                sum(1 for m in w.messages[settled:] if m.topic == f"{d}/scores/data") >= 3
                for d in devices
            ),
            why=lambda: str(producers("scores")),
        )
    features, scores = producers("features"), producers("scores")
    for device in devices:
        assert features[device] == {owner(device, FEATURIZERS)}, (device, features[device])
        assert scores[device] == {owner(device, SCORERS)}, (device, scores[device])
    # the hash split the five machines between both replicas of each service
    assert {owner(d, FEATURIZERS) for d in devices} == FEATURIZERS
    assert {owner(d, SCORERS) for d in devices} == SCORERS
