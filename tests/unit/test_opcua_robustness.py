"""The OPC UA adapter's pure parts for issue 15: block numbering with holes, the tolerant
keep-alive, the refused-login backoff, ``nsu=`` NodeIds, and ``uns opcua cert``."""

from __future__ import annotations

import stat
from pathlib import Path

import msgspec
import pytest
from asyncua import ua
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from uns_opcua_adapter import (
    CertificateError,
    OpcUaAdapterSettings,
    Tag,
    UaDevice,
    create_certificate,
    describe_certificate,
)
from uns_opcua_adapter.logic import (
    BlockClock,
    BrowsedObject,
    BrowsedVariable,
    KeepAlive,
    nsu_text,
    overflowed,
    refused_delay,
    split_nsu,
    starter_config,
    with_index,
)
from uns_opcua_adapter.ua import check_node, read_certificate

PATH = "acme/pune/stamping/line-3/cell-a/press-01"
STEP = 25_000  # µs between two blocks' t0


def numbers(clock: BlockClock, t0s: list[int], overflow: frozenset[int] = frozenset()) -> list[int]:
    return [clock.number(t0, STEP, i in overflow).block for i, t0 in enumerate(t0s)]


# ---- block numbering (item 10) --------------------------------------------------------------


def test_back_to_back_blocks_are_numbered_in_a_row() -> None:
    assert numbers(BlockClock(), [k * STEP for k in range(10)]) == list(range(10))


def test_a_block_missing_from_the_stream_leaves_a_hole_in_the_numbers() -> None:
    stream = [k * STEP for k in range(10) if k not in (6, 7)]
    clock = BlockClock()
    assert numbers(clock, stream) == [0, 1, 2, 3, 4, 5, 8, 9]
    assert clock.next == 10


def test_a_server_sampling_slower_than_the_blocks_come_skips_what_it_never_saw() -> None:
    seen = [0, 3, 5, 8, 10, 13]  # a 250 ms timer on 100 ms blocks
    assert numbers(BlockClock(), [k * STEP for k in seen]) == seen
    numbered = BlockClock(next=1, last_t0_us=0).number(3 * STEP, STEP)
    assert numbered == (3, 2, 2 * STEP) and numbered.lost == 2


def test_jitter_in_the_timestamps_and_overlapping_blocks_are_no_hole() -> None:
    jitter = [0, 4000, -3000, 5000, -4000, 2000, 0, -5000, 3000, 1000]  # up to 20 % of a block
    assert numbers(BlockClock(), [k * STEP + j for k, j in enumerate(jitter)]) == list(range(10))
    assert numbers(BlockClock(), [k * 1000 for k in range(10)]) == list(range(10))  # sliding


def test_a_pause_of_the_stream_skips_numbers_but_is_no_loss() -> None:
    clock = BlockClock()
    numbers(clock, [0, STEP])
    paused = clock.number(STEP + 600_000_000, STEP)  # the machine stood for 10 minutes
    assert paused.skipped == 23_999 and paused.lost == 0
    short = clock.number(STEP + 600_000_000 + 3 * STEP, STEP)
    assert short.skipped == 2 and short.lost == 2


def test_the_servers_overflow_bit_skips_a_number_even_without_a_time_hole() -> None:
    clock = BlockClock()
    assert numbers(clock, [k * STEP for k in range(6)], overflow=frozenset({4})) == [
        0,
        1,
        2,
        3,
        5,
        6,
    ]
    assert overflowed(0x00000480) and overflowed(0x40000480)
    assert not overflowed(0x00000000) and not overflowed(0x00000080)  # bit 7 of another type


def test_a_clock_set_back_skips_nothing_and_a_clock_jump_is_bounded() -> None:
    clock = BlockClock()
    t0s = [0, STEP, 2 * STEP, -(10**9), -(10**9) + STEP, -(10**9) + 2 * STEP]
    assert numbers(clock, t0s) == list(range(6))
    numbered = clock.number(10**18, STEP)  # a server clock years ahead
    assert numbered.skipped == 1_000_000 and numbered.block == 6 + 1_000_000


# ---- the keep-alive (item 9) and the refused-login backoff (item 13) ----------------------------


def test_the_session_is_dead_only_after_n_unanswered_keepalives_in_a_row() -> None:
    k = KeepAlive(failures=3)
    assert not k.unanswered() and not k.unanswered()
    k.answered()  # a slow answer, or a Publish response: it is there
    assert not k.unanswered() and not k.unanswered()
    assert k.unanswered()


def test_a_refused_login_waits_a_minute_doubling_up_to_half_an_hour() -> None:
    waits = [refused_delay(i, 60.0, 1800.0) for i in range(8)]
    assert waits == [60, 120, 240, 480, 960, 1800, 1800, 1800]
    assert refused_delay(10_000, 60.0, 1800.0) == 1800


def test_login_retry_settings_are_checked() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"login_retry_max_s .* below"):
        msgspec.convert({"login_retry_min_s": 60, "login_retry_max_s": 30}, OpcUaAdapterSettings)
    with pytest.raises(msgspec.ValidationError, match="keepalive_failures"):
        msgspec.convert({"keepalive_failures": 0}, OpcUaAdapterSettings)
    s = OpcUaAdapterSettings()
    assert (s.watchdog_s, s.timeout_s, s.keepalive_failures) == (1.0, 5.0, 3)
    assert (s.login_retry_min_s, s.login_retry_max_s, s.certificate_retry_s) == (60, 1800, 60)


# ---- waveform sampling (item 10) ----------------------------------------------------------------


def test_a_waveform_samples_every_change_by_default_and_keeps_its_own_interval_if_given() -> None:
    s = OpcUaAdapterSettings(
        publishing_interval_ms=100,
        devices=[
            UaDevice(
                path=PATH,
                tags=[
                    Tag(name="vib", node="ns=2;s=V", datatype="waveform", rate_hz=10_000.0),
                    Tag(
                        name="slow",
                        node="ns=2;s=S",
                        datatype="waveform",
                        rate_hz=10.0,
                        sampling_ms=500,
                    ),
                    Tag(name="temp", node="ns=2;s=T"),
                ],
            )
        ],
    )
    assert [t.sampling_ms for t in s.plan()[0].tags] == [0, 500, 100]


# ---- nsu= NodeIds (item 11) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        'nsu=urn:siemens:s7;s="DB_Press01"."Temp"',
        "nsu=http://plant.example/UA/Press;i=1042",
        "nsu=urn:a%3Bb;s=x;y",  # a ';' in the URI is %3B, one in a string id is itself
    ],
)
def test_a_nsu_node_id_passes_validation(text: str) -> None:
    check_node(text)


@pytest.mark.parametrize(
    "text",
    ["nsu=;s=A", "nsu=urn:x", "nsu=urn:x;ns=2;s=A", "nsu=urn:x;q=A", "i=5;nsu=urn:x", "srv=1;i=5"],
)
def test_a_broken_nsu_node_id_is_refused_at_load(text: str) -> None:
    with pytest.raises(ValueError, match=r"NodeId|namespace URI first"):
        check_node(text)


def test_a_nsu_node_becomes_the_servers_index_of_its_namespace() -> None:
    assert split_nsu("nsu=urn:a%3Bb;s=x;y") == ("urn:a;b", "s=x;y")
    assert split_nsu("ns=2;s=x") is None
    assert with_index("s=x;y", 5) == "ns=5;s=x;y"
    assert with_index("i=2258", 0) == "i=2258"
    text = nsu_text("urn:a;b%c", "s=Temp")
    assert text == "nsu=urn:a%3Bb%25c;s=Temp"
    assert split_nsu(text) == ("urn:a;b%c", "s=Temp")
    assert ua.NodeId.from_string(with_index("s=Temp", 3)) == ua.NodeId("Temp", 3)


def test_the_starter_config_writes_nsu_nodes_and_the_rate_the_server_gives() -> None:
    obj = BrowsedObject(
        "Press01",
        "nsu=urn:plc;s=Press01",
        "/Objects/3:Press01",
        [
            BrowsedVariable("Temp", "nsu=urn:plc;s=Press01.Temp", "Double"),
            BrowsedVariable(
                "Vib", "nsu=urn:plc;s=Press01.Vib", "Float", is_array=True, rate_hz=25_600.0
            ),
        ],
    )
    text = starter_config("opc.tcp://plc:4840", [obj])
    assert "PLACEHOLDER" not in text
    section = msgspec.yaml.decode(text)["services"]["opcua-adapter"]
    tags = section["devices"][0]["tags"]
    assert [(t["node"], t.get("rate_hz")) for t in tags] == [
        ("nsu=urn:plc;s=Press01.Temp", None),
        ("nsu=urn:plc;s=Press01.Vib", 25_600.0),
    ]
    assert msgspec.convert(section, OpcUaAdapterSettings).plan()[0].tags[1].rate_hz == 25_600.0


# ---- uns opcua cert (item 8) --------------------------------------------------------------------


async def test_the_certificate_is_one_an_opc_ua_server_accepts_once_trusted(tmp_path: Path) -> None:
    made = create_certificate(
        tmp_path / "pki" / "adapter.der",
        tmp_path / "pki" / "adapter.key.pem",
        application_uri="urn:edge-01:uns:opcua-adapter",
        hostnames=["edge-01", "192.168.10.5"],
    )
    der = made.certificate.read_bytes()
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [made.application_uri]
    assert san.get_values_for_type(x509.DNSName) == ["edge-01"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.168.10.5"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    assert cert.public_key().key_size == 2048  # type: ignore[union-attr]
    assert stat.S_IMODE(made.private_key.stat().st_mode) == 0o600
    assert len(made.thumbprint) == 40 and made.thumbprint in describe_certificate(made)
    # the adapter reads it as it is, and announces its URI
    uri = read_certificate(der, made.private_key.read_bytes(), None)
    assert uri == made.application_uri
    # asyncua's server-side validator (trust list, URI, key usages, client use) accepts it
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "adapter.der").write_bytes(der)
    store = TrustStore([trusted], [])
    await store.load()
    validator = CertificateValidator(
        CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT,
        store,
    )
    app = ua.ApplicationDescription(
        ApplicationUri=made.application_uri, ApplicationType=ua.ApplicationType.Client
    )
    await validator.validate(cert, app)


def test_the_certificate_command_never_overwrites_silently(tmp_path: Path) -> None:
    cert, key = tmp_path / "a.der", tmp_path / "a.key.pem"
    first = create_certificate(cert, key)
    assert first.application_uri.startswith("urn:") and first.application_uri.endswith(
        ":uns:opcua-adapter"
    )
    with pytest.raises(CertificateError, match=r"exists .*--force"):
        create_certificate(cert, key)
    again = create_certificate(cert, key, overwrite=True)
    assert again.thumbprint != first.thumbprint
    with pytest.raises(CertificateError, match="not a URI"):
        create_certificate(tmp_path / "b.der", tmp_path / "b.key", application_uri="edge")
