import pytest
from hypothesis import given
from hypothesis import strategies as st

from topic_cases import FILTERS, TOPICS
from uns import DevicePath, DeviceTopic, NodeTopic, TopicError, matches, node_topic, parse
from uns.topics import device_filter, validate_filter

slugs = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,15}", fullmatch=True)
paths = st.builds(DevicePath, slugs, slugs, slugs, slugs, slugs, slugs)
streams = st.sampled_from(["raw", "features", "scores", "events", "cmd"])


@given(paths, streams, slugs)
def test_a_built_topic_parses_back_to_the_same_device_stream_and_message(path, stream, message):
    parsed = parse(path.topic(stream, message))
    assert parsed == DeviceTopic(path, stream, message)
    assert DevicePath.parse(str(path)) == path


@given(slugs, slugs, slugs, st.sampled_from(["birth", "death", "cmd"]))
def test_a_node_topic_parses_back(enterprise, site, node_id, message):
    parsed = parse(node_topic(enterprise, site, node_id, message))
    assert parsed == NodeTopic(enterprise, site, node_id, message)


def test_the_design_example_parses_into_its_isa95_levels():
    t = parse("acme/pune/stamping/line-3/cell-b/press-07/raw/data")
    assert isinstance(t, DeviceTopic)
    assert t.path.area == "stamping" and t.path.line == "line-3" and t.path.device == "press-07"
    assert (t.stream, t.message) == ("raw", "data")


@pytest.mark.parametrize(
    "bad",
    ["Press-07", "press 07", "-press", "_node", "", "press/07", "préss", "a" * 65, "a+b", "a#"],
)
def test_an_invalid_level_is_refused_with_the_level_named(bad):
    with pytest.raises(TopicError, match="invalid device"):
        DevicePath("acme", "pune", "stamping", "line-3", "cell-b", bad)


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("acme/pune/stamping/line-3/cell-b/press-07/raw", "not a namespace topic"),
        ("acme/pune/stamping/line-3/cell-b/press-07/telemetry/data", "invalid stream"),
        ("acme/pune/Stamping/line-3/cell-b/press-07/raw/data", "invalid area"),
        ("acme/pune/_node/featurizer/hello", "invalid node message"),
    ],
)
def test_a_foreign_topic_is_refused_with_the_reason(topic, why):
    with pytest.raises(TopicError, match=why):
        parse(topic)


def test_a_device_path_must_have_six_levels():
    with pytest.raises(TopicError, match="expected 6 levels"):
        DevicePath.parse("acme/pune/stamping/line-3/press-07")


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", ""])
def test_an_invalid_filter_is_refused(bad):
    with pytest.raises(TopicError):
        validate_filter(bad)


def test_wildcards_at_the_first_level_do_not_see_dollar_topics():
    assert not matches("#", "$SYS/broker/uptime")
    assert not matches("+/broker/uptime", "$SYS/broker/uptime")
    assert matches("$SYS/#", "$SYS/broker/uptime")
    assert matches("$SYS/broker/+", "$SYS/broker/uptime")


def test_hash_also_matches_the_parent_level():
    assert matches("a/#", "a")
    assert matches("a/b/#", "a/b")
    assert not matches("a/b/#", "a")


def test_the_matcher_agrees_with_a_brute_force_reading_of_the_standard():
    def reference(f: str, t: str) -> bool:
        fl, tl = f.split("/"), t.split("/")
        if fl[-1] == "#":
            head = fl[:-1]
            return len(tl) >= len(head) and all(a in ("+", b) for a, b in zip(head, tl))
        return len(fl) == len(tl) and all(a in ("+", b) for a, b in zip(fl, tl))

    for f in FILTERS:
        for t in TOPICS:
            assert matches(f, t) == reference(f, t), (f, t)


def test_device_filter_selects_one_stream_of_every_device():
    assert device_filter(stream="raw", message="data") == "+/+/+/+/+/+/raw/data"
    path = DevicePath.parse("acme/pune/stamping/line-3/cell-b/press-07")
    assert matches(device_filter(path, "cmd"), path.topic("cmd", "fault"))
