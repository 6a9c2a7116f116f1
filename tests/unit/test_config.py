import subprocess
import sys

import pytest

from uns import ConfigError, load
from uns.config import EXAMPLE_CONFIG, parse_broker_url
from uns_demo import DemoSettings


def write(tmp_path, text):
    f = tmp_path / "plant.yaml"
    f.write_text(text)
    return f


def test_the_example_plant_is_the_default_and_has_six_machines():
    loaded = load(environ={})
    assert loaded.path == EXAMPLE_CONFIG
    devices = [d.path for d in loaded.config.plant.devices]
    assert "acme/pune/stamping/line-3/cell-a/press-01" in devices
    assert len(devices) == 6


def test_an_unknown_field_is_refused_by_name(tmp_path):
    f = write(tmp_path, "namespace:\n  enterprise: acme\n  sight: pune\n")
    with pytest.raises(ConfigError, match=r"namespace: .*unknown field `sight`"):
        load(f, environ={})


def test_a_bad_slug_names_the_field_and_the_file(tmp_path):
    f = write(tmp_path, "namespace:\n  enterprise: ACME Corp\n")
    with pytest.raises(ConfigError, match=rf"namespace.enterprise: .*\(from {f}\)"):
        load(f, environ={})


def test_a_bad_device_path_names_the_list_entry(tmp_path):
    f = write(
        tmp_path,
        "plant:\n  devices:\n    - {path: acme/pune/x/y/z/dev-1, asset: press}\n"
        "    - {path: acme/pune/press-02, asset: press}\n",
    )
    with pytest.raises(ConfigError, match=r"plant.devices\[1\].path"):
        load(f, environ={})


def test_environment_variables_override_the_file(tmp_path):
    f = write(
        tmp_path, "broker:\n  url: mqtt://10.0.0.5:1883\nservices:\n  demo:\n    interval_s: 2\n"
    )
    loaded = load(
        f,
        environ={
            "UNS_BROKER__URL": "mqtt://127.0.0.1:2883",
            "UNS_SERVICES__DEMO__INTERVAL_S": "0.5",
        },
    )
    assert loaded.config.broker.url == "mqtt://127.0.0.1:2883"
    assert loaded.service("demo", DemoSettings).interval_s == 0.5


def test_a_bad_environment_value_names_the_variable(tmp_path):
    f = write(tmp_path, "")
    loaded = load(f, environ={"UNS_SERVICES__DEMO__INTERVAL_S": "fast"})
    with pytest.raises(
        ConfigError, match=r"services.demo.interval_s: .*UNS_SERVICES__DEMO__INTERVAL_S"
    ):
        loaded.service("demo", DemoSettings)


def test_variables_of_the_command_line_are_not_config_fields(tmp_path):
    f = write(tmp_path, "")
    loaded = load(f, environ={"UNS_BROKER_URL": "mqtt://x:1", "UNS_DATASETS": "../shared/data"})
    assert loaded.config.broker.url == "mqtt://127.0.0.1:1883"


def test_a_service_section_rejects_unknown_fields(tmp_path):
    f = write(tmp_path, "services:\n  demo:\n    intervall_s: 1\n")
    with pytest.raises(ConfigError, match=r"services.demo: .*unknown field `intervall_s`"):
        load(f, environ={}).service("demo", DemoSettings)


def test_an_out_of_range_value_is_refused(tmp_path):
    f = write(tmp_path, "services:\n  demo:\n    interval_s: -1\n")
    with pytest.raises(ConfigError, match=r"services.demo.interval_s: Expected `float` > 0"):
        load(f, environ={}).service("demo", DemoSettings)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://broker:1883", "not a broker URL"),
        ("mqtt://:1883", "no host"),
        ("mqtt://host:99999", "invalid port"),
    ],
)
def test_a_bad_broker_url_is_refused(tmp_path, url, why):
    f = write(tmp_path, f"broker:\n  url: {url}\n")
    with pytest.raises(ConfigError, match=f"broker.url: .*{why}"):
        load(f, environ={})


def test_broker_urls_carry_defaults_and_credentials():
    u = parse_broker_url("mqtts://edge:s3cr%40t@broker.plant")
    assert (u.host, u.port, u.tls, u.username, u.password) == (
        "broker.plant",
        8883,
        True,
        "edge",
        "s3cr@t",
    )


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load(write(tmp_path, "- a\n- b\n"), environ={})


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nothere\.yaml"):
        load(tmp_path / "nothere.yaml", environ={})


def test_a_bad_config_value_exits_with_code_2_naming_the_field(tmp_path):
    f = write(tmp_path, "services:\n  demo:\n    interval_s: soon\n")
    result = subprocess.run(
        [sys.executable, "-m", "uns", "run", "demo", "--config", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "services.demo.interval_s" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_service_exits_with_code_2_listing_the_installed_ones():
    result = subprocess.run(
        [sys.executable, "-m", "uns", "run", "nosuch"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "demo" in result.stderr and "Traceback" not in result.stderr
