"""NodeId strings and browse paths of the tag map, checked without asyncua.

Loading a config checks every tag's node (`settings.OpcUaAdapterSettings`), and a config
check must not import asyncua (`uns up` reads every service's settings in its own
process). So the grammar of asyncua's `NodeId.from_string` and `RelativePath.from_string`
(OPC UA Part 6, 5.3.1.10, and Part 4, A.2) is followed here rule for rule: a text passes
exactly when asyncua parses it (tests/unit/test_opcua_nodetext.py compares the two on
generated texts). The one thing asyncua alone knows, the names of the standard reference
types (``<HasComponent>`` in a browse path), is asked of ``is_reference_type``
(`ua.is_reference_type`), only for a path that names one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Final

from uns_opcua_adapter.logic import split_nsu

_NS_INDEX: Final = re.compile(r"([0-9]*):")
_STOPS: Final = "/.<"
_RESERVED: Final = "/.<>:#!&"


def check_node(text: str, is_reference_type: Callable[[str], bool]) -> None:
    """Raise `ValueError` unless ``text`` is a NodeId string or a browse path from Root."""
    if text.startswith("/"):
        if not _browse_path_ok(text, is_reference_type):
            raise ValueError(
                f"node {text!r} is not a browse path; write /Objects/2:Plant/2:Press01/2:Temp"
            )
        return
    nsu = split_nsu(text)
    if nsu is not None:
        uri, identifier = nsu
        parsed = parse_node_id(identifier) if uri and identifier else None
        if parsed is None or identifier.startswith(("ns=", "nsu=", "srv=")):
            raise ValueError(
                f"node {text!r} is not a NodeId; write nsu=<namespace URI>;s=Press01.Temp"
                " (a ';' in the URI as %3B)"
            )
        return
    expanded = parse_node_id(text)
    if expanded is None:
        raise ValueError(
            f"node {text!r} is not a NodeId; write e.g. ns=2;s=Press01.Temp, ns=3;i=1042,"
            " nsu=urn:plc:ns;s=Press01.Temp (or a browse path starting with /)"
        )
    if expanded:  # "i=5;nsu=..." or "srv=1;...": not subscribable
        raise ValueError(f"node {text!r}: write the namespace URI first, nsu=<uri>;i=5")


def parse_node_id(text: str) -> bool | None:
    """None when asyncua's `NodeId.from_string` refuses ``text``; else whether it makes an
    ExpandedNodeId of it (an ``nsu=`` or ``srv=`` part)."""
    elements = text.split(";")
    found = expanded = False
    while elements:
        element = elements.pop(0)
        if not element:
            continue
        key, sep, value = element.partition("=")
        if not sep:
            return None
        key = key.strip()
        try:
            if key in ("ns", "i", "srv"):
                int(value.strip())
            elif key == "g":
                uuid.UUID(f"urn:uuid:{value}")
            elif key == "b":
                # hex after 0x; else base64, and failing that the text itself: ASCII either way
                bytes.fromhex(value[2:]) if value[0:2] == "0x" else value.encode("ascii")
        except ValueError:
            return None
        if key == "s":
            return expanded  # a string identifier is the whole rest, ';' and '=' included
        found = found or key in ("i", "g", "b")
        expanded = expanded or key in ("srv", "nsu")
    return expanded if found else None


def _browse_path_ok(text: str, is_reference_type: Callable[[str], bool]) -> bool:
    """Whether asyncua's `RelativePath.from_string` parses ``text`` into elements that all
    have a target name."""
    rest = text
    while rest:
        head = rest[0]
        if head in "/.":
            rest = rest[1:]
        elif head == "<":
            rest = rest[1:]
            for flag in "#!":
                if rest[:1] == flag:
                    rest = rest[1:]
            parsed = _name(rest, reference=True)
            if parsed is None or parsed[0] is None or not is_reference_type(parsed[0]):
                return False
            rest = parsed[1]
        parsed = _name(rest, reference=False)
        if parsed is None or parsed[0] is None:
            return False
        rest = parsed[1]
    return True


def _name(text: str, *, reference: bool) -> tuple[str | None, str] | None:
    """A (namespace-prefixed) browse name at the start of ``text``: (its name, the rest);
    (None, rest) for an empty name in namespace 0; None when it is malformed."""
    rest = text
    index = 0
    m = _NS_INDEX.match(rest)
    if m:
        index = int(m.group(1)) if m.group(1) else 0
        rest = rest[m.end() :]
    name: list[str] = []
    head = ""
    while rest:
        head = rest[0]
        if reference:
            if head == ">":
                rest = rest[1:]
                break
        elif head in _STOPS:
            break
        if head == "&":
            rest = rest[1:]
            if not rest or rest[0] not in _RESERVED:
                return None  # an escape of nothing, or of an ordinary character
            head = rest[0]
        name.append(head)
        rest = rest[1:]
    if reference and head != ">":
        return None  # no closing '>' (asyncua looks at the last character read)
    if not name:
        if reference:
            return None
        if index == 0:
            return None, rest
    return "".join(name), rest
