"""The bridge's decisions without a network: selection, topics, presets, ids, envelopes,
pacing, diagnosis and settings."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from uns.config import LoadedConfig, UnsConfig
from uns.errors import ConfigError
from uns_bridge import BridgeSettings
from uns_bridge.journal import EVENT, RETAIN, TELEMETRY, Row
from uns_bridge.logic import (
    PRESETS,
    Router,
    Selector,
    TokenBucket,
    Unsendable,
    backoff,
    cert_days_left,
    classify,
    explain,
    message_id,
)

FEATURES = "acme/pune/stamping/line-3/cell-a/press-01/features/data"
RAW = "acme/pune/stamping/line-3/cell-a/press-01/raw/data"
EVENT_TOPIC = "acme/pune/stamping/line-3/cell-a/press-01/events/anomaly"
BIRTH = "acme/pune/stamping/line-3/cell-a/press-01/features/birth"
NODE_DEATH = "acme/pune/_node/featurizer/death"


def settings(**section: Any) -> BridgeSettings:
    """Decode a ``services.bridge`` section as ``uns run bridge`` does."""
    loaded = LoadedConfig(config=UnsConfig(services={"bridge": section}), path=None, origin={})
    return loaded.service("bridge", BridgeSettings)


def row(i: int, topic: str = FEATURES, payload: bytes = b'{"v":1}', flags: int = 0) -> Row:
    return Row(id=i, ts_ms=1000 + i, flags=flags, topic=topic, payload=payload)


def router(preset: str = "generic", **kw: Any) -> Router:
    return Router(
        PRESETS[preset], node_id="bridge", client_id="edge-01", enterprise="acme", site="pune", **kw
    )


# ---- selection -------------------------------------------------------------------------


def test_the_defaults_forward_features_scores_events_and_births_but_not_raw_data():
    s = settings(remote={"url": "mqtts://cloud.example.com"})
    sel = Selector(s.include, s.exclude)
    assert sel.first(FEATURES) == 0
    assert sel.first("acme/pune/stamping/line-3/cell-a/press-01/scores/data") == 1
    assert sel.first(EVENT_TOPIC) == 2
    assert sel.first(BIRTH) == 0  # a stream's birth describes its data
    assert sel.first("acme/pune/_node/featurizer/birth") == 3
    assert sel.first(NODE_DEATH) == 4
    assert sel.first(RAW) is None  # waveforms stay on the floor
    assert sel.first("acme/pune/stamping/line-3/cell-a/press-01/raw/birth") is None
    assert sel.first("acme/pune/_node/featurizer/cmd") is None


def test_an_excluded_topic_is_never_taken_and_overlapping_includes_take_it_once():
    sel = Selector(["acme/#", "+/+/+/+/+/+/features/#"], ["+/+/+/+/+/press-02/#"])
    assert sel.first(FEATURES) == 0  # the first matching filter owns it
    assert sel.first(FEATURES.replace("press-01", "press-02")) is None


def test_events_births_and_deaths_are_kept_longest_and_births_and_deaths_are_retained():
    assert classify(FEATURES) == (TELEMETRY, 0)
    assert classify(EVENT_TOPIC) == (EVENT, 0)
    assert classify(BIRTH) == (EVENT, RETAIN)
    assert classify(NODE_DEATH) == (EVENT, RETAIN)
    assert classify("acme/pune/_node/featurizer/cmd") == (TELEMETRY, 0)


# ---- topics and presets ----------------------------------------------------------------


def test_the_generic_preset_keeps_the_topic_and_carries_the_id_as_a_user_property():
    out = router().single(row(7))
    assert out.topic == FEATURES
    assert out.user_properties == {"uns-id": "bridge-7"}
    assert out.payload == b'{"v":1}' and out.ids == (7,) and not out.retain


def test_a_template_rewrites_the_topic_from_its_levels_and_says_the_original():
    r = router(template="plant/{site}/{device}/{stream}/{message}")
    out = r.single(row(1))
    assert out.topic == "plant/pune/press-01/features/data"
    assert out.user_properties == {"uns-id": "bridge-1", "uns-topic": FEATURES}
    assert router(template="dt/{client_id}/{topic}").render(FEATURES) == f"dt/edge-01/{FEATURES}"


def test_births_and_deaths_are_retained_where_the_preset_keeps_retained_messages():
    birth = row(3, BIRTH, flags=RETAIN)
    assert router().single(birth).retain
    assert router("aws-iot").single(birth).retain
    assert not router("azure-iot-hub").single(birth).retain
    assert not router(retain=False).single(birth).retain


def test_aws_iot_accepts_the_uns_topic_but_no_prefix_beyond_seven_slashes():
    aws = PRESETS["aws-iot"]
    aws.check_topic(FEATURES)  # 7 slashes: the limit exactly
    aws.check_topic("$aws/rules/uns_ingest/" + FEATURES)  # Basic Ingest's prefix is exempt
    with pytest.raises(Unsendable, match="9 slashes; aws-iot allows 7"):
        aws.check_topic("dt/uns/" + FEATURES)
    with pytest.raises(Unsendable, match="allows 256"):
        aws.check_topic("a/" + "b" * 300)
    with pytest.raises(Unsendable, match="at most 131072 bytes"):
        router("aws-iot").check(FEATURES, 200_000)  # payloads up to 128 KiB
    router("aws-iot").check(FEATURES, 100_000)


def test_azure_iot_hub_puts_topic_id_and_content_type_in_the_property_bag():
    out = router("azure-iot-hub").single(row(42))
    assert out.topic == (
        "devices/edge-01/messages/events/$.ct=application%2Fjson&$.ce=utf-8"
        "&uns-topic=acme%2Fpune%2Fstamping%2Fline-3%2Fcell-a%2Fpress-01%2Ffeatures%2Fdata"
        "&uns-id=bridge-42"
    )
    assert PRESETS["azure-iot-hub"].protocol == 4  # IoT Hub speaks MQTT 3.1.1


def test_topics_that_render_empty_levels_are_unsendable():
    r = router(template="{device}/{stream}/{message}")
    with pytest.raises(Unsendable, match="empty level"):
        r.check(NODE_DEATH, 10)  # a node topic has no device
    r.check(FEATURES, 10)


def test_message_ids_are_the_bridge_and_the_journal_row():
    assert message_id("bridge", 1795339782742946) == "bridge-1795339782742946"


# ---- batches ---------------------------------------------------------------------------


def test_a_batch_is_a_json_array_of_the_messages_with_their_ids_topics_and_exact_payloads():
    payloads = [b'{"type":"ddata","seq":1}', b'{"type":"ddata","seq":2}']
    rows = [row(10, payload=payloads[0]), row(11, EVENT_TOPIC, payload=payloads[1])]
    out = router().batch(rows)
    assert out.topic == "acme/pune/_node/bridge/batch"
    assert out.user_properties == {
        "uns-id": "bridge-10",
        "uns-count": "2",
        "uns-topic": "acme/pune/_node/bridge/batch",
    }
    assert out.ids == (10, 11)
    assert json.loads(out.payload) == [
        {"id": "bridge-10", "topic": FEATURES, "ts": 1010, "payload": {"type": "ddata", "seq": 1}},
        {
            "id": "bridge-11",
            "topic": EVENT_TOPIC,
            "ts": 1011,
            "payload": {"type": "ddata", "seq": 2},
        },
    ]
    for p in payloads:
        assert p in out.payload  # byte for byte, not re-encoded


def test_grouping_respects_the_batch_size_the_payload_limit_and_sends_births_alone():
    r = router()
    rows = [row(i) for i in range(1, 8)]
    assert [[x.id for x in g] for g in r.group(rows, 1)] == [[i] for i in range(1, 8)]
    assert [[x.id for x in g] for g in r.group(rows, 3)] == [[1, 2, 3], [4, 5, 6], [7]]
    with_birth = [row(1), row(2), row(3, BIRTH, flags=RETAIN), row(4)]
    assert [[x.id for x in g] for g in r.group(with_birth, 10)] == [[1, 2], [3], [4]]
    big = [row(i, payload=b"x" * 50_000) for i in range(1, 6)]
    groups = router("aws-iot").group(big, 100)  # 128 KiB per publish on AWS
    assert [len(g) for g in groups] == [2, 2, 1]


# ---- pacing and diagnosis --------------------------------------------------------------


def test_the_token_bucket_holds_the_rate_after_a_short_burst():
    now = [0.0]
    bucket = TokenBucket(rate=1000, burst=100, clock=lambda: now[0])
    assert bucket.delay(100) == 0.0  # the burst
    assert bucket.delay(10) == pytest.approx(0.010)
    now[0] += 0.010
    assert bucket.delay(10) == pytest.approx(0.010)  # 1000/s on average from here on
    now[0] += 10.0
    assert bucket.delay(50) == 0.0  # refilled, but only up to the burst


def test_backoff_doubles_with_jitter_up_to_the_maximum():
    rng = random.Random(1)
    delays = [backoff(a, 1.0, 15.0, rng) for a in range(8)]
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4
    assert all(12.0 <= d <= 18.0 for d in delays[5:])


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (
            "broker mqtts://h:8883 unreachable: [SSL: CERTIFICATE_VERIFY_FAILED] certificate"
            " verify failed: self-signed certificate in certificate chain",
            "not trusted (remote.ca_file)",
        ),
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch,"
            " certificate is not valid for 'x'",
            "does not name the host",
        ),
        (
            "failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert"
            " certificate required",
            "requires a client certificate",
        ),
        ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "refused our client certificate"),
        ("broker.cert_file/key_file: cannot load them: [Errno 2]", "cannot load the client"),
        ("mqtts://h refused the message on 'a/b': Not authorized", "refused a message"),
        ("broker unreachable: [Errno 111] Connect call failed: Connection refused", "nothing"),
        ("broker unreachable: Operation timed out", "no answer in time"),
    ],
)
def test_connection_errors_are_explained_in_the_words_of_the_settings(error, cause):
    explained = explain(error)
    assert explained is not None and cause in explained


def test_an_unknown_error_gets_no_made_up_explanation():
    assert explain("something new") is None


def test_days_left_of_a_client_certificate(tmp_path: Path):
    from fixtures.pki import CertAuthority

    pki = CertAuthority(tmp_path)
    cert, _key = pki.issue("edge-01", days=30)
    assert cert_days_left(cert.read_bytes()) == pytest.approx(30, abs=0.01)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=31)
    assert cert_days_left(cert.read_bytes(), later) == pytest.approx(-1, abs=0.01)


# ---- settings ----------------------------------------------------------------------------


def test_without_a_remote_the_bridge_has_nothing_to_do_and_that_is_valid():
    s = settings()
    assert s.remote is None and s.enabled
    assert s.journal.ttl_s == 86_400 and s.journal.max_bytes == 512 * 2**20
    assert s.journal.backfill_rate is None and s.journal.batch == 1
    assert s.journal.path == "var/bridge-journal.sqlite"


def test_a_plaintext_remote_is_refused_unless_allowed_for_development():
    with pytest.raises(ConfigError, match=r"services\.bridge\.remote: url: .* not encrypted"):
        settings(remote={"url": "mqtt://cloud.example.com:1883"})
    s = settings(remote={"url": "mqtt://127.0.0.1:1884", "allow_plaintext": True})
    assert s.remote is not None and s.remote.allow_plaintext


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"remote": {"url": "mqtts://h", "colour": "red"}}, "remote: Object contains unknown"),
        ({"remote": {"url": "https://h"}}, "remote: url: 'https://h' is not a broker URL"),
        ({"remote": {"url": "mqtts://h", "cert_file": "c.pem"}}, "cert_file and key_file"),
        ({"remote": {"url": "mqtts://h", "preset": "gcp"}}, "remote.preset"),
        (
            {"remote": {"url": "mqtts://h", "preset": "aws-iot", "inflight": 500}},
            "inflight: aws-iot accepts at most 100",
        ),
        (
            {"remote": {"url": "mqtts://h", "preset": "aws-iot"}, "topic": "dt/uns/{topic}"},
            "topic: 'dt/uns/acme/pune/stamping/line-3/cell-a/press-01/features/data' has 9",
        ),
        ({"topic": "x/{plant}"}, "topic: 'x/{plant}': unknown placeholder {plant}"),
        ({"include": ["a/#/b"]}, "include[0]"),
        ({"exclude": ["ok/#", "bad/+x"]}, "exclude[1]"),
        ({"journal": {"ttl_s": 0}}, "journal.ttl_s"),
        ({"journal": {"batch": 0}}, "journal.batch"),
        ({"journal": {"synchronous": "off"}}, "journal.synchronous"),
        ({"remote": {"url": "mqtts://h", "client_id": "{thing}"}}, "client_id: '{thing}'"),
    ],
)
def test_a_wrong_setting_is_refused_naming_it(section, message):
    with pytest.raises(ConfigError) as err:
        settings(**section)
    assert str(err.value).startswith("services.bridge")
    assert message in str(err.value)


def test_every_example_setting_decodes():
    s = settings(
        remote={
            "url": "mqtts://a1b2c3-ats.iot.eu-central-1.amazonaws.com:8883",
            "preset": "aws-iot",
            "client_id": "pune-press-shop",
            "ca_file": "/etc/uns/pki/AmazonRootCA1.pem",
            "cert_file": "/etc/uns/pki/bridge.pem",
            "key_file": "/etc/uns/pki/bridge.key",
        },
        topic="$aws/rules/uns_ingest/{topic}",
        journal={"path": "/var/lib/uns/bridge.sqlite", "batch": 50, "batch_ms": 200},
    )
    assert msgspec.to_builtins(s)["journal"]["batch"] == 50


def test_a_backfill_keeps_to_the_cloud_endpoints_publish_limit_unless_told_otherwise():
    from uns_bridge.logic import PRESETS, backfill_rate

    assert backfill_rate(None, PRESETS["generic"], 1) >= 5000  # the benchmark's target
    assert backfill_rate(None, PRESETS["aws-iot"], 1) == 100  # AWS: 100 publishes/s
    assert backfill_rate(None, PRESETS["aws-iot"], 10) == 1000  # 10 messages per publish
    assert backfill_rate(None, PRESETS["azure-iot-hub"], 1) == 100
    assert backfill_rate(250, PRESETS["aws-iot"], 1) == 250  # a raised quota: as configured
