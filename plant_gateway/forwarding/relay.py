"""The response relay: the upstream's answer back to the client, streamed or in one piece.

With a policy ``mask_fields`` obligation the JSON body is read whole and masked instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from plant_gateway import masking
from plant_gateway.forwarding.client import UpstreamError, UpstreamResponse
from plant_gateway.forwarding.headers import response_fields
from plant_gateway.forwarding.upstream import bad_gateway, count
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext
    from plant_gateway.forwarding.upstream import Upstream

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
SMALL_BODY = 64 * 1024  # responses up to this size (with a Content-Length) are sent in one piece


class ResponseStarted(Exception):
    """The upstream failed after the response head was sent: the connection must be aborted."""


async def relay(
    upstream: Upstream, ctx: RequestContext, resp: UpstreamResponse, send: Send,
    extra: list[tuple[bytes, bytes]], cost_header: bytes,
) -> Problem | None:
    """Stream the response back; a Problem only when nothing was sent yet."""
    ctx.status_code = resp.status
    upstream_headers = resp.headers
    ctx.response_headers = [
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream_headers
    ]
    _cost(ctx, resp, cost_header)
    headers = response_fields(upstream_headers, ctx) + extra
    fields = masking.fields_to_mask(ctx)
    if fields and ctx.method != "HEAD" and masking.is_json(_text(resp, b"content-type")):
        return await relay_masked(upstream, ctx, resp, send, headers, fields)
    start = {"type": "http.response.start", "status": resp.status, "headers": headers}
    length = resp.content_length
    if ctx.method != "HEAD" and length is not None and 0 < length <= SMALL_BODY:
        # small and of known size: read it before the head, then head and body back to back
        # (one write on the wire), and a broken body is still a clean 502/504, not an abort
        try:
            body = await resp.read()
        except (TimeoutError, UpstreamError) as exc:
            return read_failed(upstream, exc)
        finally:
            resp.release()
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return None
    try:
        await send(start)
        if ctx.method != "HEAD":
            while (chunk := await resp.read_chunk()) is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except (UpstreamError, TimeoutError) as exc:
        count(upstream, "stream")
        ctx.error_type = "upstream-stream-error"
        raise ResponseStarted(type(exc).__name__) from exc
    finally:
        resp.release()
    return None


def read_failed(upstream: Upstream, exc: Exception) -> Problem:
    """Reading a whole (small or masked) body failed before anything was sent."""
    if isinstance(exc, TimeoutError):
        count(upstream, "timeout")
        upstream.breaker.failure()
        return Problem(504, "gateway-timeout", "the backend did not answer in time")
    return bad_gateway(upstream, exc)


async def relay_masked(
    upstream: Upstream, ctx: RequestContext, resp: UpstreamResponse,
    send: Send, headers: list[tuple[bytes, bytes]], fields: frozenset[str],
) -> Problem | None:
    """Policy obligation ``mask_fields``: read the JSON body whole (up to
    POLICY_MASK_MAX_BYTES), mask it, then send it; never stream it unmasked (502 instead)."""
    settings = upstream.settings
    limit = settings.policy_mask_max_bytes
    try:
        if resp.status == 206:
            raise masking.Unmaskable("a partial JSON body (206) cannot be masked")
        if resp.content_length is not None and resp.content_length > limit:
            raise masking.Unmaskable(f"the JSON body exceeds {limit} bytes")
        raw = await masking.read_capped(resp.chunks(), limit)
        encoding = _text(resp, b"content-encoding")
        body = masking.mask_body(masking.decode(raw, encoding, limit), fields,
                                 settings.max_json_depth)
    except masking.Unmaskable as exc:
        ctx.error_type = "mask-refused"
        return masking.refused(str(exc))
    except (TimeoutError, UpstreamError) as exc:
        return read_failed(upstream, exc)
    finally:
        resp.release()
    out = masking.masked_headers(headers, len(body))
    await send({"type": "http.response.start", "status": resp.status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return None


def _text(resp: UpstreamResponse, name: bytes) -> str | None:
    value = resp.header(name)
    return None if value is None else value.decode("latin-1")


def _cost(ctx: RequestContext, resp: UpstreamResponse, header: bytes) -> None:
    """The backend's cost header (USD, non-negative) onto the context, for metering."""
    value = resp.header(header)
    if value is None:
        return
    try:
        cost = float(value)
    except ValueError:
        return
    if cost >= 0:
        ctx.upstream_cost_usd = cost
