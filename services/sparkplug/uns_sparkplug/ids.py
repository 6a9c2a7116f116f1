"""Sparkplug ids: light (the settings check them without importing protobuf)."""

from __future__ import annotations

import re
from typing import Final

_FORBIDDEN_ID: Final = re.compile(r"[/+#]")


def check_id(value: str, what: str) -> str:
    """A Sparkplug id (group, edge node, device, host): non-empty, no ``/``, ``+``, ``#``."""
    if not value or _FORBIDDEN_ID.search(value) or not value.isprintable():
        raise ValueError(
            f"{what} {value!r}: a Sparkplug id is non-empty and has no '/', '+' or '#'"
        )
    return value
