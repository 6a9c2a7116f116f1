"""The tag map's nodes are checked without asyncua, and exactly as asyncua parses them.

`uns_opcua_adapter.nodetext` follows asyncua's grammar so that loading a config imports no
asyncua; here asyncua itself is the referee, on texts built from the grammar's pieces.
"""

from __future__ import annotations

import pytest
from asyncua import ua
from asyncua.ua.uaerrors import UaStringParsingError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from uns_opcua_adapter.logic import split_nsu
from uns_opcua_adapter.nodetext import check_node
from uns_opcua_adapter.ua import is_reference_type

PIECES = [
    *"/.<>&#!:;= %",
    *("&/", "&>", "&&", "&.", "&a", "2:", "0:", "12:", "ns=2;", "ns=", "ns=x;", "i=", "i=5"),
    *("i=2258", "s=", "s=Temp", "s=a;b=c", "g=", "g=72962b91-fa75-4ae6-8d28-b404dc7daf63"),
    *("g={72962B91FA754AE68D28B404DC7DAF63}", "b=", "b=0x0aff", "b=0xzz", "b=YWJj", "b=é"),
    *("srv=1;", "srv=x;", "nsu=urn:x;", "nsu=", "nsu=urn:a%3Bb;", "i=1_0", "i=+3", "i=-1"),
    *("i=٣", "HasComponent", "Organizes", "Server", "NoSuchType", "Objects", "Temp", "é"),
]
texts = st.lists(st.sampled_from(PIECES), max_size=8).map("".join) | st.text(
    alphabet="/.<>&#!:;=nsigbrvu0123456789xAT ", max_size=16
)


def asyncua_accepts(text: str) -> bool:
    """What the adapter's check was when it called asyncua's parsers."""
    if text.startswith("/"):
        try:
            path = ua.RelativePath.from_string(text)
        except ValueError:
            return False
        return bool(path.Elements) and all(e.TargetName is not None for e in path.Elements)
    nsu = split_nsu(text)
    if nsu is not None:
        uri, identifier = nsu
        try:
            node = ua.NodeId.from_string(identifier) if uri and identifier else None
        except (UaStringParsingError, ValueError):
            return False
        return node is not None and not identifier.startswith(("ns=", "nsu=", "srv="))
    try:
        node = ua.NodeId.from_string(text)
    except (UaStringParsingError, ValueError):
        return False
    return not isinstance(node, ua.ExpandedNodeId)


def accepts(text: str) -> bool:
    try:
        check_node(text, is_reference_type)
    except ValueError:
        return False
    return True


@settings(max_examples=3000, deadline=None)
@given(texts)
@example("/Objects/2:Plant/2:Press01/2:Temp")
@example("/Objects<HasComponent>2:Temp")
@example("/Objects<#!Organizes>2:Temp")
@example("/Objects<NoSuchType>2:Temp")
@example("/2:")
@example("/a&>")
@example("ns=2;s=stamping.line-3.cell-a.press-01.bearing_temp")
@example("nsu=urn:a%3Bb;s=x;y")
@example("i=5;nsu=urn:x")
@example("b=é")
def test_a_node_passes_exactly_when_asyncua_parses_it(text: str) -> None:
    assert accepts(text) == asyncua_accepts(text), text


@pytest.mark.parametrize("text", ["/Objects<Nope>2:Temp", "/a&b", "x=1", "ns=2;i=x", "srv=1;i=5"])
def test_a_refused_node_is_told_how_to_write_it(text: str) -> None:
    with pytest.raises(ValueError, match=r"write"):
        check_node(text, is_reference_type)
