"""WebSocket forwarding: the upstream handshake through aiohttp, then a bridge both ways.

The same header hygiene, identity token and circuit breaker as the HTTP path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import aiohttp

from plant_gateway.forwarding.client import InvalidHeader
from plant_gateway.forwarding.headers import encoded_header_fields, text_fields
from plant_gateway.forwarding.upstream import no_id_token, unavailable
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext
    from plant_gateway.forwarding.proxy import Proxy

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def forward_websocket(
    proxy: Proxy, ctx: RequestContext, receive: Receive, send: Send
) -> Problem | None:
    """Bridge an accepted-to-be ASGI websocket with the upstream's websocket.

    ``Proxy.websocket`` is this function (a method: ``proxy`` is its ``self``).
    """
    upstream = proxy.upstream(ctx.target_backend)
    if not upstream.breaker.allow():
        return unavailable(upstream, "circuit open")
    assert upstream.session is not None
    try:
        fields = encoded_header_fields(ctx, proxy.settings) + await upstream.auth_field()
        headers = text_fields([f for f in fields if f[0].lower() != b"content-length"])
    except (aiohttp.ClientError, TimeoutError):
        upstream.breaker.failure()
        return no_id_token()
    except InvalidHeader as exc:
        ctx.error_type = "invalid-header"  # as on the HTTP path
        return Problem(400, "bad-request", f"a header value cannot be forwarded: {exc}")
    protocols = [
        p.strip() for p in ctx.headers.get("sec-websocket-protocol", "").split(",") if p.strip()
    ]
    try:
        ws = await upstream.session.ws_connect(
            upstream.url(ctx.upstream_path, ctx.query_string), headers=headers,
            protocols=protocols, autoping=True,
        )
    except aiohttp.WSServerHandshakeError as exc:
        ctx.status_code = exc.status
        return Problem(502, "bad-gateway", f"the backend refused the websocket ({exc.status})")
    except aiohttp.ClientConnectorError:
        upstream.breaker.failure()
        return unavailable(upstream, "connection failed")
    except (aiohttp.ClientError, TimeoutError):
        upstream.breaker.failure()
        return Problem(504, "gateway-timeout", "the backend did not accept the websocket")
    upstream.breaker.success()
    ctx.status_code = 101
    await send({"type": "websocket.accept", "subprotocol": ws.protocol})
    await _bridge(ws, receive, send)
    return None


async def _bridge(ws: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send) -> None:
    """Messages both ways until either side closes; then both directions end."""
    async def client_to_upstream() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await ws.close()
                return
            if message.get("text") is not None:
                await ws.send_str(message["text"])
            elif message.get("bytes") is not None:
                await ws.send_bytes(message["bytes"])

    async def upstream_to_client() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": msg.data})
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": msg.data})
        code = ws.close_code or 1000
        await send({"type": "websocket.close", "code": code if code != 1006 else 1011})

    tasks = [
        asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ws.close()
