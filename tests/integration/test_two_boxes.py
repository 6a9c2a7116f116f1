"""Many boxes, one enterprise namespace: two edge boxes (two `uns up`, the plants of two
sites of one enterprise) each bridge their features, scores, events, births and deaths
into one central Mosquitto, and an application there sees both under one ISA-95 tree.

The id scheme: a box is a site (``namespace.site``; every node topic is
``{enterprise}/{site}/_node/{node_id}``), so two boxes' node ids never meet. A box that
claims another's site by mistake would: the central broker refuses it, because each box
logs in with its own credential and the ACL lets it write under its own site only
(``use_username_as_clientid`` keeps its client id from taking over the other box's
session). Its bridge logs the refusal with the topic and keeps the message in its journal.

A restart of the central broker loses nothing: what the boxes produced meanwhile waits in
the bridges' journals and arrives afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from clitools import Proc, start, uns
from fixtures.brokers import Mosquitto, started_mosquitto
from fixtures.ports import free_port
from uns.bus import Message
from uns.testing import running, watching
from uns_demo import DemoService

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SITES = ("pune", "chennai")
DEVICES = ("stamping/line-3/cell-a/press-01", "stamping/line-3/cell-b/conveyor-01")
"""Per box: one machine of each modelled asset type that the OPC UA side reads."""
PASSWORDS = {
    "box-pune": "pune-secret",
    "box-chennai": "chennai-secret",
    "reader": "reader-pw",
    "operator": "operator-pw",
}
ACL = ROOT / "deploy/central/acl"
"""The central ACL the README gives: each box writes under its own site only."""
STREAMS = re.compile(r"^acme/[^/]+/(?:[^/]+/){4}(?:features|scores)/data$")


def start_central(tmp_path: Path) -> Mosquitto:
    return started_mosquitto(
        tmp_path,
        name="central",
        users=PASSWORDS,
        login="reader",
        persistent=True,  # an application's session survives the restart below
        extra=f"acl_file {ACL}\nuse_username_as_clientid true\nmax_queued_messages 100000\n",
    )


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = start_central(tmp_path)
    yield broker
    broker.kill()


@pytest.fixture
def locals_(tmp_path: Path) -> Iterator[dict[str, Mosquitto]]:
    """Each box's own broker (Mosquitto, as a plant that may lose nothing runs)."""
    brokers = {
        site: started_mosquitto(tmp_path, name=f"local-{site}", extra="max_queued_messages 10000\n")
        for site in SITES
    }
    yield brokers
    for broker in brokers.values():
        broker.kill()


def bridge_section(tmp_path: Path, central: Mosquitto, user: str, box: str) -> dict[str, Any]:
    secret = tmp_path / f"{box}.password"
    secret.write_text(PASSWORDS[user] + "\n")
    secret.chmod(0o600)
    return {
        "remote": {
            "url": f"mqtt://127.0.0.1:{central.port}",
            "allow_plaintext": True,  # a test broker on this machine; mqtts:// across a WAN
            "username": user,
            "password_file": str(secret),
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
        },
        "journal": {"path": str(tmp_path / f"{box}-journal.sqlite")},
    }


def box_config(tmp_path: Path, site: str, central: Mosquitto) -> Path:
    """The example plant as site ``site``: two machines read over OPC UA, featurized and
    scored, bridged to the central broker with the box's own credential."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "uns-schema/plant.yaml").read_text())
    config["namespace"]["site"] = site
    keep = {f"acme/pune/{d}" for d in DEVICES}

    def moved(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                **{k: v for k, v in d.items() if k != "feeds"},
                "path": d["path"].replace("/pune/", f"/{site}/"),
            }
            for d in devices
            if d["path"] in keep
        ]

    config["plant"]["devices"] = moved(config["plant"]["devices"])
    services = config["services"]
    services["opcua-adapter"]["devices"] = moved(services["opcua-adapter"]["devices"])
    services["inference"]["models_dir"] = str(ROOT / "models")
    services["inference"]["pubkey"] = str(ROOT / "keys/models.pub")
    services["inference"]["audit_log"] = str(tmp_path / f"{site}-audit.jsonl")
    services["modbus-adapter"] = {"enabled": False}  # the weld robot stays out
    for name in ("plant", "demo", "sparkplug", "sparkplug-adapter", "notifier"):
        services.setdefault(name, {})["enabled"] = False
    services["bridge"] = bridge_section(tmp_path, central, f"box-{site}", site)
    path = tmp_path / f"{site}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_box(
    procs: list[Proc], tmp_path: Path, site: str, central: Mosquitto, local: Mosquitto
) -> Proc:
    return start(
        procs,
        "up",
        *("--config", str(box_config(tmp_path, site, central)), "--broker", local.url),
        *(
            "--metrics-port",
            "0",
            "--opcua-port",
            str(free_port()),
            "--modbus-port",
            str(free_port()),
        ),
    )


def kind(m: Message) -> str:
    return str(msgspec.json.decode(m.payload).get("type")) if m.payload else ""


def stop_gracefully(broker: Mosquitto) -> None:
    """What `systemctl restart mosquitto` does first: SIGTERM (it saves its sessions)."""
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGTERM)
    broker.proc.wait(30)
    broker.proc = None


async def test_two_boxes_in_one_tree_with_births_deaths_and_nothing_lost_across_a_central_restart(
    tmp_path: Path, procs: list[Proc], central: Mosquitto, locals_: dict[str, Mosquitto]
) -> None:
    app = {"client_id": "enterprise-app", "clean_session": False, "protocol": 5}
    devices = {f"acme/{site}/{d}" for site in SITES for d in DEVICES}
    # every box's features and scores as its own broker saw them: what must reach the centre
    async with (
        watching(locals_["pune"].url, "acme/#") as at_pune,
        watching(locals_["chennai"].url, "acme/#") as at_chennai,
    ):
        local = {"pune": at_pune, "chennai": at_chennai}
        async with watching(central.url, "acme/#", **app) as centre:
            centre.timeout = 90.0
            t0 = time.monotonic()
            boxes = {
                site: start_box(procs, tmp_path, site, central, locals_[site]) for site in SITES
            }

            def scored() -> set[str]:
                return {
                    m.topic.removesuffix("/scores/data")
                    for m in centre.messages
                    if m.topic.endswith("/scores/data")
                }

            def why() -> str:
                ended = {
                    site: b.p.returncode for site, b in boxes.items() if b.p.poll() is not None
                }
                tails = {site: b.lines[-5:] for site, b in boxes.items()} if ended else ""
                return f"; scored: {sorted(scored())}; ended: {ended} {tails}"

            await centre.wait(lambda: scored() >= devices, why=why)
            both_scored_s = time.monotonic() - t0
            nodes = {"opcua-adapter", "featurizer", "inference", "simulator", "bridge"}
            born = {
                (m.topic.split("/")[1], m.topic.split("/")[3])
                for m in centre.messages
                if m.topic.endswith("/birth") and "/_node/" in m.topic and kind(m) == "nbirth"
            }
            assert born >= {(site, node) for site in SITES for node in nodes}, born

            # the enterprise's view, as an operator asks for it
            # (its own login: with use_username_as_clientid a second "reader" connection
            # would take the application's session over; allowed its `sync` command, the
            # end of the retained burst, which goes nowhere: the bridges only send)
            operator = central.url.replace("reader:reader-pw", "operator:operator-pw")
            t_tree = time.monotonic()
            tree = await asyncio.to_thread(uns, "tree", "--broker", operator, "--timeout", "10")
            tree_s = time.monotonic() - t_tree
            assert tree.returncode == 0, tree.stderr
            out = tree.stdout
            # one enterprise, both sites beneath it, each with its own nodes online
            assert re.search(
                r"── acme\n(?:.*\n)*?    ├── chennai\n(?:.*\n)*?    └── pune\n", out
            ), out
            online = re.findall(r"── ([a-z-]+)  \1 \S+  online", out)
            assert sorted(online) == sorted(list(nodes) * 2), out
            assert out.count("scores  from inference  online") == len(devices), out
            assert out.count("features  from featurizer  online") == len(devices), out

            # a death on each box is seen centrally, then the node's rebirth (uns up
            # restarts it): Pune's inference and Chennai's featurizer, killed with SIGKILL
            killed = {"pune": "inference", "chennai": "featurizer"}
            pids = {
                site: int(
                    re.findall(rf"started {service} \(pid (\d+)\)", "\n".join(boxes[site].lines))[0]
                )
                for site, service in killed.items()
            }
            t_kill = time.monotonic()
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)
            gone = {f"acme/{site}/_node/{service}" for site, service in killed.items()}

            def seen(message: str, type_: str) -> set[str]:
                return {
                    m.topic.removesuffix(f"/{message}")
                    for m in centre.messages
                    if m.topic.endswith(f"/{message}") and kind(m) == type_
                }

            await centre.wait(lambda: seen("death", "ndeath") >= gone, 60)
            death_s = time.monotonic() - t_kill
            assert seen("death", "ndeath") == gone  # and no other node died
            reborn = len(centre.messages)
            await centre.wait(
                lambda: (
                    gone
                    <= {
                        m.topic.removesuffix("/birth")
                        for m in centre.messages[reborn:]
                        if m.topic.endswith("/birth") and kind(m) == "nbirth"
                    }
                ),
                90,
            )
            reborn_s = time.monotonic() - t_kill
            mark = {site: len(w.messages) for site, w in local.items()}
        # the central broker restarts: the application's session waits there, the boxes'
        # output in their bridges' journals
        stop_gracefully(central)
        t_stop = time.monotonic()
        for site, w in local.items():  # the boxes go on producing while it is away
            await w.wait(
                lambda w=w, site=site: (
                    sum(1 for m in w.messages[mark[site] :] if m.topic.endswith("/scores/data"))
                    >= 10
                ),
                60,
            )
        central.start()
        down_s = time.monotonic() - t_stop
        t_up = time.monotonic()
        owed = {
            (m.topic, m.payload)
            for site, w in local.items()
            for m in w.messages[mark[site] :]
            if STREAMS.match(m.topic)
        }
        async with watching(central.url, "acme/#", **app) as centre:
            centre.timeout = 120.0

            def missing() -> set[tuple[str, bytes]]:
                return owed - {(m.topic, m.payload) for m in centre.messages}

            await centre.wait(
                lambda: not missing(), why=lambda: f"; {len(missing())} of {len(owed)} missing"
            )
            drained_s = time.monotonic() - t_up
    print(
        f"both boxes' 4 devices scored centrally {both_scored_s:.1f} s after the two `uns up`;"
        f" a node's death on each box seen centrally {death_s:.2f} s after a kill -9, both"
        f" reborn {reborn_s:.1f} s; central down {down_s:.1f} s, {len(owed)} features/scores"
        f" messages owed, all delivered {drained_s:.1f} s after it was back;"
        f" uns tree {tree_s:.1f} s"
    )


async def test_a_box_that_claims_another_boxs_site_is_refused_centrally_and_its_log_says_why(
    tmp_path: Path, procs: list[Proc], central: Mosquitto, locals_: dict[str, Mosquitto]
) -> None:
    def bridge_only(box: str, local: Mosquitto, user: str) -> Path:
        config = {
            "namespace": {"enterprise": "acme", "site": "pune"},
            "broker": {"url": local.url},
            "services": {"bridge": bridge_section(tmp_path, central, user, box)},
        }
        path = tmp_path / f"{box}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    birth, death = "acme/pune/_node/bridge/birth", "acme/pune/_node/bridge/death"
    async with watching(central.url, "acme/#") as centre:
        centre.timeout = 60.0
        start(
            procs,
            "run",
            "bridge",
            "--config",
            str(bridge_only("pune", locals_["pune"], "box-pune")),
        )
        ours = await centre.wait_for(lambda m: m.topic == birth and kind(m) == "nbirth")
        # the Chennai box, its config copied from Pune's and the site left as it was: its
        # bridge is node `bridge` of acme/pune too, logged in as box-chennai
        wrong = bridge_only("chennai-as-pune", locals_["chennai"], "box-chennai")
        clash = start(procs, "run", "bridge", "--metrics-port", "0", "--config", str(wrong))
        line = await asyncio.to_thread(clash.wait_line, "refused a message", 60)
        # its first message there is its link's (clearing Pune's bridge's death)
        assert f"refused the message on {death!r}: Not authorized" in line, line
        assert "messages kept in the journal" in line and " ERROR " in line, line
        assert "another box owns site 'pune' there, or namespace.site is wrong" in line, line
    # the centre still holds Pune's bridge's birth and no death: the impostor's will is
    # dropped by the ACL when its connection goes
    clash.p.kill()
    clash.p.wait()
    async with watching(central.url, death) as at_centre:
        # the broker answers subscriptions in order: a retained death would come first
        await at_centre.bus.subscribe(birth)
        theirs = await at_centre.wait_for(lambda m: m.retain and m.topic == birth)
    assert theirs.payload == ours.payload
    assert not [m for m in at_centre.messages if m.topic == death and m.payload]


async def test_a_box_cut_off_from_the_centre_turns_its_site_stale_there_and_back(
    tmp_path: Path, procs: list[Proc], central: Mosquitto, locals_: dict[str, Mosquitto]
) -> None:
    """A box that goes away whole (power, WAN) can publish no death of its nodes: their
    births stay retained at the centre. Its bridge's Last Will there says so: the site's
    nodes turn offline in the enterprise's tree within about 2 x the keepalive, and online
    again once the box is back. A frozen process (SIGSTOP) stands for the cut: no FIN, no
    DISCONNECT, only silence, as when the WAN goes."""
    local = locals_["pune"]
    section = bridge_section(tmp_path, central, "box-pune", "pune")
    section["remote"]["keepalive_s"] = 5
    config = tmp_path / "pune-bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "namespace": {"enterprise": "acme", "site": "pune"},
                "broker": {"url": local.url},
                "services": {"bridge": section},
            }
        )
    )
    link = "acme/pune/_node/bridge"
    operator = central.url.replace("reader:reader-pw", "operator:operator-pw")

    async def tree() -> str:
        r = await asyncio.to_thread(uns, "tree", "--broker", operator, "--timeout", "10")
        assert r.returncode == 0, r.stderr
        return r.stdout

    def link_message(message: str, type_: str, after: int = 0) -> Any:
        def found(m: Message) -> bool:
            return m.topic == f"{link}/{message}" and kind(m) == type_

        return lambda: next((m for m in centre.messages[after:] if found(m)), None)

    async with (
        watching(central.url, "acme/#") as centre,
        running(DemoService, local.url, "acme", site="pune", interval_s=0.5),
    ):
        centre.timeout = 60.0
        bridge = start(procs, "run", "bridge", "--config", str(config))
        await centre.wait(link_message("birth", "nbirth"))
        await centre.wait_for(lambda m: m.topic == "acme/pune/_node/demo/birth" and m.payload)
        birth = msgspec.json.decode(link_message("birth", "nbirth")().payload)
        assert birth["relays"] == ["acme/pune"], birth
        assert re.search(r"── demo  demo test  online\n", await tree())

        os.kill(bridge.p.pid, signal.SIGSTOP)
        t_cut = time.monotonic()
        mark = len(centre.messages)
        try:
            await centre.wait(link_message("death", "ndeath", mark), 30)
            cut_s = time.monotonic() - t_cut
            death = msgspec.json.decode(link_message("death", "ndeath", mark)().payload)
            assert death["reason"] == "lost" and death["bdseq"] == birth["bdseq"], death
            out = await tree()
            # the demo's birth still stands there, and its node is shown stale, saying why
            assert re.search(
                r"── demo  demo test  offline \(site cut off: relay bridge lost\)\n", out
            ), out
            assert re.search(r"── bridge  bridge \S+  offline\n", out), out
        finally:
            os.kill(bridge.p.pid, signal.SIGCONT)
        t_back = time.monotonic()
        mark = len(centre.messages)
        await centre.wait(link_message("birth", "nbirth", mark), 60)
        back_s = time.monotonic() - t_back
        assert re.search(r"── demo  demo test  online\n", await tree())

        bridge.p.send_signal(signal.SIGTERM)  # a clean stop says so at once
        mark = len(centre.messages)
        await centre.wait(link_message("death", "ndeath", mark), 30)
        stopped = msgspec.json.decode(link_message("death", "ndeath", mark)().payload)
        assert stopped["reason"] == "shutdown", stopped
        assert bridge.p.wait(30) == 0
    print(
        f"cut off seen centrally {cut_s:.1f} s after the bridge froze (keepalive 5 s);"
        f" back {back_s:.1f} s after it thawed"
    )
