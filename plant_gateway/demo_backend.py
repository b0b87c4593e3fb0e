"""A small, fast stand-in for the Plant backend, used by the demo and by every e2e test.

Run it with ``python -m plant_gateway.demo_backend --port N --name X``; each answer names it.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
from typing import Any

from aiohttp import WSMsgType, web

CHUNK = 64 * 1024


def _name(request: web.Request) -> str:
    return str(request.app["name"])


async def echo(request: web.Request) -> web.Response:
    """Echo method, path, query, headers and body as JSON (the default for any route)."""
    body = await request.read()
    try:
        text: Any = body.decode()
    except UnicodeDecodeError:
        text = body.hex()
    doc = {
        "backend": _name(request),
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": request.query_string,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body": text,
        "body_length": len(body),
    }
    headers = {"X-Backend-Name": _name(request), "X-Echo": "yes"}
    cost = request.headers.get("X-Demo-Cost")
    if cost:
        headers["X-Plant-Cost-USD"] = cost
    return web.json_response(doc, headers=headers)


async def big(request: web.Request) -> web.StreamResponse:
    """Stream ``size`` bytes of ``x`` in 64 KiB chunks."""
    size = int(request.query.get("size", str(1024 * 1024)))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = size
    await resp.prepare(request)
    block = b"x" * CHUNK
    remaining = size
    while remaining > 0:
        part = block if remaining >= CHUNK else block[:remaining]
        await resp.write(part)
        remaining -= len(part)
    await resp.write_eof()
    return resp


async def sse(request: web.Request) -> web.StreamResponse:
    """A server-sent event stream: ``count`` events, ``delay`` seconds apart."""
    count = int(request.query.get("count", "5"))
    delay = float(request.query.get("delay", "0.2"))
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    for i in range(count):
        await resp.write(f"id: {i}\ndata: event {i}\n\n".encode())
        await asyncio.sleep(delay)
    await resp.write_eof()
    return resp


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(f"hello from {_name(request)}")
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(f"echo: {msg.data}")
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.json_response({"backend": _name(request), "status": code}, status=code)


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "1")))
    return web.json_response({"backend": _name(request), "slow": True})


async def gz(request: web.Request) -> web.Response:
    payload = json.dumps({"backend": _name(request), "compressed": True}).encode()
    return web.Response(
        body=gzip.compress(payload),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )


async def openapi(request: web.Request) -> web.Response:
    doc = {
        "openapi": "3.1.0",
        "info": {"title": f"Plant demo backend ({_name(request)})", "version": "1.0"},
        "servers": [{"url": "http://internal-backend.invalid"}],
        "paths": {"/api/v1/agents": {"get": {"summary": "List agents"}}},
    }
    return web.json_response(doc)


async def validate(request: web.Request) -> web.Response:
    """Customer enrichment: tokens containing ``bad`` are refused, ``nocust`` is 404. The
    caller's token is read from X-Original-Authorization first, as the Plant backend does."""
    auth = request.headers.get("X-Original-Authorization", "") or request.headers.get(
        "Authorization", ""
    )
    token = auth.removeprefix("Bearer ").strip()
    if not token or "bad" in token:
        return web.json_response({"detail": "invalid token"}, status=401)
    if "nocust" in token:
        return web.json_response({"detail": "no customer"}, status=404)
    return web.json_response({"customer_id": "cust-demo-1", "email": "demo@waooaw.com"})


async def fast(request: web.Request) -> web.Response:
    return web.Response(body=b'{"ok":true}', content_type="application/json")


def iam(token: str) -> Any:
    """Cloud Run IAM in front of the service: only ``Authorization: Bearer <token>`` gets in."""

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=403, text="<html>Forbidden</html>", content_type="text/html")
        response: web.StreamResponse = await handler(request)
        return response

    return check


def make_app(name: str, iam_token: str | None = None) -> web.Application:
    middlewares = [iam(iam_token)] if iam_token else []
    app = web.Application(client_max_size=1024**3, middlewares=middlewares)
    app["name"] = name
    app.router.add_get("/fast", fast)
    app.router.add_get("/big", big)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", ws_echo)
    app.router.add_route("*", "/status/{code:\\d+}", status)
    app.router.add_get("/slow", slow)
    app.router.add_get("/gzip", gz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/api/v1/auth/validate", validate)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("BACKEND_PORT", "9000")))
    parser.add_argument("--name", default=os.environ.get("BACKEND_NAME", "production"))
    parser.add_argument("--iam-token", help="act as an IAM-protected Cloud Run service")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(make_app(args.name, args.iam_token), host=args.host, port=args.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
