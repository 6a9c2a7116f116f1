"""A model card's asset slug and version are whole names: a trailing newline is refused
(Python's ``$`` matches before a final newline, so ``press\\n`` passed before)."""

from __future__ import annotations

import msgspec
import pytest

from uns_inference.card import Slug, Version


@pytest.mark.parametrize("kind", [Slug, Version])
def test_a_card_name_with_a_trailing_newline_is_refused(kind):
    assert msgspec.convert("press-1", kind) == "press-1"
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert("press-1\n", kind)
