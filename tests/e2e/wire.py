"""Raw HTTP/1.1 over asyncio streams for the fault tests: exact bytes, half-sent requests,
connections the server closes; plus the gateway's metrics and audit rows by correlation id."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import asyncpg

WAIT = 15.0  # upper bound for anything the gateway must do on its own


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = True  # False: the connection closed before the body's end

    def json(self) -> Any:
        return json.loads(self.body)


def head(method: str, path: str, cid: str = "", extra: str = "", length: int | None = None
         ) -> bytes:
    """A request head; ``length``: a Content-Length header."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if cid:
        lines.append(f"X-Correlation-ID: {cid}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_conn(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)


async def read_answer(reader: asyncio.StreamReader, within: float = WAIT) -> Answer:
    """One response (content-length, chunked or until EOF); ``complete`` False if cut short."""
    async with asyncio.timeout(within):
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        answer = Answer(int(lines[0].split()[1]))
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                answer.headers[name.strip().lower()] = value.strip()
        try:
            if "content-length" in answer.headers:
                answer.body = await reader.readexactly(int(answer.headers["content-length"]))
            elif answer.headers.get("transfer-encoding") == "chunked":
                await _chunked(reader, answer)
            else:
                answer.body = await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            answer.complete = False
    return answer


async def _chunked(reader: asyncio.StreamReader, answer: Answer) -> None:
    """The chunks into ``answer.body`` as they come (kept when the connection is cut)."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.strip() or b"0", 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return
        answer.body += chunk[:-2]


async def closed_by_peer(reader: asyncio.StreamReader, within: float = WAIT) -> bytes:
    """Everything the server still sends until it closes the connection (TimeoutError if it
    does not within ``within``)."""
    out = b""
    async with asyncio.timeout(within):
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionError:
                return out
            if not data:
                return out
            out += data


async def request(port: int, data: bytes, within: float = WAIT) -> Answer:
    """One request on its own connection."""
    reader, writer = await open_conn(port)
    try:
        writer.write(data)
        return await read_answer(reader, within)
    finally:
        writer.close()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback test servers
        return json.loads(resp.read())


def metric(base_url: str, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 when absent)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(?:\{([^}]*)\})? (\S+)$", line)
        if match and match.group(1) == name:
            have = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
            if have == wanted:
                return float(match.group(3))
    return 0.0


async def eventually(check: Any, within: float = WAIT, every: float = 0.05) -> Any:
    """Poll ``check()`` until it returns something truthy; its last value otherwise."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every)


async def audit_rows(dsn: str, cids: list[str], expected: int, within: float = WAIT) -> list:
    """Rows of these correlation ids once ``expected`` are there (or after ``within``)."""
    deadline = time.monotonic() + within
    while True:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT correlation_id::text AS cid, status_code, error_type "
                "FROM gateway_audit_logs WHERE correlation_id = ANY($1::uuid[])", cids,
            )
        finally:
            await conn.close()
        if len(rows) >= expected or time.monotonic() > deadline:
            return list(rows)
        await asyncio.sleep(0.2)
