"""`uns.testing` drives a service end to end, as a service author's test would: the demo
service on the in-memory broker and on a real one, born, sending data, obeying a command,
dead once stopped; a wait that times out says what it waited for."""

from __future__ import annotations

import subprocess
import sys

import pytest

from uns import Command, DeviceBirth, DeviceData, NodeBirth, NodeDeath, Reply, Service, decode
from uns.testing import memory_broker, running, watching
from uns_demo import DemoService

DEVICE = "acme/pune/demo/line-0/cell-0/demo-01"


def value(data: DeviceData, name: str) -> object:
    return next(m.value for m in data.metrics if m.name == name)


async def drive_the_demo(url: str) -> None:
    async with watching(url, "acme/#") as w:
        async with running(DemoService, url, "acme", interval_s=0.02) as node:
            born = await w.next("acme/pune/_node/demo/birth", NodeBirth)
            birth = await w.next(f"{DEVICE}/raw/birth", DeviceBirth)
            first = await w.next(f"{DEVICE}/raw/data", DeviceData)
            second = await w.next(f"{DEVICE}/raw/data", DeviceData)

            await w.publish(f"{DEVICE}/cmd/set", Command(ts=1, name="set", args={"running": False}))
            stopped = await w.wait_for(
                lambda m: (
                    m.topic == f"{DEVICE}/raw/data"
                    and value(decode(m.payload, DeviceData), "running") is False
                )
            )
            after = await w.next(f"{DEVICE}/raw/data", DeviceData)
            assert node.id == "demo"
        dead = await w.next("acme/pune/_node/demo/death", NodeDeath)  # stopped cleanly

    assert born.node == "demo" and born.metrics_url.endswith("/metrics")
    assert [m.name for m in birth.metrics] == ["temperature", "running", "counter"]
    assert (first.seq + 1) % 256 == second.seq  # consecutive sequence numbers
    assert value(first, "running") is True
    stopped_count = value(decode(stopped.payload, DeviceData), "counter")
    assert value(after, "counter") == stopped_count  # a stopped machine counts no cycles
    assert dead.node == "demo" and dead.bdseq == born.bdseq


async def test_the_demo_service_runs_end_to_end_on_the_in_memory_broker() -> None:
    async with memory_broker() as url:
        await drive_the_demo(url)


async def test_the_demo_service_runs_end_to_end_on_a_real_broker(amqtt_broker) -> None:
    await drive_the_demo(amqtt_broker.url)


async def test_a_node_command_is_answered_on_its_reply_topic() -> None:
    async with (
        memory_broker() as url,
        watching(url, "acme/#") as w,
        running(DemoService, url, "acme") as node,
    ):
        await w.next("acme/pune/_node/demo/birth")
        reply_to = "acme/pune/tests/reply"
        await w.publish(node.cmd_topic, Command(ts=1, name="nonsense", args={"reply_to": reply_to}))
        reply = await w.next(reply_to, Reply)
    assert not reply.ok and "nonsense" in reply.error


async def test_a_wait_that_times_out_names_what_it_waited_for_and_what_it_saw() -> None:
    async with memory_broker() as url, watching(url, "acme/#") as w:
        await w.publish("acme/pune/other/topic", b"x")
        with pytest.raises(TimeoutError) as caught:
            await w.next("acme/pune/+/never", timeout=0.2)
        assert w.seen and w.seen[-1].topic == "acme/pune/other/topic"
    text = str(caught.value)
    assert "within 0.2 s" in text and "acme/pune/other/topic" in text


async def test_a_service_that_cannot_start_raises_at_once() -> None:
    class Broken(Service):  # type: ignore[type-arg]
        name = "broken"

        def __init__(self, node) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("no such device")

    async with memory_broker() as url:
        with pytest.raises(RuntimeError, match="no such device"):
            async with running(Broken, url, "acme"):
                pass


def test_importing_it_loads_no_service_and_nothing_heavy() -> None:
    code = (
        "import sys, uns.testing\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('asyncua', 'numpy', 'onnxruntime') or m.startswith('uns_')]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_free_ports_of_two_processes_never_clash_nor_fall_in_the_ephemeral_range() -> None:
    """Two pytest-xdist workers (or a test and the `uns bench` it runs) each ask for ports
    at once: none is handed out twice, and none can be taken meanwhile by an outgoing
    connection's local port (the kernel's ephemeral range): either once left a server of a
    test unable to listen (the simulator's Modbus port in CI: 0 values in 90 s)."""
    ask = "from uns.testing import free_port\nprint(*(free_port() for _ in range(400)))"
    children = [
        subprocess.Popen([sys.executable, "-c", ask], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    handed = [set(map(int, c.communicate(timeout=60)[0].split())) for c in children]
    assert all(c.returncode == 0 for c in children)
    assert [len(h) for h in handed] == [400, 400]
    assert not handed[0] & handed[1], "one port handed to both processes"
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except OSError:
        pytest.skip("no Linux ephemeral port range to compare with")
    assert max(handed[0] | handed[1]) < ephemeral
