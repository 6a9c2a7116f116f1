import json
from pathlib import Path

import msgspec
import pytest

from uns import (
    Command,
    DeviceBirth,
    DeviceData,
    Event,
    Metric,
    MetricDef,
    NodeBirth,
    PayloadError,
    Waveform,
    decode,
    encode,
    schema,
)
from uns import payloads as p

EXAMPLES = sorted((Path(__file__).parents[2] / "uns-schema" / "examples").glob("*.json"))


def test_there_are_examples_of_every_payload_type():
    kinds = {json.loads(f.read_text())["type"] for f in EXAMPLES}
    assert kinds == {
        "nbirth",
        "ndeath",
        "dbirth",
        "ddata",
        "ddeath",
        "event",
        "cmd",
        "reply",
        "health",
        "oee",
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda f: f.name)
def test_every_example_payload_decodes_and_survives_a_round_trip(example):
    payload = decode(example.read_bytes())
    assert type(payload).__struct_config__.tag == json.loads(example.read_text())["type"]
    assert decode(encode(payload)) == payload


def test_the_waveform_example_carries_its_samples_compactly():
    data = decode((EXAMPLES[0].parent / "ddata-waveform.json").read_bytes(), DeviceData)
    block = data.metrics[0].value
    assert isinstance(block, Waveform)
    assert len(block) == 6
    assert block.values() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])


def test_a_waveform_block_of_a_thousand_samples_is_one_small_message():
    values = [((i * 37) % 200 - 100) / 10 for i in range(1000)]
    block = Waveform.from_values(values, t0_us=1, rate_hz=10_000.0, block=3)
    msg = encode(DeviceData(ts=1, node="n", seq=0, metrics=[Metric(name="vibration", value=block)]))
    assert len(msg) < 5600  # float32 + base64, versus ~6,000+ bytes of decimals
    decoded = decode(msg, DeviceData).metrics[0].value
    assert decoded.values() == pytest.approx(values, abs=1e-5)
    assert decoded.block == 3


def test_int16_waveforms_keep_their_scale():
    block = Waveform.from_values([100, -200, 300], t0_us=0, rate_hz=1.0, dtype="i16", scale=0.01)
    assert decode(
        encode(DeviceData(ts=1, node="n", seq=0, metrics=[Metric(name="w", value=block)])),
        DeviceData,
    ).metrics[0].value.values() == pytest.approx([1.0, -2.0, 3.0])


def test_a_type_error_says_where_it_is():
    bad = (
        b'{"type":"ddata","ts":1,"node":"n","seq":1,"metrics":[{"name":"a","value":1},'
        b'{"name":"b","value":[1,2]}]}'
    )
    with pytest.raises(PayloadError, match=r"at `\$\.metrics\[1\]\.value`"):
        decode(bad)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not json",
        b"{}",
        b'{"type":"nope","ts":1}',
        b"\xff\xfe",
        b"[1,2,3]",
        b'{"type":"ddata","ts":"yesterday","node":"n","seq":1,"metrics":[]}',
    ],
)
def test_garbage_is_a_payload_error_never_a_crash(garbage):
    with pytest.raises(PayloadError):
        decode(garbage)


def test_a_quality_outside_good_uncertain_bad_is_refused():
    with pytest.raises(PayloadError, match="quality"):
        decode(
            b'{"type":"ddata","ts":1,"node":"n","seq":1,"metrics":'
            b'[{"name":"a","value":1,"quality":"meh"}]}'
        )


def test_a_message_from_a_newer_producer_with_extra_fields_still_decodes():
    newer = (
        b'{"type":"ddata","v":2,"ts":1,"node":"n","seq":1,"lineage":{"start":0},'
        b'"metrics":[{"name":"a","value":1,"confidence":0.9}]}'
    )
    data = decode(newer, DeviceData)
    assert data.v == 2 and data.metrics[0].value == 1


def test_a_message_without_a_schema_version_is_version_one():
    assert decode(b'{"type":"cmd","ts":1,"name":"rebirth"}', Command).v == 1


def test_a_consumer_can_ask_for_one_type_and_refuse_the_others():
    with pytest.raises(PayloadError):
        decode(encode(Command(ts=1, name="rebirth")), DeviceData)


def test_sequence_numbers_wrap_after_255():
    assert p.next_seq(254) == 255
    assert p.next_seq(255) == 0


def test_payloads_are_immutable():
    birth = NodeBirth(ts=1, node="n", service="s", bdseq=0)
    with pytest.raises(AttributeError):
        birth.bdseq = 1  # type: ignore[misc]


def test_metric_definitions_omit_what_is_not_set():
    text = encode(
        DeviceBirth(
            ts=1,
            node="n",
            device="a/b/c/d/e/f",
            bdseq=0,
            seq=1,
            metrics=[MetricDef(name="t", datatype="float", unit="degC")],
        )
    )
    assert json.loads(text)["metrics"] == [{"name": "t", "datatype": "float", "unit": "degC"}]


def test_events_default_to_one_breach_and_warning_severity():
    e = Event(ts=1, id="x", kind="anomaly", state="raised", device="a/b/c/d/e/f", started=1)
    assert (e.count, e.severity) == (1, "warning")


def test_the_checked_in_json_schemas_match_the_code():
    assert schema.stale() == [], "run `uns schema export` and commit uns-schema/"


def test_the_json_schema_describes_every_message_type():
    text = json.dumps(p.json_schema())
    for tag in ("nbirth", "ndeath", "dbirth", "ddata", "ddeath", "event", "cmd"):
        assert f'"{tag}"' in text


def test_the_exported_schema_accepts_the_examples():
    jsonschema = pytest.importorskip("jsonschema")
    s = p.json_schema()
    for example in EXAMPLES:
        jsonschema.validate(json.loads(example.read_text()), s)


def test_stale_schema_files_are_detected(tmp_path):
    schema.export(tmp_path)
    assert schema.stale(tmp_path) == []
    f = tmp_path / "payload.schema.json"
    f.write_text(f.read_text().replace('"ddata"', '"ddata2"'))
    assert schema.stale(tmp_path) == ["payload.schema.json"]


def test_builtins_of_a_payload_are_plain_json():
    data = DeviceData(ts=1, node="n", seq=0, metrics=[Metric(name="a", value=1.5)])
    assert (
        msgspec.json.decode(msgspec.json.encode(p.to_builtins(data)))["metrics"][0]["value"] == 1.5
    )
