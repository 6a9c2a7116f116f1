"""The device shard (uns.shard): every replica computes the same owner, a dead replica's
devices move to the survivors and only those, and a retained death outweighs the
retained birth it follows, in whichever order the broker sends them."""

from __future__ import annotations

from pathlib import Path

import pytest

from uns.config import load
from uns.policy import site_policy
from uns.runtime import Service, ServiceSettings
from uns.shard import Shard, owner
from uns.testing import running

DEVICES = [f"acme/pune/a/l/c/m{i}" for i in range(200)]
THREE = frozenset({"featurizer-0", "featurizer-1", "featurizer-2"})


def node(replica: str, message: str) -> str:
    return f"acme/pune/_node/{replica}/{message}"


def test_a_dead_replicas_devices_move_and_only_those() -> None:
    before = {d: owner(d, THREE) for d in DEVICES}
    after = {d: owner(d, THREE - {"featurizer-2"}) for d in DEVICES}
    assert {before[d] for d in DEVICES} == THREE
    for d in DEVICES:
        assert after[d] == before[d] or before[d] == "featurizer-2"
    assert all(after[d] != "featurizer-2" for d in DEVICES)
    shares = [sum(1 for o in before.values() if o == r) for r in sorted(THREE)]
    assert min(shares) > 40, shares  # spread, not all on one


def test_replicas_agree_and_each_device_has_one_owner() -> None:
    shards = [Shard("acme", "pune", r, 3) for r in sorted(THREE)]
    for s in shards:
        for other in THREE - {s.me}:
            assert s.observe(node(other, "birth"), retained=True)
    for d in DEVICES:
        owners = [s.me for s in shards if s.owns(f"{d}/raw/data")]
        assert len(owners) == 1
        assert all(s.owns(f"{d}/raw/birth") for s in shards)  # births reach every replica


@pytest.mark.parametrize("order", [("death", "birth"), ("birth", "death")])
def test_a_retained_death_wins_over_the_retained_birth(order: tuple[str, str]) -> None:
    s = Shard("acme", "pune", "featurizer-0", 2)
    for message in order:
        s.observe(node("featurizer-1", message), retained=True)
    assert s.live == {"featurizer-0"}
    assert all(s.owns(f"{d}/raw/data") for d in DEVICES[:20])
    s.observe(node("featurizer-1", "birth"), retained=False)  # born again
    assert s.live == {"featurizer-0", "featurizer-1"}


def test_a_node_id_outside_the_replica_set_is_refused() -> None:
    with pytest.raises(ValueError, match="featurizer-0"):
        Shard("acme", "pune", "featurizer", 2)
    with pytest.raises(ValueError, match=r"index 0\.\.1"):
        Shard("acme", "pune", "featurizer-2", 2)


def test_the_site_policy_gives_each_replica_a_user_that_reads_the_others(tmp_path: Path) -> None:
    """In secure mode a replica that could not read the others' births would handle every
    device: the policy lets each read the replica set's births and deaths, nothing more."""
    config = tmp_path / "plant.yaml"
    config.write_text(
        "namespace: {enterprise: acme, site: pune}\nservices:\n  featurizer: {replicas: 3}\n"
    )
    policy = site_policy(load(config))
    assert "featurizer" not in policy
    for i in range(3):
        scope = policy[f"featurizer-{i}"]
        assert scope.may_publish(node(f"featurizer-{i}", "birth"))
        assert scope.may_publish("acme/pune/a/l/c/d/features/data")
        for j in {0, 1, 2} - {i}:
            assert scope.may_subscribe(node(f"featurizer-{j}", "birth"))
            assert scope.may_subscribe(node(f"featurizer-{j}", "death"))
            assert not scope.may_subscribe(node(f"featurizer-{j}", "cmd"))
            assert not scope.may_publish(node(f"featurizer-{j}", "death"))
    assert not policy["inference"].may_subscribe(node("featurizer-0", "birth"))


class _Counter(Service[ServiceSettings]):
    """A service whose state is not per device: it must not be split."""

    name = "counter"


async def test_a_service_that_does_not_shard_by_device_refuses_replicas(memory_url: str) -> None:
    with pytest.raises(ValueError, match="does not shard by device"):
        async with running(_Counter, memory_url, node_id="counter-0", replicas=2):
            pass
