"""Wildcard matching cases, checked against our matcher and against real Mosquitto."""

TOPICS = [
    "a",
    "a/b",
    "a/b/c",
    "a/b/c/d",
    "a/x/c",
    "a//c",
    "/a",
    "a/",
    "b/b",
    "acme/pune/stamping/line-3/cell-b/press-07/raw/data",
    "acme/pune/stamping/line-3/cell-b/press-07/raw/birth",
    "acme/pune/_node/featurizer/birth",
]

FILTERS = [
    "#",
    "a/#",
    "a/b/#",
    "a/+",
    "a/+/c",
    "+/b",
    "+/+",
    "+",
    "/+",
    "+/",
    "a/+/+/d",
    "a/b/c",
    "a//c",
    "+/+/+/+/+/+/raw/+",
    "+/+/+/+/+/+/+/birth",
    "acme/pune/_node/+/birth",
    "acme/+/#",
]
