"""The bridge tells a refused login from every other connection failure (it backs off far
longer on it), and its login backoff settings are checked like the others."""

from __future__ import annotations

from typing import Any

import pytest

from uns.config import LoadedConfig, UnsConfig
from uns.errors import ConfigError
from uns_bridge import BridgeSettings
from uns_bridge.logic import backoff, login_refused


def settings(**section: Any) -> BridgeSettings:
    loaded = LoadedConfig(config=UnsConfig(services={"bridge": section}), path=None, origin={})
    return loaded.service("bridge", BridgeSettings)


@pytest.mark.parametrize(
    "error",
    [
        "broker mqtts://cloud:8883 unreachable: [code:135] Not authorized",  # Mosquitto, 3.1.1/5
        "broker mqtts://cloud:8883 unreachable: [code:134] Bad user name or password",
        "broker mqtts://cloud:8883 unreachable: [code:138] Banned",
        "broker mqtts://cloud:8883 unreachable: [code:140] Bad authentication method",
    ],
)
def test_a_connack_refusing_who_we_are_is_a_refused_login(error: str) -> None:
    assert login_refused(error)


@pytest.mark.parametrize(
    "error",
    [
        "broker mqtts://cloud:8883 unreachable: [Errno 111] Connection refused",
        "broker mqtts://cloud:8883 unreachable: Operation timed out",
        "broker mqtts://cloud:8883 unreachable: [code:136] Server unavailable",
        "broker mqtts://cloud:8883 unreachable: [code:137] Server busy",
        "broker mqtts://cloud:8883 unreachable: [SSL: CERTIFICATE_VERIFY_FAILED] certificate"
        " verify failed",
        "connection to mqtts://cloud:8883 lost: Disconnected during message iteration",
    ],
)
def test_an_unreachable_busy_or_untrusted_remote_is_not_a_refused_login(error: str) -> None:
    assert not login_refused(error)


def test_the_login_backoff_starts_at_a_minute_and_doubles_to_half_an_hour_by_default() -> None:
    remote = settings(remote={"url": "mqtts://cloud.example.com"}).remote
    assert remote is not None
    assert (remote.login_retry_min_s, remote.login_retry_max_s) == (60.0, 1800.0)
    waits = [backoff(i, remote.login_retry_min_s, remote.login_retry_max_s) for i in range(8)]
    assert 48 <= waits[0] <= 72 and 96 <= waits[1] <= 144
    assert 1440 <= waits[7] <= 2160  # capped: 30 min +-20 %


@pytest.mark.parametrize(
    ("remote", "message"),
    [
        ({"login_retry_min_s": 0}, "remote.login_retry_min_s"),
        ({"login_retry_min_s": 120, "login_retry_max_s": 60}, "login_retry_max_s is below"),
    ],
)
def test_a_wrong_login_backoff_is_refused_naming_it(remote: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings(remote={"url": "mqtts://cloud.example.com", **remote})
    assert str(err.value).startswith("services.bridge")
    assert message in str(err.value)
