"""The mask_fields obligation's helpers: which bodies are JSON, masking at any depth, refusals.

The HTTP path (proxy relay) is covered end to end in tests/e2e/test_policy_mask_e2e.py.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest

from plant_gateway import masking
from plant_gateway.context import RequestContext

FIELDS = frozenset({"email", "ssn"})


def ctx_with(decision: dict[str, Any] | None) -> RequestContext:
    ctx = RequestContext(request_id="r", correlation_id="c", method="GET", path="/api/v1/x",
                         query_string="", headers={}, client_ip="127.0.0.1")
    ctx.policy_decision = decision
    return ctx


def test_fields_from_the_decision() -> None:
    decision = {"obligations": {"mask_fields": ["email", "ssn"]}}
    assert masking.fields_to_mask(ctx_with(decision)) == FIELDS
    assert masking.fields_to_mask(ctx_with({"obligations": {"mask_fields": []}})) == frozenset()
    assert masking.fields_to_mask(ctx_with(None)) == frozenset()


def test_malformed_obligation_refuses_every_json_body() -> None:
    fields = masking.fields_to_mask(ctx_with({"obligations": {"mask_fields": "email"}}))
    assert fields
    with pytest.raises(masking.Unmaskable):
        masking.mask_body(b'{"email": "a"}', fields)


@pytest.mark.parametrize(("content_type", "expected"), [
    ("application/json", True), ("Application/JSON; charset=utf-8", True),
    ("application/problem+json", True), ("text/plain", False), (None, False),
    ("application/x-ndjson", False), ("text/json+x", False),
])
def test_is_json(content_type: str | None, expected: bool) -> None:
    assert masking.is_json(content_type) is expected


def test_masks_keys_at_any_depth_including_lists() -> None:
    doc = {"email": {"work": "w"}, "n": [{"ssn": 1, "k": [{"email": None}]}, "email"],
           "keep": "email"}
    assert masking.mask_value(doc, FIELDS) == {
        "email": "***", "n": [{"ssn": "***", "k": [{"email": "***"}]}, "email"], "keep": "email"}


def test_mask_body_and_headers() -> None:
    body = masking.mask_body(json.dumps([{"email": "a@b", "x": 1}]).encode(), FIELDS)
    assert json.loads(body) == [{"email": "***", "x": 1}]
    headers = masking.masked_headers(
        [(b"content-type", b"application/json"), (b"Content-Length", b"99"), (b"etag", b'"1"'),
         (b"content-encoding", b"gzip"), (b"x-other", b"1")], len(body))
    assert headers == [(b"content-type", b"application/json"), (b"x-other", b"1"),
                       (b"content-length", str(len(body)).encode())]
    assert masking.mask_body(b"", FIELDS) == b""


def test_invalid_json_refused() -> None:
    with pytest.raises(masking.Unmaskable, match="invalid JSON"):
        masking.mask_body(b'{"email": ', FIELDS)


def test_decode_gzip_deflate_and_refuse_others() -> None:
    raw = b'{"email": "a"}'
    assert masking.decode(gzip.compress(raw), "gzip", 1000) == raw
    assert masking.decode(zlib.compress(raw), "deflate", 1000) == raw
    assert masking.decode(raw, None, 1000) == raw
    with pytest.raises(masking.Unmaskable, match="'br'"):
        masking.decode(raw, "br", 1000)
    with pytest.raises(masking.Unmaskable, match="corrupt"):
        masking.decode(b"not gzip", "gzip", 1000)


def test_decompression_bomb_refused() -> None:
    bomb = gzip.compress(b"{" + b" " * 100_000 + b"}")
    with pytest.raises(masking.Unmaskable, match="exceeds 1000 bytes"):
        masking.decode(bomb, "gzip", 1000)


async def test_read_capped() -> None:
    async def chunks(n: int) -> Any:
        for _ in range(n):
            yield b"x" * 100

    assert await masking.read_capped(chunks(3), 300) == b"x" * 300
    with pytest.raises(masking.Unmaskable):
        await masking.read_capped(chunks(4), 300)
