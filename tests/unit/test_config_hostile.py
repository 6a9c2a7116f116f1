"""Config values an integrator gets subtly wrong: each is refused by the loader, naming the
field and where the value came from (the file or the variable), never echoing a secret."""

from __future__ import annotations

import re

import msgspec
import pytest

from uns import ConfigError, load
from uns.config import DevicePathText, describe, parse_broker_url, redact_url
from uns.topics import DevicePath, TopicError
from uns_demo import DemoSettings
from uns_modbus_adapter import ModbusAdapterSettings
from uns_simulator import SimulatorSettings

PRESS = "acme/pune/stamping/line-3/cell-a/press-01"
PLANT = f"plant:\n  devices:\n    - {{path: {PRESS}, asset: press}}\n"
REG = "registers: [{name: t, table: holding, address: 0}]"


def write(tmp_path, text):
    f = tmp_path / "plant.yaml"
    f.write_text(text)
    return f


# ---- a trailing newline is not a slug (Python's `$` matches before a final "\n") ---------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('namespace: {enterprise: "acme\\n"}\n', "namespace.enterprise"),
        ('namespace: {site: "pune\\n"}\n', "namespace.site"),
        (
            f'plant:\n  devices:\n    - {{path: "{PRESS}\\n", asset: press}}\n',
            "plant.devices[0].path",
        ),
        (
            f'plant:\n  devices:\n    - {{path: {PRESS}, asset: "press\\n"}}\n',
            "plant.devices[0].asset",
        ),
    ],
    ids=["enterprise", "site", "device-path", "asset"],
)
def test_a_trailing_newline_in_a_namespace_level_is_refused_naming_the_field(tmp_path, text, field):
    f = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: .*\(from {f}\)"):
        load(f, environ={})


def test_a_trailing_newline_in_a_node_id_is_refused(tmp_path):
    f = write(tmp_path, 'services:\n  demo: {node_id: "demo\\n"}\n')
    with pytest.raises(ConfigError, match=r"^services.demo.node_id: "):
        load(f, environ={}).service("demo", DemoSettings)


def test_a_trailing_newline_in_a_modbus_device_path_is_refused(tmp_path):
    f = write(
        tmp_path,
        f"{PLANT}services:\n  modbus-adapter:\n    devices:\n"
        f'      - {{path: "{PRESS}\\n", unit_id: 1, {REG}}}\n',
    )
    with pytest.raises(ConfigError, match=r"^services.modbus-adapter.devices\[0\].path: "):
        load(f, environ={}).service("modbus-adapter", ModbusAdapterSettings)


def test_a_slug_still_takes_every_valid_level(tmp_path):
    f = write(tmp_path, f"namespace: {{enterprise: acme, site: pune}}\n{PLANT}")
    loaded = load(f, environ={})
    assert [d.path for d in loaded.config.plant.devices] == [PRESS]


# ---- device paths belong to this edge box's namespace and plant ---------------------------


@pytest.mark.parametrize(
    "path",
    ["globex/pune/stamping/line-3/cell-a/press-09", "acme/delhi/stamping/line-3/cell-a/press-09"],
    ids=["other-enterprise", "other-site"],
)
def test_a_plant_device_of_another_enterprise_or_site_is_refused(tmp_path, path):
    f = write(tmp_path, f"{PLANT}    - {{path: {path}, asset: press}}\n")
    with pytest.raises(ConfigError, match=r"^plant.devices\[1\].path: .*acme/pune") as err:
        load(f, environ={})
    assert str(f) in str(err.value)


def test_a_namespace_from_a_variable_that_disowns_the_plant_names_the_variable(tmp_path):
    f = write(tmp_path, PLANT)
    with pytest.raises(ConfigError, match=r"^plant.devices\[0\].path: ") as err:
        load(f, environ={"UNS_NAMESPACE__SITE": "delhi"})
    assert "UNS_NAMESPACE__SITE" in str(err.value)


@pytest.mark.parametrize(
    ("devices", "field", "why"),
    [
        ("[acme/pune/press-01]", r"services.simulator.devices\[0\]", "a device path"),
        (f'["{PRESS}\\n"]', r"services.simulator.devices\[0\]", "a device path"),
        (
            f"[{PRESS}, acme/pune/stamping/line-3/cell-a/press-77]",
            r"services.simulator.devices\[1\]",
            "not a device of plant.devices",
        ),
    ],
    ids=["not-a-path", "trailing-newline", "not-in-the-plant"],
)
def test_simulator_devices_must_be_device_paths_of_the_plant(tmp_path, devices, field, why):
    f = write(tmp_path, f"{PLANT}services:\n  simulator:\n    devices: {devices}\n")
    with pytest.raises(ConfigError, match=rf"^{field}: .*{why}.*\(from {f}\)"):
        load(f, environ={}).service("simulator", SimulatorSettings)


def test_simulator_devices_of_the_plant_are_taken(tmp_path):
    f = write(tmp_path, f"{PLANT}services:\n  simulator:\n    devices: [{PRESS}]\n")
    assert load(f, environ={}).service("simulator", SimulatorSettings).devices == [PRESS]


def test_a_service_device_path_outside_the_namespace_is_refused(tmp_path):
    other = "globex/pune/stamping/line-3/cell-a/press-01"
    f = write(
        tmp_path,
        f"{PLANT}services:\n  demo: {{device: {other}}}\n"
        f"  modbus-adapter:\n    devices:\n      - {{path: {PRESS}, unit_id: 1, {REG}}}\n"
        f"      - {{path: {other}, unit_id: 2, {REG}}}\n",
    )
    loaded = load(f, environ={})
    with pytest.raises(ConfigError, match=r"^services.demo.device: .*acme/pune"):
        loaded.service("demo", DemoSettings)
    with pytest.raises(ConfigError, match=r"^services.modbus-adapter.devices\[1\].path: "):
        loaded.service("modbus-adapter", ModbusAdapterSettings)


# ---- a broken broker URL never shows its password ------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://edge:hunter2@broker:1883",
        "mqtt://edge:hunter2@:1883",
        "mqtt://edge:hunter2@broker:99999",
        "mqtt://edge:hunter2@[::1:1883",
        "mqtt://edge:hunter2@broker:port",
    ],
    ids=["scheme", "no-host", "port-range", "bad-ipv6", "port-text"],
)
def test_a_malformed_broker_url_is_refused_without_echoing_its_password(tmp_path, url):
    with pytest.raises(ConfigError) as err:
        parse_broker_url(url)
    assert "hunter2" not in str(err.value) and "edge:***@" in str(err.value)
    f = write(tmp_path, f"broker:\n  url: '{url}'\n")
    with pytest.raises(ConfigError, match=r"^broker.url: ") as err:
        load(f, environ={})
    assert "hunter2" not in str(err.value) and "edge:***@" in str(err.value)


def test_redacting_a_url_keeps_everything_but_the_password():
    assert redact_url("mqtts://edge:s3cr%40t@broker.plant:8883/x") == (
        "mqtts://edge:***@broker.plant:8883/x"
    )
    assert redact_url("mqtt://edge@broker:1883") == "mqtt://edge@broker:1883"
    assert redact_url("mqtt://broker:1883") == "mqtt://broker:1883"
    assert redact_url("mqtt://a:b@c@broker") == "mqtt://a:***@broker"


# ---- errors name the variable that set the value, not the file -----------------------------


@pytest.mark.parametrize(
    ("environ", "field", "var"),
    [
        ({"UNS_NAMESPACE__SITES": "pune"}, "namespace", "UNS_NAMESPACE__SITES"),
        (
            {"UNS_NAMESPACE__ENTERPRISE": '"acme\\n"'},
            "namespace.enterprise",
            "UNS_NAMESPACE__ENTERPRISE",
        ),
        ({"UNS_BROKER__URL": "mqtt://u:pw@:1"}, "broker.url", "UNS_BROKER__URL"),
        ({"UNS_BROKER__CERT_FILE": "/x.pem"}, "broker", "UNS_BROKER__CERT_FILE"),
    ],
    ids=["unknown-field", "bad-slug", "bad-url", "section-check"],
)
def test_an_error_in_a_value_from_a_variable_names_the_variable(tmp_path, environ, field, var):
    f = write(tmp_path, "broker: {keepalive_s: 30}\n")
    with pytest.raises(ConfigError, match=rf"^{field}: ") as err:
        load(f, environ=environ)
    assert f"environment variable {var}" in str(err.value)


def test_an_error_in_a_service_section_from_a_variable_names_the_variable(tmp_path):
    f = write(tmp_path, "services:\n  demo: {interval_s: 1}\n")
    loaded = load(f, environ={"UNS_SERVICES__DEMO__INTERVALL_S": "2"})
    with pytest.raises(ConfigError, match=r"^services.demo: .*unknown field") as err:
        loaded.service("demo", DemoSettings)
    assert "environment variable UNS_SERVICES__DEMO__INTERVALL_S" in str(err.value)
    assert str(f) not in str(err.value)


def test_an_error_in_a_value_from_the_file_still_names_the_file(tmp_path):
    f = write(tmp_path, "namespace: {sites: pune}\n")
    with pytest.raises(ConfigError, match=rf"^namespace: .*\(from {f}\)"):
        load(f, environ={"UNS_NAMESPACE__ENTERPRISE": "acme"})


# ---- messages say what is wrong ---------------------------------------------------------


class _Keyed(msgspec.Struct):
    devices: dict[DevicePathText, str] = {}


def test_a_bad_dictionary_key_is_named_by_its_field():
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.convert({"devices": {"press-01": "x"}}, _Keyed)
    assert describe(err.value, "services.inference").startswith("services.inference.devices: ")


def test_a_short_device_path_says_how_many_levels_it_has():
    with pytest.raises(TopicError, match="got 3"):
        DevicePath.parse("acme/pune/press-01")
