"""A Sparkplug B peer we did not write: pysparkplug (0.6.1), run in its own virtual
environment (it needs paho-mqtt < 2; ours is 2.x), driven by JSON lines on stdin and
reporting JSON lines on stdout. Used by tests/integration/test_sparkplug*.py.

``observe PORT``: a host-side observer: subscribes to ``spBv1.0/#`` and prints every
message as pysparkplug decodes it (aliases resolved from the births it saw, datatypes,
values), with the metric properties read by pysparkplug's own protobuf module. Commands:
``{"op": "rebirth", "group", "edge"}`` (an NCMD), ``{"op": "state", "host", "online",
"timestamp"}`` (a retained 3.0 STATE), ``{"op": "dcmd", "group", "edge", "device",
"name", "value"}``.

``edge PORT GROUP EDGE``: an edge node (pysparkplug's EdgeNode). Commands: ``connect``,
``register`` (device, metrics), ``update`` (device, metrics), ``deregister`` (device),
``gap`` (skip one seq number), ``kill`` (vanish: the broker sends the NDEATH will). It
prints ``{"ncmd": [...]}`` for each NCMD it receives and answers a rebirth request with
NBIRTH and every DBIRTH.

Not imported by the tests (another interpreter runs it); checked by ruff only.
"""
# mypy: ignore-errors

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

import pysparkplug as spb
from paho.mqtt import client as paho
from pysparkplug._protobuf import Payload as PbPayload

_out_lock = threading.Lock()


def say(**fields: Any) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(fields, default=repr) + "\n")
        sys.stdout.flush()


def _props(raw: bytes) -> list[dict[str, Any]]:
    pb = PbPayload()
    pb.ParseFromString(raw)
    out = []
    for m in pb.metrics:
        props = {}
        if m.HasField("properties"):
            for key, value in zip(m.properties.keys, m.properties.values):
                field = value.WhichOneof("value")
                props[key] = getattr(value, field) if field else None
        out.append(props)
    return out


def _metric(m: Any, props: dict[str, Any]) -> dict[str, Any]:
    value = m.value
    if isinstance(value, tuple):
        value = list(value)
    return {
        "name": m.name,
        "alias": m.alias,
        "datatype": m.datatype.name,
        "value": value,
        "timestamp": m.timestamp,
        "is_null": m.is_null,
        "properties": props,
    }


def observe(port: int) -> None:
    births: dict[tuple[str, str, str | None], Any] = {}
    client = paho.Client(client_id=f"spb-observer-{os.getpid()}", clean_session=True)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            topic = spb.Topic.from_str(msg.topic)
            if topic.message_type == spb.MessageType.STATE:
                state = spb.State.decode(msg.payload)
                say(topic=msg.topic, type="STATE", online=state.online, timestamp=state.timestamp)
                return
            key = (topic.group_id, topic.edge_node_id, topic.device_id)
            payload = topic.message_type.payload.decode(msg.payload, birth=births.get(key))
            if isinstance(payload, (spb.NBirth, spb.DBirth)):
                births[key] = payload
            if topic.message_type == spb.MessageType.NBIRTH:  # a node birth voids its devices'
                for k in [k for k in births if k[:2] == key[:2] and k[2] is not None]:
                    del births[k]
            metrics = getattr(payload, "metrics", ())
            if isinstance(payload, spb.NDeath):
                metrics = (payload.bd_seq_metric,)
            props = _props(msg.payload)
            say(
                topic=msg.topic,
                type=topic.message_type.name,
                group=topic.group_id,
                edge=topic.edge_node_id,
                device=topic.device_id,
                seq=getattr(payload, "seq", None),
                timestamp=getattr(payload, "timestamp", None),
                qos=msg.qos,
                retain=msg.retain,
                metrics=[_metric(m, p) for m, p in zip(metrics, props or [{}] * len(metrics))],
            )
        except Exception as exc:  # every failure to decode is a finding
            say(topic=msg.topic, type="ERROR", error=f"{type(exc).__name__}: {exc}")

    client.on_message = on_message
    client.on_subscribe = lambda *_a: say(type="READY")
    client.on_connect = lambda c, *_a: c.subscribe("spBv1.0/#", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "rebirth":
            payload = spb.NCmd(
                timestamp=spb.get_current_timestamp(),
                metrics=(
                    spb.Metric(
                        timestamp=spb.get_current_timestamp(),
                        name="Node Control/Rebirth",
                        datatype=spb.DataType.BOOLEAN,
                        value=True,
                    ),
                ),
            )
            topic = f"spBv1.0/{cmd['group']}/NCMD/{cmd['edge']}"
            client.publish(topic, payload.encode(include_dtypes=True), qos=0).wait_for_publish()
        elif op == "state":
            state = spb.State(timestamp=cmd["timestamp"], online=cmd["online"])
            topic = f"spBv1.0/STATE/{cmd['host']}"
            client.publish(topic, state.encode(), qos=1, retain=True).wait_for_publish()
        elif op == "dcmd":
            payload = spb.DCmd(
                timestamp=spb.get_current_timestamp(),
                metrics=(
                    spb.Metric(
                        timestamp=spb.get_current_timestamp(),
                        name=cmd["name"],
                        datatype=spb.DataType[cmd.get("datatype", "DOUBLE")],
                        value=cmd["value"],
                    ),
                ),
            )
            topic = f"spBv1.0/{cmd['group']}/DCMD/{cmd['edge']}/{cmd['device']}"
            client.publish(topic, payload.encode(include_dtypes=True), qos=0).wait_for_publish()
        say(type="DONE", op=op)
    client.disconnect()
    client.loop_stop()


def _metrics(specs: list[dict[str, Any]]) -> tuple[Any, ...]:
    return tuple(
        spb.Metric(
            timestamp=spb.get_current_timestamp(),
            name=s["name"],
            datatype=spb.DataType[s["datatype"]],
            value=s.get("value"),
            alias=s.get("alias"),
        )
        for s in specs
    )


def edge(port: int, group: str, edge_id: str) -> None:
    node: spb.EdgeNode | None = None

    births: list[Any] = []  # the NBIRTH bdSeq metrics published, last = this session's

    def rebirth() -> None:
        # pysparkplug 0.6.1 has no rebirth: replay its on-connect births with this
        # session's bdSeq (its on-connect has already prepared the next session's)
        following = node._bd_seq_metric
        node._bd_seq_metric = births[-1]
        node._client._client.on_connect(node._client._client, None, {}, 0)
        node._bd_seq_metric = following

    def on_ncmd(_node: Any, message: Any) -> None:
        names = [m.name for m in message.payload.metrics]
        say(type="NCMD", metrics=names)
        if "Node Control/Rebirth" in names:
            threading.Thread(target=rebirth).start()

    node = spb.EdgeNode(group, edge_id, metrics=(), cmd_callback=on_ncmd)
    publish = node._client.publish

    def publishing(message: Any, **kwargs: Any) -> None:
        if isinstance(message.payload, spb.NBirth):
            births.extend(m for m in message.payload.metrics if m.name == "bdSeq")
        publish(message, **kwargs)

    node._client.publish = publishing
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "connect":
            node._client._client.on_subscribe = lambda *_a: say(type="SUBSCRIBED")
            node.connect("127.0.0.1", port=port)
        elif op == "register":
            node.register(spb.Device(cmd["device"], _metrics(cmd["metrics"])))
        elif op == "update":
            node.update_device(cmd["device"], _metrics(cmd["metrics"]))
        elif op == "deregister":
            node.deregister(cmd["device"])
        elif op == "gap":
            _ = node._seq  # a message lost on its way: the next one skips a number
        elif op == "kill":
            sys.stdout.flush()
            os._exit(0)  # no DISCONNECT: the broker publishes our will (NDEATH)
        say(type="DONE", op=op)


if __name__ == "__main__":
    mode, port, *rest = sys.argv[1:]
    if mode == "observe":
        observe(int(port))
    else:
        edge(int(port), *rest)
