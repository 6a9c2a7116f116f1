"""The whole example plant (`uns up` of uns-schema/plant.yaml with the simulator and both
adapters): the resident memory of every process it runs, summed, once the plant is
flowing (every device's data read, a first score made)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec

from uns import Message
from uns.config import EXAMPLE_CONFIG, REPO_ROOT
from uns_bench.context import Context, Receiver
from uns_bench.procs import Proc, Procs, descendants, free_port, usage, wait_broker
from uns_bench.report import Row, summarise


def _name(pid: int) -> str:
    """``uns run NAME`` -> NAME, ``uns broker`` -> broker, ``uns up`` -> supervisor."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return str(pid)
    if "run" in argv:
        return argv[argv.index("run") + 1]
    if "broker" in argv:
        return "broker"
    if "up" in argv:
        return "uns up"
    return Path(argv[0]).name


async def run(ctx: Context) -> list[Row]:
    doc = msgspec.yaml.decode(EXAMPLE_CONFIG.read_bytes())
    inference = doc["services"].setdefault("inference", {})
    inference["models_dir"] = str(REPO_ROOT / "models")
    inference["pubkey"] = str(REPO_ROOT / "keys" / "models.pub")
    inference["audit_log"] = str(ctx.workdir / "plant-audit.jsonl")
    doc["services"].setdefault("bridge", {})["journal"] = {"path": str(ctx.workdir / "j.sqlite")}
    cfg = ctx.workdir / "plant.yaml"
    cfg.write_bytes(msgspec.yaml.encode(doc))
    port = free_port()
    settle = 2.0 if ctx.quick else 30.0
    devices = [d["path"] for d in doc["plant"]["devices"]]
    procs = Procs(ctx.workdir)
    try:
        up = procs.uns(
            "uns-up",
            *("up", "--config", str(cfg), "--port", str(port), "--metrics-port", "0"),
            *("--opcua-port", str(free_port()), "--modbus-port", str(free_port())),
            *("--log-level", "WARNING"),
        )
        url = f"mqtt://127.0.0.1:{port}"
        await wait_broker(url, timeout_s=30)
        started = time.monotonic()
        await _flowing(url, devices, up)
        t0 = time.monotonic()
        ctx.say(f"  flowing {t0 - started:.1f} s after the broker was up")
        peak: dict[str, float] = {}
        rss: dict[str, float] = {}
        cpu0: dict[str, float] = {}
        while time.monotonic() - t0 < settle:
            await asyncio.sleep(1.0)
            now: dict[str, float] = {}
            for pid in descendants(up.pid):
                name, u = _name(pid), usage(pid)
                now[name] = now.get(name, 0.0) + u.rss_mb
                peak[name] = max(peak.get(name, 0.0), u.peak_rss_mb)
                cpu0.setdefault(name, u.cpu_s)
            rss = now
        cores = {}
        span = time.monotonic() - t0
        for pid in descendants(up.pid):
            name = _name(pid)
            cores[name] = round((usage(pid).cpu_s - cpu0.get(name, 0.0)) / span, 3)
    finally:
        procs.stop()
    run_ = {
        "figures": {
            "RSS sum MB": round(sum(rss.values())),
            "peak RSS sum MB": round(sum(peak.values())),
            "processes": len(rss),
        },
        "cpu": cores,
        "rss": {k: round(v) for k, v in sorted(peak.items())},
    }
    row = summarise(
        "6 example plant",
        "uns up, uns-schema/plant.yaml",
        f"6 machines (5 with 10 kHz vibration), simulator and both adapters, {settle:g} s"
        " once flowing",
        [run_],
    )
    ctx.say(f"  example plant: {row.figures['RSS sum MB']:.0f} MB RSS over {len(rss)} processes")
    return [row]


async def _flowing(url: str, devices: list[str], up: Proc, timeout_s: float = 90.0) -> None:
    """Until every device's raw data and a first score arrived: memory is measured on a
    plant that runs, not on services still starting (or adapters still backing off)."""
    seen: set[str] = set()
    scored = asyncio.Event()
    flowing = asyncio.Event()

    def keep(message: Message, now: float) -> None:
        device, stream = message.topic.rsplit("/", 2)[:2]
        if stream == "raw":
            seen.add(device)
        elif stream == "scores":
            scored.set()
        if scored.is_set() and seen >= set(devices):
            flowing.set()

    receiver = await Receiver(url, "+/+/+/+/+/+/+/data", keep=keep).start()
    waiter = asyncio.create_task(flowing.wait())
    try:
        deadline = time.monotonic() + timeout_s
        while not waiter.done():
            if not up.alive() or time.monotonic() > deadline:
                quiet = [d for d in devices if d not in seen]
                raise RuntimeError(
                    f"the example plant is not flowing: no data of {', '.join(quiet) or 'none'}"
                    f", {'a' if scored.is_set() else 'no'} score"
                    f"{'' if up.alive() else '; uns up exited'}; see {up.log}"
                )
            await asyncio.wait({waiter}, timeout=0.5)
    finally:
        waiter.cancel()
        await receiver.stop()
