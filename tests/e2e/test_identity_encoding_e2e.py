"""Identity headers with non-ASCII or control characters, over HTTP and over a WebSocket handshake.

A real gateway process in front of a raw TCP backend that records the request heads it gets as
bytes. HTTP requests are written by the gateway's own client (bytes, identity values as UTF-8);
WebSocket handshakes by aiohttp (text): the backend must get the same bytes either way. No
encoding is specified for the identity headers, so the HTTP path's UTF-8 is the reference.
Values with CR, LF or NUL are refused on both paths (400, audit ``invalid-header``) before the
backend is contacted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from plant_gateway import migrations
from tests.fixtures.loopback import LoopbackServer
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.processes import Proc, mint_token, start_gateway

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IDENTITY = (b"x-user-id", b"x-customer-id", b"x-user-roles")
USER_ID = "usér-漢字-ß"
CUSTOMER_ID = "cust-é-漢"
ROLES = ["admin", "rôle-漢"]
NOTE = "café 漢"  # a client header: passed through as the client's bytes on both paths


class RawBackend(LoopbackServer):
    """Answers every request, records each request head by its target; 101 for upgrades."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: dict[bytes, bytes] = {}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads[head.split(b" ", 2)[1]] = head
            fields = header_fields(head)
            key = dict(fields).get(b"sec-websocket-key")
            if key is None:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            else:
                accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())  # noqa: S324
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                    b"\x88\x02\x03\xe8"  # close 1000, unmasked (server to client)
                )
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)  # until the gateway hangs up
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def header_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercase name, value bytes exactly as sent) for each header line of a request head."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        if line:
            name, _, value = line.partition(b":")
            out.append((name.lower(), value[1:] if value.startswith(b" ") else value))
    return out


def identity_of(head: bytes) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for name, value in header_fields(head):
        if name in (*IDENTITY, b"x-note"):
            found.setdefault(name, []).append(value)
    return found


@pytest.fixture(scope="module")
async def raw_backend() -> AsyncIterator[RawBackend]:
    backend = RawBackend()
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture(scope="module")
def audit_dsn(postgres_dsn: str) -> Iterator[str]:
    dsn = create_database(postgres_dsn, "pgw_ident_enc")
    migrations.upgrade(dsn)
    yield dsn
    drop_database(dsn)


@pytest.fixture(scope="module")
def gw(raw_backend: RawBackend, audit_dsn: str) -> Iterator[Proc]:
    env: dict[str, str | None] = {
        "PLANT_GUARDS": "auth,audit", "DATABASE_URL": audit_dsn,
        "AUDIT_FLUSH_INTERVAL_S": "0.05", "UPSTREAM_RETRIES": "0",
    }
    proc = start_gateway(env, backend_url=f"http://127.0.0.1:{raw_backend.port}")
    yield proc
    proc.stop()


def token(**claims: Any) -> str:
    return mint_token(user_id=USER_ID, customer_id=CUSTOMER_ID, roles=ROLES, **claims)


def headers_for(bearer: str, cid: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer}", "X-Correlation-ID": cid, "X-Note": NOTE}


async def http_get(gw: Proc, path: str, bearer: str, cid: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + path, headers=headers_for(bearer, cid)) as resp,
    ):
        body = await resp.read()
        return resp.status, body


async def ws_handshake(gw: Proc, path: str, bearer: str, cid: str) -> int:
    """The status the client's handshake got (101 when the gateway accepted it)."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(gw.url + path, headers=headers_for(bearer, cid)) as ws:
                await asyncio.wait_for(ws.receive(), 5)
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def audit_rows(dsn: str, cids: list[str]) -> dict[str, tuple[int, str | None]]:
    """correlation id -> (status_code, error_type), waiting until every cid has its row."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(200):
            rows = await conn.fetch(
                "SELECT correlation_id::text AS cid, status_code, error_type "
                "FROM gateway_audit_logs WHERE correlation_id = ANY($1::uuid[])", cids,
            )
            if len(rows) >= len(cids):
                break
            await asyncio.sleep(0.1)
        return {row["cid"]: (row["status_code"], row["error_type"]) for row in rows}
    finally:
        await conn.close()


async def test_non_ascii_identity_reaches_backend_as_the_same_utf8_bytes_on_both_paths(
    gw: Proc, raw_backend: RawBackend
) -> None:
    marker = uuid.uuid4().hex
    http_path, ws_path = f"/api/v1/enc/{marker}/http", f"/api/v1/enc/{marker}/ws"
    status, body = await http_get(gw, http_path, token(), str(uuid.uuid4()))
    assert (status, body) == (200, b"ok"), gw.output()[-2000:]
    assert await ws_handshake(gw, ws_path, token(), str(uuid.uuid4())) == 101, gw.output()[-2000:]

    over_http = identity_of(raw_backend.heads[http_path.encode()])
    over_ws = identity_of(raw_backend.heads[ws_path.encode()])
    expected = {
        b"x-user-id": [USER_ID.encode()],
        b"x-customer-id": [CUSTOMER_ID.encode()],
        b"x-user-roles": [",".join(ROLES).encode()],
        b"x-note": [NOTE.encode()],
    }
    assert over_http == expected
    assert over_ws == over_http


@pytest.mark.parametrize(
    "bad", ["u\r\nX-Injected: 1", "u\nX-Injected: 1", "u\rv", "u\x00v", "u\ud800v"]
)
async def test_cr_lf_nul_in_a_claim_is_refused_on_both_paths_before_the_backend(
    gw: Proc, raw_backend: RawBackend, audit_dsn: str, bad: str
) -> None:
    marker = uuid.uuid4().hex
    http_path, ws_path = f"/api/v1/enc/{marker}/http", f"/api/v1/enc/{marker}/ws"
    http_cid, ws_cid = str(uuid.uuid4()), str(uuid.uuid4())
    bearer = mint_token(user_id=bad, roles=["admin"])

    status, body = await http_get(gw, http_path, bearer, http_cid)
    assert status == 400, body
    # uvicorn answers a handshake closed before accept with 403, whatever the problem was
    assert await ws_handshake(gw, ws_path, bearer, ws_cid) == 403

    assert http_path.encode() not in raw_backend.heads
    assert ws_path.encode() not in raw_backend.heads
    rows = await audit_rows(audit_dsn, [http_cid, ws_cid])
    assert rows[http_cid] == (400, "invalid-header")
    assert rows[ws_cid] == rows[http_cid]


async def test_a_header_that_is_not_utf8_is_refused_on_the_websocket_path(
    gw: Proc, raw_backend: RawBackend, audit_dsn: str
) -> None:
    """aiohttp writes header text as UTF-8: latin-1 bytes cannot reach the backend unchanged."""
    path, cid = f"/api/v1/enc/{uuid.uuid4().hex}/ws", str(uuid.uuid4())
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Authorization: Bearer " + token().encode() + b"\r\n"
            b"X-Correlation-ID: " + cid.encode() + b"\r\nX-Note: caf\xe9\r\n\r\n"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert status_line.split()[1] == b"403", status_line
    assert path.encode() not in raw_backend.heads
    assert (await audit_rows(audit_dsn, [cid]))[cid] == (400, "invalid-header")


async def test_other_control_characters_are_refused_on_the_websocket_path(
    gw: Proc, raw_backend: RawBackend, audit_dsn: str
) -> None:
    """aiohttp refuses any C0 control but tab: a clean 400 ``invalid-header``, not an error."""
    path, cid = f"/api/v1/enc/{uuid.uuid4().hex}/ws", str(uuid.uuid4())
    bearer = mint_token(user_id="u\x01v", roles=["admin"])
    assert await ws_handshake(gw, path, bearer, cid) == 403
    assert path.encode() not in raw_backend.heads
    assert (await audit_rows(audit_dsn, [cid]))[cid] == (400, "invalid-header")
