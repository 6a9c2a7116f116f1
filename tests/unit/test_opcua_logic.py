"""The OPC UA adapter's pure parts: quality, the tag map and its errors, values, waveforms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from uns import ConfigError, Waveform
from uns.config import load
from uns_opcua_adapter import OpcUaAdapterSettings, Tag
from uns_opcua_adapter.logic import (
    BlockClock,
    BrowsedObject,
    BrowsedVariable,
    Change,
    TagPlan,
    queue_size,
    scalar_metric,
    starter_config,
    status_quality,
    waveform_metric,
)
from uns_opcua_adapter.settings import read_secrets
from uns_opcua_adapter.ua import status_name

PATH = "acme/pune/stamping/line-3/cell-a/press-01"


def settings(tmp_path: Path, section: str) -> OpcUaAdapterSettings:
    """``services.opcua-adapter`` from a YAML file, the way ``uns run`` reads it."""
    file = tmp_path / "plant.yaml"
    body = "\n".join("    " + line for line in section.strip("\n").splitlines())
    file.write_text(f"services:\n  opcua-adapter:\n{body}\n")
    return load(file, environ={}).service("opcua-adapter", OpcUaAdapterSettings)


def config_error(tmp_path: Path, section: str) -> str:
    with pytest.raises(ConfigError) as err:
        settings(tmp_path, section)
    return str(err.value)


# ---- quality ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "quality", "reason"),
    [
        (0x00000000, "good", None),
        (0x00000480, "good", None),  # Good with the overflow info bits
        (0x002D0000, "good", None),  # GoodNoData
        (0x40900000, "uncertain", "UncertainLastUsableValue"),
        (0x40930000, "uncertain", "UncertainSensorNotAccurate"),
        (0x80050000, "bad", "BadCommunicationError"),
        (0x80050480, "bad", "BadCommunicationError"),  # info bits do not change the name
        (0x80340000, "bad", "BadNodeIdUnknown"),
        (0x808C0000, "bad", "BadSensorFailure"),
        (0x80320000, "bad", "BadWaitingForInitialData"),
    ],
)
def test_a_status_code_maps_to_good_uncertain_or_bad_with_its_name_as_the_reason(
    code: int, quality: str, reason: str | None
) -> None:
    assert status_quality(code, status_name(code)) == (quality, reason)


# ---- the tag map --------------------------------------------------------------------------------

PRESSES = """
publishing_interval_ms: 250
templates:
  press:
    - {name: bearing_temp, node: "{prefix}.BearingTemp", unit: degC, low: 0, high: 150}
    - {name: stroke_count, node: "{prefix}.StrokeCount", datatype: uint32, sampling_ms: 1000}
    - {name: vibration, node: "{prefix}.Vibration", datatype: waveform, rate_hz: 10000}
devices:
  - path: acme/pune/stamping/line-3/cell-a/press-01
    template: press
    prefix: ns=3;s="DB_Press01"
  - path: acme/pune/stamping/line-3/cell-a/press-02
    template: press
    prefix: ns=3;s="DB_Press02"
    tags:
      - {name: oil_level, node: /Objects/3:Press02/3:OilLevel, unit: "%", deadband: 0.5}
"""


def test_templates_expand_per_device_with_prefix_substituted_and_own_tags_after(
    tmp_path: Path,
) -> None:
    plan = settings(tmp_path, PRESSES).plan()
    assert [str(d.path) for d in plan] == [PATH, PATH.replace("press-01", "press-02")]
    first, second = plan
    assert [(t.name, t.node) for t in first.tags] == [
        ("bearing_temp", 'ns=3;s="DB_Press01".BearingTemp'),
        ("stroke_count", 'ns=3;s="DB_Press01".StrokeCount'),
        ("vibration", 'ns=3;s="DB_Press01".Vibration'),
    ]
    assert [t.node for t in second.tags] == [
        'ns=3;s="DB_Press02".BearingTemp',
        'ns=3;s="DB_Press02".StrokeCount',
        'ns=3;s="DB_Press02".Vibration',
        "/Objects/3:Press02/3:OilLevel",
    ]
    # sampling defaults to the publishing interval, for a waveform to every change (0: a
    # timer at the block period misses blocks); the birth says where each value comes from
    assert [t.sampling_ms for t in second.tags] == [250, 1000, 0, 250]
    birth = first.tags[0].metric_def('ns=3;s="DB_Press01".BearingTemp')
    assert (birth.unit, birth.low, birth.high, birth.source) == (
        "degC",
        0.0,
        150.0,
        'opcua:ns=3;s="DB_Press01".BearingTemp',
    )
    assert first.tags[2].metric_def().rate_hz == 10000.0


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "devices: [{path: " + PATH + ", template: robot, tags: []}]\n"
            "templates: {press: [{name: t, node: ns=2;s=T}]}",
            f"services.opcua-adapter: devices[0] ({PATH}): unknown template 'robot'"
            " (templates: press)",
        ),
        (
            "templates: {press: [{name: temp, node: ns=2;s=A}]}\n"
            "devices:\n"
            "  - {path: " + PATH + ", template: press, tags: [{name: temp, node: ns=2;s=B}]}",
            f"services.opcua-adapter: devices[0] ({PATH}): duplicate metric name 'temp'",
        ),
        (
            "devices: [{path: " + PATH + ", tags: [{name: a, node: ns=2;s=A}, {name: b,"
            " node: ns=2;x=B}]}]",
            f"services.opcua-adapter: devices[0] ({PATH}), tags[1] (tag 'b'): node 'ns=2;x=B'"
            " is not a NodeId",
        ),
        (
            "templates: {press: [{name: temp, node: '{prefix}.Temp'}]}\n"
            "devices: [{path: " + PATH + ", template: press, prefix: 'Press01'}]",
            f"services.opcua-adapter: devices[0] ({PATH}), tag 'temp' with prefix 'Press01':"
            " node 'Press01.Temp' is not a NodeId",
        ),
        (
            "templates: {press: [{name: vib, node: ns=2;s=V, datatype: waveform}]}",
            "services.opcua-adapter: templates.press[0] (tag 'vib'): datatype 'waveform' needs"
            " rate_hz",
        ),
        (
            "devices: [{path: " + PATH + ", tags: [{name: active, node: ns=2;s=On, datatype: bool,"
            " deadband: 1}]}]",
            f"services.opcua-adapter: devices[0] ({PATH}), tags[0] (tag 'active'): deadband"
            " applies to numeric datatypes only",
        ),
        (
            "devices: [{path: " + PATH + ", tags: [{name: t, node: /Objects/2:A&B}]}]",
            f"services.opcua-adapter: devices[0] ({PATH}), tags[0] (tag 't'): node"
            " '/Objects/2:A&B' is not a browse path",
        ),
        (
            "devices: [{path: " + PATH + "}]",
            f"services.opcua-adapter: devices[0] ({PATH}): no tags",
        ),
        (
            "security: {mode: sign_encrypt, certificate: client.der}",
            "services.opcua-adapter.security: private_key required when mode is 'sign_encrypt'",
        ),
        (
            "url: http://plc:4840",
            "services.opcua-adapter: url: 'http://plc:4840' is not an OPC UA URL",
        ),
        (
            "devices: [{path: " + PATH + ", tags: [{name: t, node: ns=2;s=T, scale: 2}]}]",
            "services.opcua-adapter.devices[0].tags[0]: Object contains unknown field `scale`",
        ),
    ],
)
def test_a_config_error_names_the_entry_before_anything_connects(
    tmp_path: Path, section: str, message: str
) -> None:
    assert config_error(tmp_path, section).startswith(message)


def test_an_unreadable_certificate_or_password_file_names_its_field(tmp_path: Path) -> None:
    s = settings(tmp_path, "username: edge\npassword_file: /nonexistent/secret")
    with pytest.raises(ConfigError, match=r"^services\.opcua-adapter\.password_file: cannot read"):
        read_secrets(s)
    (tmp_path / "client.der").write_bytes(b"not a certificate")
    (tmp_path / "client.key").write_bytes(b"not a key")
    s = settings(
        tmp_path,
        f"security: {{mode: sign, certificate: {tmp_path}/client.der,"
        f" private_key: {tmp_path}/client.key}}",
    )
    with pytest.raises(ConfigError, match=r"security: certificate: not a PEM or DER certificate"):
        read_secrets(s)


def test_the_default_section_is_valid_and_has_no_devices() -> None:
    s = msgspec.convert({}, OpcUaAdapterSettings)
    assert (s.url, s.publishing_interval_ms, s.security.mode, s.plan()) == (
        "opc.tcp://127.0.0.1:4840",
        100,
        "none",
        [],
    )


# ---- values -------------------------------------------------------------------------------------


def tag(datatype: Any = "double", **kw: Any) -> TagPlan:
    return TagPlan(name="x", node="ns=2;s=X", datatype=datatype, **kw)


def change(value: Any, code: int = 0, ts_us: int = 1_700_000_000_123_456, **kw: Any) -> Change:
    return Change(
        handle=1, value=value, status=code, status_name=status_name(code), ts_us=ts_us, **kw
    )


@pytest.mark.parametrize(
    ("datatype", "value", "expected"),
    [
        ("double", 1, 1.0),
        ("float", 2.5, 2.5),
        ("uint32", 7.0, 7),
        ("uint32", 2**32 - 1, 2**32 - 1),
        ("int16", -5, -5),
        ("bool", 1, True),
        ("bool", False, False),
        ("string", "run", "run"),
        ("string", 42, "42"),
    ],
)
def test_a_value_becomes_a_metric_of_the_configured_datatype_with_its_source_timestamp(
    datatype: Any, value: Any, expected: Any
) -> None:
    metric, ok = scalar_metric(tag(datatype), change(value))
    assert ok and metric.value == expected and type(metric.value) is type(expected)
    assert (metric.ts, metric.quality, metric.reason) == (1_700_000_000_123, "good", None)


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("uint8", 256),
        ("uint32", -1),
        ("int32", 1.5),
        ("bool", 2),
        ("double", "hot"),
        ("double", [1.0]),
    ],
)
def test_a_value_that_does_not_fit_the_datatype_is_published_bad_not_guessed(
    datatype: Any, value: Any
) -> None:
    metric, ok = scalar_metric(tag(datatype), change(value))
    assert not ok
    assert (metric.value, metric.quality, metric.reason) == (None, "bad", "BadTypeMismatch")


def test_a_bad_value_keeps_the_servers_reason() -> None:
    metric, ok = scalar_metric(tag(), change(None, 0x80050000))
    assert ok and (metric.value, metric.quality, metric.reason) == (
        None,
        "bad",
        "BadCommunicationError",
    )


# ---- waveforms ----------------------------------------------------------------------------------


def test_an_array_value_becomes_one_waveform_block_timed_by_its_source_timestamp() -> None:
    values = [float(i) / 8 for i in range(1000)]
    metric, numbered = waveform_metric(
        tag("waveform", rate_hz=10_000.0),
        change(values, ts_us=1_700_000_000_000_250),
        BlockClock(next=41),
    )
    assert numbered is not None and numbered.skipped == 0
    wave = metric.value
    assert isinstance(wave, Waveform)
    assert (wave.t0_us, wave.rate_hz, wave.block, wave.dtype, len(wave)) == (
        1_700_000_000_000_250,
        10_000.0,
        41,
        "f32",
        1000,
    )
    assert wave.values() == values  # every sample, in order
    assert (metric.ts, metric.quality) == (1_700_000_000_000, "good")


def test_a_double_array_keeps_double_precision_in_its_block() -> None:
    metric, _ = waveform_metric(
        tag("waveform", rate_hz=100.0), change([0.1, 0.2], dtype="f64"), BlockClock()
    )
    assert isinstance(metric.value, Waveform)
    assert (metric.value.dtype, metric.value.values()) == ("f64", [0.1, 0.2])


def test_a_bad_array_value_is_published_bad_and_uses_no_block_number() -> None:
    clock = BlockClock(next=3)
    metric, missed = waveform_metric(
        tag("waveform", rate_hz=100.0), change(None, 0x80050000), clock
    )
    assert missed is None and (metric.value, metric.reason) == (None, "BadCommunicationError")
    metric, missed = waveform_metric(tag("waveform", rate_hz=100.0), change(1.5), clock)
    assert missed is None and metric.reason == "BadTypeMismatch"
    assert clock.next == 3  # neither used a block number


@pytest.mark.parametrize(
    ("publishing", "sampling", "size"),
    [(100, 100, 10), (100, 10, 20), (100, 0, 200), (1000, 1, 1000)],
)
def test_the_server_queue_holds_two_publishing_cycles_of_samples(
    publishing: int, sampling: int, size: int
) -> None:
    assert queue_size(publishing, sampling) == size


# ---- the starter config of `uns opcua browse` ---------------------------------------------------


def test_the_starter_config_has_a_device_per_object_and_loads_as_a_config_as_it_is() -> None:
    objects = [
        BrowsedObject(
            name="Press 01",
            node="ns=2;s=Press01",
            path="/Objects/2:Plant/2:Press 01",
            variables=[
                BrowsedVariable(
                    "BearingTemp",
                    "ns=2;s=Press01.BearingTemp",
                    "Double",
                    unit="°C",
                    low=0.0,
                    high=150.0,
                ),
                BrowsedVariable("Running", "ns=2;s=Press01.Running", "Boolean"),
                BrowsedVariable("Vibration", "ns=2;s=Press01.Vibration", "Float", is_array=True),
                BrowsedVariable("LastService", "ns=2;s=Press01.LastService", "DateTime"),
            ],
        ),
        BrowsedObject(
            "Empty",
            "ns=2;s=Empty",
            "/Objects/2:Empty",
            [BrowsedVariable("Blob", "ns=2;s=Blob", "ByteString")],
        ),
    ]
    text = starter_config("opc.tcp://plc:4840", objects, enterprise="acme", site="pune")
    assert "ns=2;s=Press01.LastService (DateTime)" in text  # skipped, and said so
    section = msgspec.yaml.decode(text)["services"]["opcua-adapter"]
    [device] = section["devices"]
    assert device["path"] == "acme/pune/area/line/cell/press-01"
    assert device["tags"][0] == {
        "name": "bearing_temp",
        "node": "ns=2;s=Press01.BearingTemp",
        "datatype": "double",
        "unit": "degC",
        "low": 0.0,
        "high": 150.0,
    }
    assert [(t["name"], t["datatype"]) for t in device["tags"][1:]] == [
        ("running", "bool"),
        ("vibration", "waveform"),
    ]
    # the output loads as it is: the rate the server does not give is a marked placeholder
    assert "rate_hz: 1000  # PLACEHOLDER" in text
    assert device["tags"][2]["rate_hz"] == 1000
    assert len(msgspec.convert(section, OpcUaAdapterSettings).plan()[0].tags) == 3


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(ValueError, match=r"templates\.press\[0\] \(tag 'vib'\): .* needs rate_hz"):
        OpcUaAdapterSettings(
            templates={"press": [Tag(name="vib", node="ns=2;s=V", datatype="waveform")]}
        )
