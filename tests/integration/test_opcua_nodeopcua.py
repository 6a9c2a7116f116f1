"""The OPC UA adapter against node-opcua: an OPC UA stack that shares no code with asyncua.

Optional: needs ``node`` on PATH and the ``node-opcua`` package, found through
``UNS_NODE_OPCUA_DIR`` (a directory where ``npm install node-opcua`` was run, outside the
repository) or ``NODE_PATH``; skipped otherwise. Nothing is downloaded at run time.

node-opcua behaves like the PLCs of issue 15 where asyncua's server does not: it checks
the client certificate at OpenSecureChannel (asyncua 2.1's client then raised an
AssertionError), and it samples a monitored item on a timer, so a waveform array
rewritten at the sampling interval loses blocks. Asked for sampling 0, it reports every
change but at most one per its MinSupportedSampleRate (50 ms): blocks shorter than that
are lost whatever a client asks, which the block counter then shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from fixtures.logs import Records, capturing_logs
from fixtures.need import IN_CI
from fixtures.opcua import adapter_lines, device_path
from fixtures.pki import der_to_pem, opcua_pki
from fixtures.ports import free_port
from uns import DeviceData, Waveform, decode
from uns.config import load
from uns.testing import Watcher, running, watching
from uns_opcua_adapter import (
    OpcUaAdapter,
    OpcUaAdapterSettings,
    Security,
    Tag,
    UaDevice,
    browse,
)

SCRIPT = Path(__file__).with_name("opcua_node_plc.js")
NS = "urn:uns:test:node-opcua"
WAVE_LEN = 256
PERIOD_MS = 100  # the block period of the plants in issue 15 (1.8 % lost at 100 ms sampling)
RATE_HZ = WAVE_LEN * 1000 / PERIOD_MS
CLIENT_URI = "urn:uns:test:adapter"
FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "timeout_s": 5.0}


def _node_env() -> dict[str, str] | None:
    """The environment in which ``node`` finds node-opcua, or None when it cannot."""
    node = shutil.which("node")
    if node is None:
        return None
    env = dict(os.environ)
    base = os.environ.get("UNS_NODE_OPCUA_DIR")
    if base:
        env["NODE_PATH"] = str(Path(base) / "node_modules")
    try:
        subprocess.run(
            [node, "-e", "require.resolve('node-opcua')"],
            env=env,
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return env


NODE_ENV = _node_env()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        NODE_ENV is None and not IN_CI,
        reason="node and node-opcua not found (set UNS_NODE_OPCUA_DIR)",
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _node_opcua_in_ci() -> None:
    if NODE_ENV is None:  # only reached in CI: .ci/run installs it
        pytest.fail("node-opcua not found: .ci/run must install it and set UNS_NODE_OPCUA_DIR")


@dataclass
class NodePlc:
    proc: asyncio.subprocess.Process
    url: str
    pki: Path | None = None

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def trust_rejected(self) -> list[Path]:
        """What the README tells an operator: move the rejected certificate to trusted."""
        assert self.pki is not None
        moved = []
        for cert in (self.pki / "rejected").glob("*"):
            target = self.pki / "trusted" / "certs" / cert.name
            cert.rename(target)
            moved.append(target)
        return moved


async def start_node_plc(config: dict[str, Any], pki: Path | None = None) -> NodePlc:
    port = free_port()
    assert NODE_ENV is not None
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(SCRIPT),
        json.dumps({"port": port, "namespace": NS, **config}),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=NODE_ENV,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(120):  # node-opcua loads its nodeset: seconds on a busy box
        while not (line := await proc.stdout.readline()).startswith(b"READY"):
            if not line:
                raise AssertionError(f"node-opcua server exited with {await proc.wait()}")
    # keep draining its stdout so a chatty server never blocks on a full pipe
    asyncio.get_running_loop().create_task(_drain(proc.stdout))
    return NodePlc(proc, f"opc.tcp://127.0.0.1:{port}/uns", pki)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def streaming_plc() -> AsyncIterator[NodePlc]:
    plc = await start_node_plc({"wave": {"periodMs": PERIOD_MS, "len": WAVE_LEN}})
    yield plc
    await plc.stop()


@pytest.fixture
def logs() -> Iterator[Records]:
    with capturing_logs("uns_opcua_adapter", timeout=30.0) as handler:
        yield handler


async def waveforms(w: Watcher, prefix: str, n: int, timeout: float = 60.0) -> list[Waveform]:
    """The next ``n`` waveform blocks the adapter publishes."""
    topic = f"{device_path(prefix)}/raw/data"
    got: list[Waveform] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            m = await w.wait_for(lambda m: m.topic == topic and bool(m.payload), timeout)
            data = decode(m.payload)
            assert isinstance(data, DeviceData)
            got += [x.value for x in data.metrics if isinstance(x.value, Waveform)]
    return got


def positions(blocks: list[Waveform]) -> list[int]:
    """Each block's place in the server's stream (its first value is place * 1000)."""
    return [int(b.values()[0]) // 1000 for b in blocks]


async def test_every_timer_written_block_arrives_in_a_row_with_the_default_sampling(
    streaming_plc: NodePlc, memory_url: str, prefix: str
) -> None:
    """Before: sampling at the publishing interval, the block period, a timer-sampling
    server missed a block whenever two writes fell between two samples, and the adapter
    numbered the ones it saw 1, 2, 3, ... as if none were missing."""
    tag = Tag(
        name="vibration", node=f"nsu={NS};s=Press01.Vibration", datatype="waveform", rate_hz=RATE_HZ
    )
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=streaming_plc.url,
            devices=[UaDevice(path=device_path(prefix), tags=[tag])],
            **FAST,
        ) as node,
    ):
        blocks = (await waveforms(w, prefix, 51))[1:]  # the first is the value it had
        at = positions(blocks)
        assert at == list(range(at[0], at[0] + 50))  # 5 s of signal, not a block missing
        assert [b.block - blocks[0].block for b in blocks] == list(range(50))
        assert [b.t0_us - blocks[0].t0_us for b in blocks][:3] == [0, 100_000, 200_000]
        missing = node.metrics.registry.get_sample_value(
            "uns_opcua_blocks_missing_total", {"service": "opcua-adapter"}
        )
        assert missing == 0


async def test_blocks_a_timer_sampling_server_never_saw_leave_holes_in_the_counter(
    streaming_plc: NodePlc, memory_url: str, prefix: str
) -> None:
    tag = Tag(
        name="vibration",
        node=f"nsu={NS};s=Press01.Vibration",
        datatype="waveform",
        rate_hz=RATE_HZ,
        sampling_ms=250,  # a server that samples slower than the blocks come
    )
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=streaming_plc.url,
            devices=[UaDevice(path=device_path(prefix), tags=[tag])],
            **FAST,
        ) as node,
    ):
        blocks = (await waveforms(w, prefix, 16))[1:]
        at = positions(blocks)
        assert at[-1] - at[0] > 2 * (len(at) - 1)  # the server did not see most blocks ...
        # ... and once the usual step is known, the counter steps as the stream does
        assert [b.block - blocks[4].block for b in blocks[4:]] == [p - at[4] for p in at[4:]]
        missing = node.metrics.registry.get_sample_value(
            "uns_opcua_blocks_missing_total", {"service": "opcua-adapter"}
        )
        assert missing is not None and missing >= at[-1] - at[4] - (len(at) - 5)


async def test_browse_of_node_opcua_loads_as_a_config_and_reads_where_the_namespace_moved(
    streaming_plc: NodePlc, memory_url: str, prefix: str, tmp_path: Path
) -> None:
    text = await browse(streaming_plc.url, enterprise=prefix, timeout_s=10.0)
    plant = tmp_path / "plant.yaml"
    plant.write_text(f"namespace: {{enterprise: {prefix}, site: pune}}\n{text}")
    settings = load(plant, environ={}).service("opcua-adapter", OpcUaAdapterSettings)
    nodes = {t.name: t.node for d in settings.devices for t in d.tags}
    assert nodes["bearing_temp"] == f"nsu={NS};s=Press01.BearingTemp"
    moved = await start_node_plc({"extraNamespaces": ["urn:a", "urn:b", "urn:c"]})
    try:
        section = msgspec.to_builtins(settings)
        section.update(FAST, metrics_port=0, url=moved.url)
        async with (
            watching(memory_url, f"{prefix}/#") as w,
            running(OpcUaAdapter, memory_url, prefix, **section),
        ):
            await w.wait_topic("/raw/birth", timeout=30.0)

            def warm(m: Any) -> bool:
                data = decode(m.payload) if m.payload and m.topic.endswith("/raw/data") else None
                return isinstance(data, DeviceData) and any(
                    x.name == "bearing_temp" and x.quality == "good" and x.value > 20.0
                    for x in data.metrics
                )

            await w.wait_for(warm, timeout=30.0)
    finally:
        await moved.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def secure_plc(tmp_path: Path) -> AsyncIterator[tuple[NodePlc, Path, Path]]:
    pki = opcua_pki(tmp_path, server_uri="urn:uns:test:node-opcua-plc", client_uri=CLIENT_URI)
    pem = der_to_pem(pki.server_cert)  # node-opcua reads its own certificate as PEM
    root = tmp_path / "plc-pki"
    plc = await start_node_plc(
        {"pki": {"root": str(root), "cert": str(pem), "key": str(pki.server_key)}}, root
    )
    yield plc, pki.client_cert, pki.client_key
    await plc.stop()


async def test_node_opcua_rejecting_our_certificate_is_one_line_then_trusting_it_connects(
    secure_plc: tuple[NodePlc, Path, Path], memory_url: str, prefix: str, logs: Records
) -> None:
    """Before: asyncua raised AssertionError in open_secure_channel and the adapter exited 1."""
    plc, cert, key = secure_plc
    tag = Tag(name="bearing_temp", node=f"nsu={NS};s=Press01.BearingTemp")
    async with (
        watching(memory_url, f"{prefix}/#") as w,
        running(
            OpcUaAdapter,
            memory_url,
            prefix,
            url=plc.url,
            security=Security(mode="sign_encrypt", certificate=str(cert), private_key=str(key)),
            username="edge",
            password="s3cret",
            devices=[UaDevice(path=device_path(prefix), tags=[tag])],
            certificate_retry_s=2.0,
            **FAST,
        ),
    ):
        await logs.wait(lambda: adapter_lines(logs))
        first = adapter_lines(logs)[0]
        assert "rejected our certificate (BadSecurityChecksFailed)" in first
        assert f"trust {cert} on the server" in first
        assert plc.trust_rejected()  # node-opcua filed it under rejected, as PLCs do
        await w.wait_topic("/dev-1/raw/birth", timeout=60.0)
    assert not [r for r in logs.records if r.exc_info]  # asyncua's traceback included
