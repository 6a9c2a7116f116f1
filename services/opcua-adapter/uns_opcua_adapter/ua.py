"""The only module that imports asyncua: sessions, subscriptions, browsing.

`UaSession` is one OPC UA session: connect (with security and a user), resolve
tag nodes, create one subscription with a monitored item per tag, hand over the
data changes of each publishing cycle as one batch, notice a lost server, close.
It never reconnects by itself: the service decides (deaths, backoff, births).
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import hashlib
import logging
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.utils import NotEnoughData
from asyncua.crypto import security_policies
from asyncua.crypto.uacrypto import CertProperties
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.ua_binary import nodeid_from_binary, struct_from_binary
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from uns_opcua_adapter import nodetext
from uns_opcua_adapter.logic import (
    BrowsedObject,
    BrowsedVariable,
    Change,
    KeepAlive,
    nsu_text,
    split_nsu,
    with_index,
)

log = logging.getLogger(__name__)

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US: Final = dt.timedelta(microseconds=1)
_SERVER_OBJECT: Final = ua.NodeId(ua.Int32(ObjectIds.Server))
_HAS_PROPERTY: Final = ua.NodeId(ua.Int32(ObjectIds.HasProperty))
_ROOT: Final = ua.NodeId(ua.Int32(ObjectIds.RootFolder))
_SESSION_TIMEOUT_MS: Final = 60_000
_SUPERVISOR_PROBE_S: Final = 3600.0
"""asyncua's own probe: hourly. Its timeout is min(watchdog, session timeout / 2) and one
miss ends the session, which made sessions flap under load (1 s with the old watchdog_s:
11 drops in 3.4 min); `UaSession` runs its own, tolerant keep-alive. asyncua's supervisor
still reports a closed socket at once."""
_SERVER_STATE: Final = ua.NodeId(ua.Int32(ObjectIds.Server_ServerStatus_State))
_NAMESPACE_ARRAY: Final = ua.NodeId(ua.Int32(ObjectIds.Server_NamespaceArray))
_SERVICE_FAULT: Final = ua.FourByteNodeId(ObjectIds.ServiceFault_Encoding_DefaultBinary)
_CHUNK: Final = 500
_SAMPLE_TYPES: Final = {ua.VariantType.Double: "f64", ua.VariantType.Int16: "i16"}
_AUTH_CODES: Final = frozenset(
    {
        "BadUserAccessDenied",
        "BadIdentityTokenInvalid",
        "BadIdentityTokenRejected",
        "BadUserSignatureInvalid",
    }
)
_SECURITY_CODES: Final = frozenset(
    {
        "BadCertificateUntrusted",
        "BadCertificateInvalid",
        "BadSecurityChecksFailed",
        "BadSecurityPolicyRejected",
        "BadCertificateUriInvalid",
        "BadCertificateHostNameInvalid",
        "BadCertificateTimeInvalid",
        "BadCertificateIssuerTimeInvalid",
        "BadCertificateUseNotAllowed",
        "BadCertificateRevoked",
        "BadCertificateIssuerRevoked",
        "BadCertificateRevocationUnknown",
        "BadCertificateChainIncomplete",
        "BadNonceInvalid",
    }
)
_FIXES: Final = {
    "BadCertificateUntrusted": "trust {cert} on the server (its trusted client certificates)",
    # many servers answer this instead of Untrusted, so as not to tell an attacker why
    "BadSecurityChecksFailed": "trust {cert} on the server; if it is trusted, check"
    " security.server_certificate and the server's clock",
    "BadCertificateUriInvalid": "the application URI in {cert} is not the one the server"
    " expects: make one with `uns opcua cert --uri <uri>` and trust it",
    "BadCertificateTimeInvalid": "{cert} is expired or not yet valid (check both clocks)",
    "BadCertificateUseNotAllowed": "{cert} lacks the key usages of an OPC UA client"
    " certificate: make one with `uns opcua cert`",
    "BadCertificateHostNameInvalid": "{cert} does not name this host: make one with"
    " `uns opcua cert`",
}

_SESSION_GONE: Final = frozenset(
    {
        "BadSessionIdInvalid",
        "BadSessionClosed",
        "BadSessionNotActivated",
        "BadSecureChannelIdInvalid",
        "BadSecureChannelClosed",
    }
)

Mode = Literal["none", "sign", "sign_encrypt"]
_MODES: Final = {
    "sign": ua.MessageSecurityMode.Sign,
    "sign_encrypt": ua.MessageSecurityMode.SignAndEncrypt,
}


Refusal = Literal["certificate", "login"]


class UaUnavailable(Exception):
    """The server cannot be reached, refused the session, or the session was lost.

    ``kind`` is a metric label: ``connect`` (unreachable, timeout), ``rejected`` (the
    server said no: credentials, certificates, endpoints) or ``lost``. ``refusal`` says
    which refusals retrying soon cannot fix: ``certificate`` (the server does not trust
    ours, or ours does not trust its: a person must act) or ``login`` (the user token: a
    PLC may lock the account after a few tries).
    """

    def __init__(
        self,
        message: str,
        kind: Literal["connect", "rejected", "lost"],
        refusal: Refusal | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.refusal: Refusal | None = refusal


# ---- helpers the pure parts use ----------------------------------------------------------


def check_node(text: str) -> None:
    """Raise `ValueError` unless ``text`` is a NodeId string or a browse path from Root
    (`nodetext.check_node`, with asyncua's names of reference types)."""
    nodetext.check_node(text, is_reference_type)


def is_reference_type(name: str) -> bool:
    """Whether asyncua resolves ``<name>`` in a browse path: it looks the name up among
    the standard NodeIds (`RelativePath.from_string`)."""
    return isinstance(getattr(ObjectIds, name, None), int)


def status_name(code: int) -> str:
    """The name of a StatusCode, info bits (overflow, limits) ignored."""
    name: str = ua.StatusCode(ua.UInt32(code & 0xFFFF0000)).name
    return name


def read_certificate(certificate: bytes, private_key: bytes, server: bytes | None) -> str | None:
    """Check the certificate files parse; return the application URI of the client's."""
    cert = _load_cert(certificate, "certificate")
    try:
        if certificate.lstrip().startswith(b"-----BEGIN") or private_key.lstrip().startswith(
            b"-----BEGIN"
        ):
            serialization.load_pem_private_key(private_key, password=None)
        else:
            serialization.load_der_private_key(private_key, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"private_key: not an unencrypted PEM or DER key ({exc})") from None
    if server is not None:
        _load_cert(server, "server_certificate")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _load_cert(data: bytes, field: str) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"{field}: not a PEM or DER certificate ({exc})") from None


def thumbprint(der: bytes) -> str:
    """The SHA-1 thumbprint of a DER certificate, as PLC web pages and TIA Portal show it."""
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def _der(data: bytes) -> bytes:
    """A certificate file's content (PEM or DER) as DER."""
    cert = _load_cert(data, "server_certificate")
    return cert.public_bytes(serialization.Encoding.DER)


def _first_cert(der: bytes) -> bytes:
    """The leading certificate of a DER blob that may hold a chain (a SEQUENCE each)."""
    if len(der) < 2 or der[0] != 0x30:
        return der
    if der[1] < 0x80:
        return der[: 2 + der[1]]
    n = der[1] & 0x7F
    return der[: 2 + n + int.from_bytes(der[2 : 2 + n], "big")]


def _props(data: bytes) -> CertProperties:
    return CertProperties(data, extension="pem" if data.lstrip().startswith(b"-----") else "der")


def _us(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // _US


def _plain(value: Any) -> Any:
    """A Variant's value as plain Python (texts of OPC UA structures)."""
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, (ua.QualifiedName, ua.NodeId)):
        return value.to_string()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


# ---- keeping asyncua's log honest: no tracebacks for a server that went away ---------------


class _TransportNoise(logging.Filter):
    """Drops asyncua's records that only repeat, with a traceback, that the link is down.

    The adapter logs every loss and retry itself, once, without a traceback; with the
    ``asyncua`` logger at DEBUG these records pass through unchanged.
    """

    _QUIET: Final = (
        "was called but connection is closed",
        "close_session but connection wasn't established",
        "create_session fault response",
        "Got error status from server",
        "ServiceFault (",
        "Received an error: ",  # an ERR message: the code is reported as "Got error status"
        "is already done",  # the late answer to a keep-alive read we stopped waiting for
    )

    def filter(self, record: logging.LogRecord) -> bool:
        refusal = _note_refusal(record)
        if logging.getLogger("asyncua").isEnabledFor(logging.DEBUG):
            return True
        if refusal:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (OSError, TimeoutError, UaError)):
            return False
        return not any(q in str(record.msg) for q in self._QUIET)


_STATUS_SEEN: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "uns_opcua_status_seen", default=None
)
"""While one `UaSession.connect` runs: the StatusCodes its socket received in an ERR message
or a failed OpenSecureChannel response. asyncua 2.1 logs them and then fails the call with
an AssertionError (open_secure_channel), which says nothing; the socket's callbacks run in
a copy of the connecting task's context, so they see this session's list and no other."""


def _note_refusal(record: logging.LogRecord) -> bool:
    """Note the StatusCode of a refusal the record reports; whether it did (then the
    adapter's own line says it, and asyncua's traceback is noise)."""
    seen = _STATUS_SEEN.get()
    if seen is None:
        return False
    text = str(record.msg)
    name: str | None = None
    if text.startswith("Got error status from server"):
        exc = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if isinstance(exc, UaStatusCodeError):
            name = status_name(exc.code)
    elif text.startswith("Exception raised while parsing message from server") and record.exc_info:
        name = _fault_in(record.exc_info[2])
    if name:
        seen.append(name)
    return bool(name)


def _fault_in(tb: TracebackType | None) -> str | None:
    """The StatusCode of a ServiceFault that asyncua failed to parse as the response it
    expected: node-opcua answers a refused OpenSecureChannel with one, and asyncua reads
    it as an OpenSecureChannelResponse (NotEnoughData). The message is still in the
    failing frame of asyncua's receive loop."""
    while tb is not None:
        message = tb.tb_frame.f_locals.get("msg")
        if tb.tb_frame.f_code.co_name == "_process_received_data" and isinstance(
            message, ua.Message
        ):
            try:
                body = message.body()
                if nodeid_from_binary(body) == _SERVICE_FAULT:
                    header = struct_from_binary(ua.ResponseHeader, body)
                    return status_name(header.ServiceResult.value)
            except (UaError, NotEnoughData, ValueError, struct.error):  # not a fault after all
                return None
        tb = tb.tb_next
    return None


def quiet_asyncua() -> None:
    """INFO from asyncua is per request; keep it at WARNING unless configured otherwise."""
    root = logging.getLogger("asyncua")
    if root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    noise = _TransportNoise()
    for name in (
        "asyncua.client.client",
        "asyncua.client.ua_client.UaClient",
        "asyncua.client.ua_client.UASocketProtocol",
        "asyncua.client.ua_session.UaSession",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TransportNoise) for f in logger.filters):
            logger.addFilter(noise)


# ---- the session ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Monitor:
    """One monitored item to create."""

    handle: int
    node: str
    """A NodeId string (already resolved)."""
    sampling_ms: int
    queue_size: int
    deadband: float = 0.0
    every_timestamp: bool = False
    """Report a new SourceTimestamp even when the value is the same (waveform blocks)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    mode: Mode = "none"
    certificate_path: str = ""
    """Where the client certificate is, for the line that says to trust it."""
    server_certificate_path: str = ""
    certificate: bytes | None = None
    private_key: bytes | None = None
    server_certificate: bytes | None = None
    application_uri: str | None = None
    username: str | None = None
    password: str | None = None


class UaSession:
    """One session with one server; `batches` ends when the session is lost."""

    def __init__(
        self,
        url: str,
        credentials: Credentials,
        *,
        timeout_s: float = 5.0,
        watchdog_s: float = 1.0,
        keepalive_failures: int = 3,
        max_batches: int = 64,
        max_values: int = 1_000_000,
    ) -> None:
        quiet_asyncua()
        self.url = url
        self.credentials = credentials
        self.timeout_s = timeout_s
        self.watchdog_s = watchdog_s
        self.client = Client(url, timeout=timeout_s, watchdog_intervall=_SUPERVISOR_PROBE_S)
        self.client.session_timeout = _SESSION_TIMEOUT_MS
        self.client.name = self.client.description = "uns opcua-adapter"
        if credentials.application_uri:
            self.client.application_uri = credentials.application_uri
        self.connected = False
        self.lost_reason = ""
        self.publishing_interval_ms: float = 0.0
        self._queue: asyncio.Queue[tuple[list[Change], int] | None] = asyncio.Queue(max_batches)
        # What the queue holds in values (an array counts its length): a server that outruns
        # the adapter fills it with whole responses, and one response of waveforms can hold
        # ten thousand blocks; counted in batches alone it grew to 2.7 GB (uns bench slowtags).
        self._max_values = max_values
        self._held_values = 0
        self._room = asyncio.Event()
        self._room.set()
        self._lost = False
        self._keepalive = KeepAlive(keepalive_failures)
        self._keepalive_task: asyncio.Task[None] | None = None
        self._namespaces: list[str] | None = None

    async def connect(self) -> None:
        """Open the secure channel and activate the session; `UaUnavailable` if it fails."""
        c = self.credentials
        client = self.client
        if c.username is not None:
            client.set_user(c.username)
        if c.password is not None:
            client.set_password(c.password)
        client.connection_lost_callback = self._on_connection_lost
        seen: list[str] = []
        token = _STATUS_SEEN.set(seen)
        try:
            async with asyncio.timeout(self.timeout_s * 3):
                if c.mode != "none":
                    await self._set_security()
                await client.connect()
                self.connected = True
        except UaStatusCodeError as exc:
            raise self._refused(status_name(exc.code)) from None
        except AssertionError:  # asyncua 2.1 when OpenSecureChannel is refused: code logged
            raise self._refused(seen[-1] if seen else "") from None
        except UaError as exc:  # e.g. "No matching endpoints": security settings differ
            raise UaUnavailable(f"refused: {exc}", "rejected") from None
        except (OSError, TimeoutError) as exc:
            if seen:  # an ERR message, then the server closed the socket
                raise self._refused(seen[-1]) from None
            raise UaUnavailable(
                f"cannot connect: {str(exc) or type(exc).__name__}", "connect"
            ) from None
        finally:
            _STATUS_SEEN.reset(token)
            if not self.connected:  # timed out or cancelled half-way: leave no socket behind
                client.disconnect_socket()
        self._keepalive_task = asyncio.create_task(self._keep_alive(), name="uns-opcua-keepalive")

    async def _set_security(self) -> None:
        """Basic256Sha256 in the configured mode, after checking the server offers it and
        presents the pinned certificate (a wrong pin otherwise shows up as the server's
        BadTcpInternalError: it cannot decrypt what we encrypted for another key)."""
        c = self.credentials
        assert c.certificate is not None and c.private_key is not None
        policy = security_policies.SecurityPolicyBasic256Sha256
        mode = _MODES[c.mode]
        endpoints = await self.client.connect_and_get_server_endpoints()
        matching = [
            e for e in endpoints if e.SecurityPolicyUri == policy.URI and e.SecurityMode == mode
        ]
        if not matching:
            offered = sorted(
                {
                    f"{(e.SecurityPolicyUri or '').rsplit('#', 1)[-1]} {e.SecurityMode.name}"
                    for e in endpoints
                }
            )
            raise UaUnavailable(
                f"refused: the server has no Basic256Sha256 {mode.name} endpoint"
                f" (it offers: {', '.join(offered) or 'none'}); set security.mode to match",
                "rejected",
            )
        presented = _first_cert(matching[0].ServerCertificate or b"")
        server_cert = presented
        if c.server_certificate is not None:
            pinned = _first_cert(_der(c.server_certificate))
            if presented and presented != pinned:
                raise UaUnavailable(
                    f"the server presents certificate {thumbprint(presented)}, not the one"
                    " pinned in security.server_certificate"
                    f" ({c.server_certificate_path or 'file'}, {thumbprint(pinned)}):"
                    " if the server's certificate was renewed, pin the"
                    " new one; if not, this is not the server you meant",
                    "rejected",
                    "certificate",
                )
            server_cert = pinned
        if not server_cert:
            raise UaUnavailable(
                f"refused: the server's Basic256Sha256 {mode.name} endpoint has no certificate",
                "rejected",
            )
        await self.client.set_security(
            policy,
            certificate=_props(c.certificate),
            private_key=_props(c.private_key),
            server_certificate=CertProperties(server_cert, extension="der"),
            mode=mode,
        )

    def _refused(self, name: str) -> UaUnavailable:
        """What the server's refusal means, and what to do about it, in one line."""
        c = self.credentials
        if name in _AUTH_CODES:
            user = c.username if c.username is not None else "anonymous"
            return UaUnavailable(
                f"login refused for user {user!r}: {name} (check username and password)",
                "rejected",
                "login",
            )
        if name in _FIXES or (not name and c.mode != "none"):
            cert = c.certificate_path or "the client certificate"
            fix = _FIXES.get(name, _FIXES["BadSecurityChecksFailed"]).format(cert=cert)
            return UaUnavailable(
                f"the server rejected our certificate ({name or 'no code given'}): {fix}",
                "rejected",
                "certificate",
            )
        if name in _SECURITY_CODES:
            return UaUnavailable(
                f"refused the secure channel: {name} (check the certificates and trust lists)",
                "rejected",
            )
        return UaUnavailable(f"refused the session: {name or 'no code given'}", "rejected")

    async def namespaces(self) -> list[str]:
        """The server's NamespaceArray, read once per session (indexes may change between)."""
        if self._namespaces is None:
            value = await self._call(self.client.get_node(_NAMESPACE_ARRAY).read_value())
            self._namespaces = [str(uri) for uri in value or []]
        return self._namespaces

    async def resolve(self, nodes: Sequence[str]) -> list[tuple[str | None, str | None]]:
        """Each node text as a NodeId string, or None and why not (a StatusCode name first).

        A ``nsu=`` node gets the namespace's index on this server, looked up each session,
        so a rebuilt PLC project whose namespaces moved is followed on the next connect.
        """
        out: list[tuple[str | None, str | None]] = []
        paths: list[tuple[int, str]] = []
        for i, text in enumerate(nodes):
            nsu = split_nsu(text)
            if text.startswith("/"):
                paths.append((i, text))
                out.append((None, None))
            elif nsu is not None:
                uri, identifier = nsu
                namespaces = await self.namespaces()
                if uri in namespaces:
                    out.append((with_index(identifier, namespaces.index(uri)), None))
                else:
                    out.append((None, f"BadNodeIdUnknown: the server has no namespace {uri}"))
            else:
                out.append((ua.NodeId.from_string(text).to_string(), None))
        for start in range(0, len(paths), _CHUNK):
            chunk = paths[start : start + _CHUNK]
            requests = [
                ua.BrowsePath(StartingNode=_ROOT, RelativePath=ua.RelativePath.from_string(text))
                for _, text in chunk
            ]
            uaclient = self.client.uaclient
            results = await self._call(uaclient.translate_browsepaths_to_nodeids(requests))
            for (i, _), result in zip(chunk, results, strict=True):
                if result.StatusCode.is_good() and result.Targets:
                    out[i] = (result.Targets[0].TargetId.to_string(), None)
                else:
                    out[i] = (None, status_name(result.StatusCode.value))
        return out

    async def subscribe(self, publishing_ms: int, monitors: Sequence[Monitor]) -> list[str | None]:
        """One subscription, one monitored item per entry; per entry None or why it failed."""
        client = self.client
        keepalive = max(client.get_keepalive_count(publishing_ms), 1)
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=float(publishing_ms),
            RequestedLifetimeCount=keepalive * 3,
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        result = await self._call(client.uaclient.create_subscription(params, self._on_publish))
        self.publishing_interval_ms = result.RevisedPublishingInterval
        out: list[str | None] = []
        for start in range(0, len(monitors), _CHUNK):
            chunk = monitors[start : start + _CHUNK]
            request = ua.CreateMonitoredItemsParameters(
                SubscriptionId=result.SubscriptionId,
                ItemsToCreate=[_monitored_item(m) for m in chunk],
                TimestampsToReturn=ua.TimestampsToReturn.Both,
            )
            created = await self._call(client.uaclient.create_monitored_items(request))
            out.extend(
                None if r.StatusCode.is_good() else status_name(r.StatusCode.value) for r in created
            )
        return out

    @property
    def held_values(self) -> int:
        """Values taken from the server and not yet handed on (an array counts its length)."""
        return self._held_values

    async def batches(self) -> AsyncIterator[list[Change]]:
        """The data changes of each publishing cycle, in order, until the session is lost."""
        while (item := await self._queue.get()) is not None:
            batch, weight = item
            self._held_values -= weight
            self._room.set()
            yield batch
        raise UaUnavailable(self.lost_reason or "session lost", "lost")

    async def close(self) -> None:
        """Close the session (politely if the server is still there, quickly if not)."""
        task, self._keepalive_task = self._keepalive_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not self.connected:
            return
        self.connected = False
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.disconnect()
        except (OSError, TimeoutError, UaError) as exc:
            log.debug("closing the session to %s: %s", self.url, exc)

    @property
    def lost(self) -> bool:
        """The session was connected and is gone (or unusable)."""
        return self._lost

    async def _call(self, request: Any) -> Any:
        """Await one service call; a transport failure or a timeout means the session is gone."""
        try:
            return await request
        except (OSError, TimeoutError) as exc:
            self._mark_lost(f"request failed: {str(exc) or type(exc).__name__}")
            raise UaUnavailable(self.lost_reason, "lost") from None
        except UaStatusCodeError as exc:  # e.g. BadSessionIdInvalid, BadTooManyMonitoredItems
            self._mark_lost(f"the server answered {status_name(exc.code)}")
            raise UaUnavailable(self.lost_reason, "rejected") from None

    async def _keep_alive(self) -> None:
        """Read the server's state every ``watchdog_s``; the session is lost after
        ``keepalive_failures`` reads in a row without an answer within ``timeout_s`` (and
        no Publish response in between), or at once when the socket or the session is gone.

        Under load a PLC may answer in seconds: a slow answer is an answer. A silent link
        is noticed within about ``keepalive_failures * (watchdog_s + timeout_s)``, well inside
        the 60 s session timeout, so the server keeps the session for us meanwhile.
        """
        node = self.client.get_node(_SERVER_STATE)
        while not self._lost:
            await asyncio.sleep(self.watchdog_s)
            try:
                await node.read_value()  # asyncua's request timeout: timeout_s
            except TimeoutError:
                if self._keepalive.unanswered():
                    self._mark_lost(
                        f"no answer to {self._keepalive.failures} keep-alive reads in a row"
                        f" ({self.timeout_s:g} s each)"
                    )
                    return
                continue
            except UaStatusCodeError as exc:
                name = status_name(exc.code)
                if name in _SESSION_GONE:
                    self._mark_lost(f"the server answered {name}")
                    return
            except (OSError, UaError) as exc:  # the socket is closed
                self._mark_lost(f"keep-alive read failed: {str(exc) or type(exc).__name__}")
                return
            self._keepalive.answered()

    # ---- callbacks from asyncua's tasks --------------------------------------------------

    async def _on_connection_lost(self, exc: Exception) -> None:
        self._mark_lost(f"connection lost ({str(exc) or type(exc).__name__})")

    async def _on_publish(self, result: ua.PublishResult) -> None:
        """Called by the publish loop with every PublishResponse: one cycle, one batch."""
        self._keepalive.answered()  # a Publish response (even a keep-alive one): it is there
        notifications = result.NotificationMessage.NotificationData
        if not notifications or self._lost:
            return
        batch: list[Change] = []
        for notification in notifications:
            if isinstance(notification, ua.DataChangeNotification):
                batch.extend(_change(item) for item in notification.MonitoredItems)
            elif isinstance(notification, ua.StatusChangeNotification):
                status = notification.Status
                if status is not None and not status.is_good():
                    self._mark_lost(f"subscription ended: {status_name(status.value)}")
                    return
        if batch:
            weight = sum(len(c.value) if isinstance(c.value, list) else 1 for c in batch)
            # full (in batches or in values): the publish loop waits and the server queues,
            # dropping its oldest samples as its queue size says; one batch always fits
            while self._held_values and self._held_values + weight > self._max_values:
                self._room.clear()
                await self._room.wait()
                if self._lost:
                    return
            self._held_values += weight
            await self._queue.put((batch, weight))

    def _mark_lost(self, reason: str) -> None:
        if self._lost:
            return
        self._lost = True
        self.lost_reason = reason
        self._room.set()
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()  # the session is over: the oldest batch goes


def _monitored_item(m: Monitor) -> ua.MonitoredItemCreateRequest:
    flt: ua.DataChangeFilter | None = None
    if m.deadband > 0:
        flt = ua.DataChangeFilter(
            Trigger=ua.DataChangeTrigger.StatusValue,
            DeadbandType=ua.DeadbandType.Absolute,
            DeadbandValue=m.deadband,
        )
    elif m.every_timestamp:
        flt = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
    params = ua.MonitoringParameters(
        ClientHandle=m.handle,
        SamplingInterval=float(m.sampling_ms),
        QueueSize=m.queue_size,
        DiscardOldest=True,
        Filter=flt,
    )
    return ua.MonitoredItemCreateRequest(
        ItemToMonitor=ua.ReadValueId(
            NodeId=ua.NodeId.from_string(m.node), AttributeId=AttributeIds.Value
        ),
        MonitoringMode=ua.MonitoringMode.Reporting,
        RequestedParameters=params,
    )


def _change(item: ua.MonitoredItemNotification) -> Change:
    dv = item.Value
    variant = dv.Value if dv is not None else None
    value = variant.Value if variant is not None else None
    status = dv.StatusCode if dv is not None and dv.StatusCode is not None else ua.StatusCode()
    ts_us = None
    if dv is not None:
        ts_us = _us(dv.SourceTimestamp) or _us(dv.ServerTimestamp)
    if ts_us is None:
        ts_us = _us(dt.datetime.now(dt.UTC))
    assert ts_us is not None
    if isinstance(value, list):
        dtype = _SAMPLE_TYPES.get(variant.VariantType, "f32") if variant is not None else "f32"
    else:
        dtype = "f32"
        value = _plain(value)
    return Change(
        handle=item.ClientHandle,
        value=value,
        status=status.value,
        status_name=status_name(status.value),
        ts_us=ts_us,
        dtype=dtype,  # type: ignore[arg-type]
    )


# ---- browsing ---------------------------------------------------------------------------------


async def browse_objects(session: UaSession, root: str, max_depth: int) -> list[BrowsedObject]:
    """Every object under ``root`` (a browse path or NodeId) with its variables, depth first."""
    client = session.client
    found: list[BrowsedObject] = []
    seen: set[ua.NodeId] = set()
    namespaces = await session.namespaces()

    def text(node: ua.NodeId) -> str:
        """``nsu=<uri>;...``: the index of a namespace changes when a PLC project is rebuilt."""
        index = node.NamespaceIndex
        if index == 0 or index >= len(namespaces):
            plain: str = node.to_string()
            return plain
        return nsu_text(
            namespaces[index], ua.NodeId(node.Identifier, 0, node.NodeIdType).to_string()
        )

    async def visit(node: Node, name: str, path: str, depth: int) -> None:
        refs = await node.get_children_descriptions(refs=ObjectIds.HierarchicalReferences)
        variables: list[BrowsedVariable] = []
        objects: list[tuple[ua.ReferenceDescription, str]] = []
        for ref in refs:
            target = ref.NodeId
            if ref.ReferenceTypeId == _HAS_PROPERTY:
                continue
            child_path = f"{path}/{ref.BrowseName.to_string()}"
            if ref.NodeClass == ua.NodeClass.Variable:
                variables.append(await _variable(client.get_node(target), ref, text(target)))
            elif ref.NodeClass == ua.NodeClass.Object:
                if target == _SERVER_OBJECT or target.NamespaceIndex == 0 or target in seen:
                    continue
                seen.add(target)
                objects.append((ref, child_path))
        if variables:
            found.append(BrowsedObject(name, text(node.nodeid), path or "/", variables))
        if depth < max_depth:
            for ref, child_path in objects:
                await visit(client.get_node(ref.NodeId), ref.BrowseName.Name, child_path, depth + 1)

    async def walk() -> None:
        if root.startswith("/"):
            start = await client.nodes.root.get_child(root)
            start_path = root.rstrip("/")
        else:
            start = client.get_node(root)
            start_path = root
        await visit(start, start_path.rsplit("/", 1)[-1], start_path, 0)

    await session._call(walk())
    return found


_RATE_NAMES: Final = frozenset(
    {"samplerate", "samplingrate", "samplefrequency", "samplingfrequency", "rate_hz", "ratehz"}
)
"""Property names under which servers give an array's sample rate (no standard one exists)."""


async def _variable(node: Node, ref: ua.ReferenceDescription, node_text: str) -> BrowsedVariable:
    rank = await node.read_value_rank()
    try:
        variant = (await node.read_data_type_as_variant_type()).name
    except UaError:
        variant = "Unknown"
    unit, low, high, description = "", None, None, ""
    rate_hz: float | None = None
    for prop in await node.get_properties():
        name = (await prop.read_browse_name()).Name
        if name.lower() in _RATE_NAMES:
            rate = await prop.read_value()
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
                rate_hz = float(rate)
        if name == "EngineeringUnits":
            eu = await prop.read_value()
            if isinstance(eu, ua.EUInformation) and eu.DisplayName is not None:
                unit = eu.DisplayName.Text or ""
        elif name == "EURange":
            rng = await prop.read_value()
            if isinstance(rng, ua.Range):
                low, high = float(rng.Low), float(rng.High)
    try:
        text = (await node.read_description()).Text or ""
        description = "" if text == ref.BrowseName.Name else text
    except UaError:
        description = ""
    return BrowsedVariable(
        name=ref.BrowseName.Name,
        node=node_text,
        variant=variant,
        is_array=rank is not None and rank >= 0,  # 0: one or more dimensions
        unit=unit,
        low=low,
        high=high,
        description=description,
        rate_hz=rate_hz,
    )
