"""Policy obligation ``mask_fields``: mask those keys of a JSON response before it is sent.

Deny by default: a JSON body the gateway cannot read whole (too large, nested deeper than
MAX_JSON_DEPTH, bad JSON, unknown encoding) is refused (502 ``bad-gateway``), never relayed
unmasked. Other media types pass unchanged.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from plant_gateway import json_limits
from plant_gateway.problems import Problem
from plant_gateway.redaction import MASK

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext

# response headers that describe the upstream's (unmasked) representation
STALE_HEADERS = frozenset(
    {b"content-length", b"content-encoding", b"etag", b"content-md5", b"digest", b"content-range"}
)


# stands for a malformed obligation (not a list): nothing can be masked selectively -> refuse
INVALID = frozenset({"\x00invalid-mask-fields"})


class Unmaskable(Exception):
    """The body cannot be masked; the message is the problem's detail."""


def fields_to_mask(ctx: RequestContext) -> frozenset[str]:
    """The ``obligations.mask_fields`` of the request's policy decision (empty when none)."""
    decision = ctx.policy_decision
    if not decision:
        return frozenset()
    obligations = decision.get("obligations")
    fields = obligations.get("mask_fields") if isinstance(obligations, dict) else None
    if not fields:
        return frozenset()
    if not isinstance(fields, list):
        return INVALID
    return frozenset(str(f) for f in fields)


def is_json(content_type: str | None) -> bool:
    """``application/json`` or any ``+json`` media type (parameters ignored)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                            and media.endswith("+json"))


def mask_value(value: Any, fields: frozenset[str]) -> Any:
    """A copy with every object key in ``fields`` (at any depth) replaced by ``"***"``."""
    if isinstance(value, dict):
        return {k: (MASK if k in fields else mask_value(v, fields)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_value(item, fields) for item in value]
    return value


def decode(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The identity bytes of a body sent with ``Content-Encoding``; gzip and deflate only."""
    coding = (encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding in ("gzip", "x-gzip", "deflate"):
        wbits = 47 if coding != "deflate" else 15  # 47: gzip or zlib header, auto-detected
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise Unmaskable("the backend sent a corrupt compressed JSON body") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise Unmaskable(f"the JSON body exceeds {limit} bytes once decompressed")
        return out
    raise Unmaskable(f"a JSON body with Content-Encoding {coding!r} cannot be masked")


def mask_body(
    body: bytes, fields: frozenset[str], max_depth: int = json_limits.MAX_DEPTH
) -> bytes:
    """The body with the fields masked; an empty body stays empty. Raises Unmaskable."""
    if not body.strip():
        return body
    if fields is INVALID:
        raise Unmaskable("the policy's mask_fields obligation is malformed")
    if json_limits.too_deep(body, max_depth):  # mask_value recurses once per level
        raise Unmaskable(f"the backend's JSON nests deeper than {max_depth} levels")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Unmaskable("the backend sent invalid JSON that must be masked") from None
    return orjson.dumps(mask_value(document, fields))


async def read_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, or Unmaskable as soon as it grows past ``limit`` bytes."""
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise Unmaskable(f"the JSON body exceeds {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def masked_headers(
    headers: Iterable[tuple[bytes, bytes]], length: int
) -> list[tuple[bytes, bytes]]:
    """Response headers for a masked body: no stale length/encoding/validators, a new length."""
    out = [(k, v) for k, v in headers if k.lower() not in STALE_HEADERS]
    out.append((b"content-length", str(length).encode()))
    return out


def refused(detail: str) -> Problem:
    return Problem(502, "bad-gateway", f"The response could not be masked as the policy requires: "
                                       f"{detail}; it was not sent.")
