"""Tensor shapes as clients send them (v1 and v2), checked before anything is allocated: a
list of non-negative integers, of at most ``MAX_RANK`` dimensions; element counts are Python
integers, which never overflow, so a message can say exactly what a shape needs."""

from __future__ import annotations

import math
from typing import Any

from service.core.errors import BadRequestError

# More than any image classifier takes (numpy itself stops at 64).
MAX_RANK = 32
# Most elements a shape may describe, its zero dimensions left out (so that an empty
# [0, 2**31, 2**31] counts): 16 GiB of float32, far past any body limit, within what numpy
# can index.
MAX_ELEMENTS = 2**32
# A shape echoed in an error message is cut to this many characters.
SHOWN_CHARS = 100


def shown(value: Any) -> str:
    """``repr(value)``, cut to ``SHOWN_CHARS`` characters: a client's text is not echoed
    whole."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def check_shape(shape: Any, what: str) -> tuple[int, ...]:
    """``shape`` as a tuple; 400 naming ``what`` unless it is a list of at most ``MAX_RANK``
    non-negative integers describing at most ``MAX_ELEMENTS`` elements."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequestError(f"{what} must be a list of non-negative integers, got {shown(shape)}")
    if len(shape) > MAX_RANK:
        raise BadRequestError(
            f"{what} has {len(shape)} dimensions; at most {MAX_RANK} are accepted"
        )
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise BadRequestError(
            f"{what} {shown(shape)} describes more than {MAX_ELEMENTS} elements (its non-zero "
            "dimensions multiplied)"
        )
    return tuple(shape)


def elements(shape: tuple[int, ...]) -> int:
    """The number of elements of ``shape``, exactly (no fixed-width overflow)."""
    return math.prod(shape)
