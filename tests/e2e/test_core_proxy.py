"""End-to-end forwarding: a real gateway process in front of the real demo backend.

Pass-through, streaming both ways, SSE, WebSocket, header hygiene, limits and framing.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import Iterator

import aiohttp
import psutil
import pytest
from yarl import URL

from tests.fixtures.processes import Proc, start_gateway

MAX_BODY = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def gw(backend: Proc) -> Iterator[Proc]:
    proc = start_gateway(
        {"PLANT_GUARDS": "tenant", "MAX_BODY_BYTES": str(MAX_BODY),
         "CORS_ORIGINS": "https://app.example"},
        backend=backend,
    )
    yield proc
    proc.stop()


async def test_pass_through_method_path_query_body_status_headers(gw: Proc) -> None:
    async with aiohttp.ClientSession() as s:
        url = URL(gw.url + "/api/v1/items/7?a=1&b=two%20words", encoded=True)
        async with s.put(url, data=b'{"x":1}', headers={"X-Custom": "kept"}) as r:
            doc = await r.json()
            assert r.status == 200
            assert r.headers["X-Backend-Name"] == "production"
            assert r.headers["X-Target-Backend"] == "production"
            assert r.headers["X-Correlation-ID"] and r.headers["X-Request-ID"]
        headers = {k.lower(): v for k, v in doc["headers"]}
        assert doc["method"] == "PUT" and doc["path"] == "/api/v1/items/7"
        assert doc["raw_path"] == "/api/v1/items/7?a=1&b=two%20words"
        assert doc["body"] == '{"x":1}'
        assert headers["x-custom"] == "kept"
        assert headers["x-gateway"] == "plant-gateway"
        async with s.delete(gw.url + "/status/418") as r:
            assert r.status == 418
            assert (await r.json())["status"] == 418


async def test_correlation_id_kept_when_valid_and_minted_when_not(gw: Proc) -> None:
    cid = "3f2b8c1e-8a4e-4a8e-9c1d-1f2e3d4c5b6a"
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/api/v1/x", headers={"X-Correlation-ID": cid}) as r:
            assert r.headers["X-Correlation-ID"] == cid
            sent = dict((await r.json())["headers"])
            assert sent["X-Correlation-ID"] == cid
        async with s.get(gw.url + "/api/v1/x", headers={"X-Correlation-ID": "'; drop"}) as r:
            assert r.headers["X-Correlation-ID"] != "'; drop"
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with s.get(gw.url + "/api/v1/x", headers={"traceparent": trace}) as r:
            sent = dict((await r.json())["headers"])
            assert sent["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")


async def test_large_upload_streams_through_intact(gw: Proc) -> None:
    payload = b"y" * (MAX_BODY - 10)

    async def chunks():  # chunked transfer: no Content-Length known up front
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    async with aiohttp.ClientSession() as s, s.post(gw.url + "/api/v1/upload", data=chunks()) as r:
        doc = await r.json()
    assert r.status == 200
    assert doc["body_length"] == len(payload)


def _rss(proc: Proc) -> int:
    p = psutil.Process(proc.popen.pid)
    return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])


async def test_100mb_download_streams_without_buffering(gw: Proc) -> None:
    size = 100 * 1024 * 1024
    before = _rss(gw)
    peak = before
    received = 0
    async with aiohttp.ClientSession() as s, s.get(gw.url + f"/big?size={size}") as r:
        assert r.status == 200
        async for chunk in r.content.iter_chunked(1 << 20):
            received += len(chunk)
            if received % (10 << 20) < len(chunk):
                peak = max(peak, _rss(gw))
    assert received == size
    assert peak - before < 20 * 1024 * 1024, f"gateway RSS grew by {(peak - before) >> 20} MiB"


async def test_sse_events_arrive_before_the_stream_ends(gw: Proc) -> None:
    # 1000 events 0.2 s apart: a buffering proxy would show nothing for minutes
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/sse?count=1000&delay=0.2") as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readline(), 10)
        second = await asyncio.wait_for(r.content.readline(), 10)
        assert first == b"id: 0\n" and second == b"data: event 0\n"


async def test_websocket_echo(gw: Proc) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(gw.url + "/ws") as ws:
        hello = await asyncio.wait_for(ws.receive_str(), 5)
        assert hello == "hello from production"
        await ws.send_str("ping")
        assert await asyncio.wait_for(ws.receive_str(), 5) == "echo: ping"
        await ws.send_bytes(b"\x00\x01")
        assert await asyncio.wait_for(ws.receive_bytes(), 5) == b"\x00\x01"


async def test_spoofed_identity_and_gateway_headers_never_reach_backend(gw: Proc) -> None:
    spoof = {
        "X-Gateway": "evil", "X-Gateway-Type": "PP", "X-User-ID": "attacker",
        "X-User-Roles": "admin", "X-Customer-ID": "someone-else",
        "X-Original-Authorization": "Bearer stolen", "X-Debug-Trace": "1",
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil.example",
        "Authorization": "Bearer client-token",
    }
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/api/v1/x", headers=spoof) as r:
        doc = await r.json()
        assert not any(k.lower().startswith("x-debug") for k in r.headers)
    sent: dict[str, list[str]] = {}
    for key, value in doc["headers"]:
        sent.setdefault(key.lower(), []).append(value)
    assert sent["x-gateway"] == ["plant-gateway"]
    assert sent["x-gateway-type"] == ["PLANT"]
    assert "x-user-id" not in sent and "x-user-roles" not in sent
    assert "x-customer-id" not in sent and "x-debug-trace" not in sent
    assert sent["x-original-authorization"] == ["Bearer client-token"]
    assert "authorization" not in sent
    assert sent["x-forwarded-for"] == ["127.0.0.1"]
    assert sent["x-forwarded-host"] != ["evil.example"]


async def test_body_over_limit_is_413(gw: Proc) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/api/v1/x", data=b"z" * (MAX_BODY + 1)) as r:
            assert r.status == 413
            assert r.headers["Content-Type"] == "application/problem+json"
            doc = await r.json(content_type=None)
            assert doc["type"].endswith("/errors/payload-too-large")
            assert doc["correlation_id"] == r.headers["X-Correlation-ID"]

        async def chunks():
            for _ in range(MAX_BODY // 65536 + 4):
                yield b"z" * 65536

        async with s.post(gw.url + "/api/v1/x", data=chunks()) as r:
            assert r.status == 413


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                part = sock.recv(65536)
            except TimeoutError:
                break
            if not part:
                break
            data += part
            if b"\r\n\r\n" in data:
                break
    return data


@pytest.mark.parametrize(
    "head",
    [
        b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST /api/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /api/v1/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /api/v1/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n",
    ],
    ids=["cl-and-te", "duplicate-cl", "duplicate-host", "oversized-header"],
)
def test_conflicting_or_duplicated_framing_is_400(gw: Proc, head: bytes) -> None:
    answer = _raw(gw.port, head)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


@pytest.mark.parametrize(
    "path",
    ["/api/v1/../admin", "/api/v1/%2e%2e/admin", "/api/v1/a%2fb", "/api/v1/a%00b",
     "/api//v1/x", "/api/v1/./x", "/api/v1/%252e%252e/x"],
)
def test_hostile_paths_are_400(gw: Proc, path: str) -> None:
    answer = _raw(gw.port, f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


async def test_compressed_body_keeps_its_content_encoding(gw: Proc) -> None:
    gzip_only = {"Accept-Encoding": "gzip"}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.get(gw.url + "/gzip", headers=gzip_only) as r,
    ):
        raw = await r.read()
        assert r.headers["Content-Encoding"] == "gzip"
        assert int(r.headers["Content-Length"]) == len(raw)
    assert json.loads(gzip.decompress(raw))["compressed"] is True


async def test_cors_echoes_allowed_origin_never_star_and_on_errors_too(gw: Proc) -> None:
    origin = {"Origin": "https://app.example"}
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/api/v1/x", headers=origin) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
        async with s.get(URL(gw.url + "/api/v1/../x", encoded=True), headers=origin) as r:
            assert r.status == 400
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        async with s.get(gw.url + "/api/v1/x", headers={"Origin": "https://evil.example"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
        preflight = {**origin, "Access-Control-Request-Method": "DELETE"}
        async with s.options(gw.url + "/api/v1/x", headers=preflight) as r:
            assert r.status == 204
            assert "DELETE" in r.headers["Access-Control-Allow-Methods"]
            assert r.headers["Access-Control-Allow-Origin"] != "*"


async def test_health_reveals_nothing_and_openapi_servers_rewritten(
    gw: Proc, backend: Proc
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/health") as r:
            text = await r.text()
            assert r.status == 200
        assert str(backend.port) not in text and "http" not in text
        async with s.get(gw.url + "/ready") as r:  # public: the status alone
            assert r.status == 200 and await r.json() == {"status": "ready"}
        async with s.get(gw.admin_url + "/ready") as r:  # admin: every dependency, no URL
            ready = await r.text()
            assert r.status == 200
        assert str(backend.port) not in ready and "://" not in ready
        assert json.loads(ready)["guards"] == ["tenant"]
        async with s.get(gw.url + "/openapi.json") as r:
            doc = await r.json()
        assert doc["servers"] == [{"url": f"http://127.0.0.1:{gw.port}"}]
        async with s.get(gw.url + "/docs") as r:
            assert "/openapi.json" in await r.text()
        async with s.get(gw.url + "/metrics") as r:  # not on the public listener
            assert r.status == 404 and (await r.json())["type"].endswith("/errors/not-found")
        async with s.get(gw.admin_url + "/metrics") as r:
            metrics_text = await r.text()
        health = 'plant_gateway_requests_total{method="GET",route="/health",status="200"}'
        assert health in metrics_text
        assert "plant_gateway_circuit_state" in metrics_text


async def test_backend_timeout_is_504(backend: Proc, gateway_factory) -> None:
    gw = gateway_factory(
        {"PLANT_GUARDS": "tenant", "UPSTREAM_READ_TIMEOUT_S": "0.3"}, backend=backend
    )
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/slow?delay=3") as r:
        assert r.status == 504
        assert (await r.json(content_type=None))["type"].endswith("/errors/gateway-timeout")
