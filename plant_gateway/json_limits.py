"""A nesting limit for JSON the gateway parses: checked before any parser recurses into a body.

Python's json module (and any code walking a parsed document) recurses once per level, so a
2,000-deep array from a client ends in ``RecursionError``; orjson stops at 1,024 levels but
its output and our walkers do not go that far. ``too_deep`` answers in two C-level scans for
ordinary bodies and in a few more for the rare one with many brackets.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64  # the default of the MAX_JSON_DEPTH setting
# a JSON string (brackets inside one do not nest); the unrolled form keeps the regex linear
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
# "[" and "{" -> +1, "]" and "}" -> -1 (as signed bytes, summed by ``accumulate``)
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


class TooDeep(ValueError):
    """The document nests deeper than the limit; the message says so for a problem's detail."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the JSON body nests deeper than {limit} levels")
        self.limit = limit


def too_deep(body: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """Whether a JSON text nests arrays/objects deeper than ``limit`` levels (``[]`` is 1).

    Text that is not JSON may be judged either way; its parser refuses it anyway.
    """
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # the common case: not enough brackets to nest that deep
    if b'"' in data:
        data = _STRING.sub(b"", data)
    signs = data.translate(_SIGNS, _NOT_BRACKETS)
    return max(accumulate(memoryview(signs).cast("b")), default=0) > limit


def loads(body: bytes | str, limit: int = MAX_DEPTH) -> Any:
    """``json.loads`` (exact long integers, as before) refusing documents deeper than ``limit``.

    Raises ``TooDeep`` or another ``ValueError`` (``UnicodeDecodeError`` included).
    """
    if too_deep(body, limit):
        raise TooDeep(limit)
    try:
        return json.loads(body)
    except RecursionError:  # not reachable within the limit; kept so no input can be a 500
        raise TooDeep(limit) from None
