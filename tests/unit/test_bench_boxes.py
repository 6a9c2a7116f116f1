"""What a synthetic edge box of `uns bench boxes` sends: the example plant's bridge traffic,
at the rates the services publish it, in the project's own payloads."""

from __future__ import annotations

from uns import DeviceBirth, DeviceData, Event, NodeBirth, decode
from uns.topics import DeviceTopic, NodeTopic, parse
from uns_bench import boxes
from uns_bench.bridge import plant_messages_per_hour


def test_the_plant_sends_one_slow_features_message_per_device_per_hop():
    # uns-schema/plant.yaml: 4 presses and a conveyor with vibration (a features and a
    # scores message per 1 s window), a robot read over Modbus (slow tags only, its model
    # scores its slow features once per 10 s hop); each of the 6 a slow features message
    # per hop, however many slow tags it has
    per_hour = 5 * (3600 + 3600) + 6 * 360 + 360
    assert plant_messages_per_hour() == per_hour == 38_520
    per_tag = 5 * (3600 + 3600) + 360 * sum(
        len(boxes.slow_tags(m.asset)) for m in boxes.plant_machines()
    )
    assert per_tag > per_hour + 10_000  # what the per-tag count said before


def test_a_box_of_n_machines_cycles_the_plants_assets_under_unique_paths():
    machines = boxes.plant_machines(40)
    assert len({m.device for m in machines}) == 40
    assert [m.asset for m in machines[:6]] == [m.asset for m in boxes.plant_machines()]
    assert 1.7 < boxes.messages_per_s(machines) / 40 < 1.9


def test_every_message_of_a_box_is_a_payload_of_the_contract_on_its_topic():
    plant = boxes.plant_machines()
    payloads = boxes._Payloads()
    births = payloads.birth_messages("site-007", plant)
    kinds = {type(decode(p)) for _, p in births}
    assert kinds == {NodeBirth, DeviceBirth}
    assert all(isinstance(parse(t), NodeTopic | DeviceTopic) for t, _ in births)
    for st in boxes.streams(plant):
        topic, payload = payloads.data(st, "site-007", 5)
        parsed = parse(topic)
        assert isinstance(parsed, DeviceTopic)
        assert topic.startswith(f"{boxes.ENTERPRISE}/site-007/{st.device}/")
        message = decode(payload)
        if st.kind == "events":
            assert isinstance(message, Event) and message.device in topic
            continue
        assert isinstance(message, DeviceData) and message.window is not None, parsed
        if st.kind == "slow features":
            tags = {n for n, _ in boxes.slow_tags(st.asset)}
            assert set(message.signals or {}) == tags  # every slow tag in the one message
            assert {m.name.split(".")[0] for m in message.metrics} == tags
        if st.kind == "scores":
            assert message.model is not None and message.model.name == f"{st.asset}-anomaly"
        if st.kind == "features":
            assert all(m.name.startswith("vibration.") for m in message.metrics)
            assert len(payload) > 500
