"""Sparkplug B pieces without a broker process: the id mapping, values on the wire, hostile
input, the settings; the south adapter on the in-memory bus fed garbage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uns import DeviceBirth, DeviceData, DevicePath, Metric, MetricDef, Waveform, now_ms
from uns.testing import running, watching
from uns_sparkplug import codec, spb_pb2
from uns_sparkplug.mirror import Mirror
from uns_sparkplug.south import SparkplugAdapter

PATH = DevicePath("acme", "pune", "stamping", "line-3", "cell-a", "press-01")


def test_the_device_id_mapping_is_reversible() -> None:
    assert codec.device_id(PATH) == "stamping.line-3.cell-a.press-01"
    assert codec.device_path("acme", "pune", codec.device_id(PATH)) == PATH
    assert codec.device_path("acme", "pune", "Press 7") is None  # not four slugs
    assert codec.device_path("acme", "pune", "a.b.c") is None
    assert codec.slug("Line 1/#A") == "line-1-a"
    assert codec.slug("###") == "x"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "tab\there"])
def test_a_sparkplug_id_has_no_topic_characters(bad: str) -> None:
    with pytest.raises(ValueError, match="Sparkplug id"):
        codec.check_id(bad, "group_id")


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        (codec.INT8, -3),
        (codec.INT16, -32768),
        (codec.INT32, -(2**31)),
        (codec.INT64, -(2**63)),
        (codec.UINT32, 2**32 - 1),
        (codec.UINT64, 2**64 - 1),
        (codec.BOOLEAN, False),
        (codec.STRING, "ü"),
        (codec.DOUBLE, 1e300),
    ],
)
def test_values_survive_the_wire(datatype: int, value: object) -> None:
    m = spb_pb2.Payload.Metric()
    codec.set_value(m, datatype, value)
    back = spb_pb2.Payload.Metric()
    back.ParseFromString(m.SerializeToString())
    assert codec.get_value(back, datatype) == value


def test_a_negative_small_int_reads_in_either_width() -> None:
    """Tahu (Java) sign-extends an Int8 to 32 bits, pysparkplug keeps 8: both are -3."""
    for raw in (0xFFFFFFFD, 0xFD):
        m = spb_pb2.Payload.Metric(int_value=raw)
        assert codec.get_value(m, codec.INT8) == -3


def test_a_value_out_of_its_type_is_refused() -> None:
    m = spb_pb2.Payload.Metric()
    with pytest.raises(codec.SparkplugError, match="does not fit Int8"):
        codec.set_value(m, codec.INT8, 200)
    wrong = spb_pb2.Payload.Metric(string_value="hot")
    with pytest.raises(codec.SparkplugError, match="Double in string_value"):
        codec.get_value(wrong, codec.DOUBLE)


@given(st.binary(max_size=300))
def test_hostile_bytes_are_a_sparkplug_error_or_a_payload(data: bytes) -> None:
    try:
        payload = codec.decode_payload(data)
    except codec.SparkplugError:
        return
    codec.bdseq_of(payload)
    for m in payload.metrics:
        codec.properties(m)
        for datatype in codec.FROM_SPARKPLUG:
            try:
                codec.get_value(m, datatype)
            except codec.SparkplugError:
                pass


@pytest.mark.parametrize(
    "raw", [b"", b"null", b"[]", b'{"online": 1, "timestamp": 2}', b'{"online": true}', b"\xff"]
)
def test_a_malformed_state_is_refused(raw: bytes) -> None:
    with pytest.raises(codec.SparkplugError):
        codec.decode_state(raw)
    assert codec.decode_state(codec.encode_state(True, 5)) == (True, 5)


def test_waveforms_are_mirrored_only_by_opt_in() -> None:
    defs = [
        MetricDef(name="vibration", datatype="waveform", rate_hz=4),
        MetricDef(name="t", datatype="double"),
    ]
    born = DeviceBirth(ts=1, node="a", device=str(PATH), bdseq=0, seq=0, metrics=defs)
    block = Waveform.from_values([0.5, -1.0], t0_us=2_000_000, rate_hz=4)
    data = DeviceData(ts=3, node="a", seq=1, metrics=[Metric(name="vibration", value=block)])
    for waveforms, names in ((False, ["raw/t"]), (True, ["raw/vibration", "raw/t"])):
        mirror = Mirror(waveforms=waveforms)
        mirror.birth(PATH, "raw", born)
        mirror.data(PATH, "raw", data)
        payload = codec.decode_payload(mirror.device_birth(mirror.devices[PATH], 1, 10))
        assert [m.name for m in payload.metrics] == names
    vib = payload.metrics[0]
    assert vib.datatype == codec.FLOAT_ARRAY and vib.timestamp == 2000
    assert Waveform(t0_us=0, rate_hz=1, samples=vib.bytes_value).values() == [0.5, -1.0]


@pytest.mark.parametrize(
    ("setting", "named"),
    [("group_id: 'acme/pune'", "group_id"), ("writable: [acme/pune/x]", "writable[0]")],
)
def test_a_bad_setting_exits_2_naming_it(tmp_path: Path, setting: str, named: str) -> None:
    config = tmp_path / "plant.yaml"
    config.write_text(
        "namespace: {enterprise: acme, site: pune}\n"
        f"services:\n  sparkplug: {{enabled: true, {setting}}}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "uns", "run", "sparkplug", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert named in r.stderr


async def test_the_adapter_drops_garbage_and_counts_it(memory_url: str) -> None:
    """Undecodable payloads, data before any birth, a wrong value type: dropped and counted,
    a rebirth asked for; the adapter goes on and takes the next edge node's births."""
    async with (
        watching(memory_url, "#") as w,
        running(SparkplugAdapter, memory_url, "acme", enabled=True) as node,
    ):
        await w.publish("spBv1.0/g/DDATA/e/d", b"\xff\xff\xff")
        stray = codec.new_payload(now_ms(), 3)
        await w.publish("spBv1.0/g/DDATA/e/d", bytes(stray.SerializeToString()))
        await w.wait_for(lambda m: m.topic == "spBv1.0/g/NCMD/e")
        nbirth = codec.new_payload(now_ms(), 0)
        bd = nbirth.metrics.add(name="bdSeq", datatype=codec.INT64, long_value=4)
        assert bd.long_value == 4
        await w.publish("spBv1.0/g/NBIRTH/e", bytes(nbirth.SerializeToString()))
        dbirth = codec.new_payload(now_ms(), 1)
        m = dbirth.metrics.add(name="t", alias=9, datatype=codec.DOUBLE, double_value=1.5)
        codec.add_property(m, "engUnit", "bar")
        await w.publish("spBv1.0/g/DBIRTH/e/d", bytes(dbirth.SerializeToString()))
        born = await w.next("acme/pune/sparkplug/g/e/d/raw/birth", DeviceBirth)
        assert [(d.name, d.datatype, d.unit) for d in born.metrics] == [("t", "double", "bar")]
        wrong = codec.new_payload(now_ms(), 2)
        wrong.metrics.add(alias=9, string_value="hot")
        await w.publish("spBv1.0/g/DDATA/e/d", bytes(wrong.SerializeToString()))
        good = codec.new_payload(now_ms(), 3)
        good.metrics.add(alias=9, double_value=2.5, timestamp=1234)
        await w.publish("spBv1.0/g/DDATA/e/d", bytes(good.SerializeToString()))
        await w.wait_for(lambda m: m.topic.endswith("raw/data") and b"2.5" in m.payload)
        registry = node.metrics.registry

        def dropped(reason: str) -> float | None:
            return registry.get_sample_value(
                "uns_sparkplug_adapter_dropped_total",
                {"service": "sparkplug-adapter", "reason": reason},
            )

        assert (dropped("decode"), dropped("no_birth"), dropped("value")) == (1, 1, 1)


def test_a_producer_nodes_death_is_its_streams_death() -> None:
    """The namespace node that was born the stream dies: its metrics go bad, and with the
    device's last stream gone the device is dead (DDEATH); another bdSeq is another life."""
    mirror = Mirror()
    defs = [MetricDef(name="t", datatype="double")]
    mirror.birth(
        PATH,
        "raw",
        DeviceBirth(ts=1, node="opcua-adapter", device=str(PATH), bdseq=3, seq=0, metrics=defs),
    )
    assert mirror.node_death("opcua-adapter", 2) == []
    assert mirror.node_death("opcua-adapter", 3) == [(PATH, "raw")]
    gone, updates = mirror.death(PATH, "raw", "node opcua-adapter lost")
    assert gone
    assert [(name, v.quality, v.reason) for name, v in updates] == [
        ("raw/t", "bad", "node opcua-adapter lost")
    ]


async def test_the_edge_node_survives_garbage_commands_and_wraps_its_seq(memory_url: str) -> None:
    """Undecodable NCMD and DCMD: counted, nothing else; seq runs 0..255 and wraps to 0;
    a rebirth request after all that is still obeyed."""
    from uns_sparkplug.north import SparkplugNode

    press = str(PATH)
    async with watching(memory_url, "#") as w:
        defs = [MetricDef(name="t", datatype="double")]
        born = DeviceBirth(ts=1, node="a", device=press, bdseq=0, seq=0, metrics=defs)
        await w.publish(f"{press}/raw/birth", born, retain=True)
        async with running(SparkplugNode, memory_url, "acme", enabled=True) as node:
            await w.wait_for(
                lambda m: m.topic == "spBv1.0/acme/DBIRTH/pune/" + codec.device_id(PATH)
            )
            await w.publish("spBv1.0/acme/NCMD/pune", b"\xff\xff\xff")
            await w.publish("spBv1.0/acme/DCMD/pune/x.y.z.w", b"\xff\xff\xff")
            for i in range(300):
                data = DeviceData(ts=now_ms(), node="a", seq=1, metrics=[Metric(name="t", value=i)])
                await w.publish(f"{press}/raw/data", data)
            last = await w.wait_for(
                lambda m: (
                    "/DDATA/" in m.topic
                    and codec.decode_payload(m.payload).metrics[0].double_value == 299
                )
            )
            seqs = [
                codec.decode_payload(m.payload).seq
                for m in w.messages
                if m.topic.split("/")[2] in ("NBIRTH", "DBIRTH", "DDATA", "DDEATH")
            ]
            assert seqs == [i % 256 for i in range(len(seqs))]  # NBIRTH 0, DBIRTH 1, DDATA ...
            assert codec.decode_payload(last.payload).seq == (len(seqs) - 1) % 256
            await w.publish("spBv1.0/acme/NCMD/pune", codec.rebirth_request(now_ms()))
            again = await w.wait_for(lambda m: m.topic == "spBv1.0/acme/NBIRTH/pune")
            assert codec.decode_payload(again.payload).seq == 0
            refused = node.metrics.registry.get_sample_value(
                "uns_sparkplug_writes_refused_total", {"service": "sparkplug", "reason": "decode"}
            )
            assert refused == 2
