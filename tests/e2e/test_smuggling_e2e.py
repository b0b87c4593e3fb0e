"""Request smuggling probes: nothing the gateway did not check reaches the backend.

Each probe hides a second request (``GET /smuggled-<name>``, no token) in the framing of an
authorised first one: CL.TE, TE.CL, obfuscated or duplicated ``Transfer-Encoding``, conflicting
or malformed ``Content-Length``, bad chunk sizes, obs-fold, bare CR/LF, NUL bytes. Behind the
gateway sits a backend with a strict parser (h11) that reads every upstream connection as a
stream of requests: if the gateway ever forwarded framing that disagreed with what it checked,
the hidden request would appear there as a request of its own, or as a framing error.

Every probe must get an answer (4xx, or the first request's own answer when the framing is
unambiguous), never a 5xx and never a hang; the backend must never see a ``/smuggled`` target
nor a byte stream it cannot frame; the gateway must still serve a normal request afterwards.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from tests.fixtures.processes import Proc, mint_token, start_gateway
from tests.fixtures.strict_backend import StrictBackend

TOKEN = mint_token(customer_id="cust-A")
FRONT = f"POST /api/v1/tasks HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n"


def hidden(name: str) -> str:
    return f"GET /smuggled-{name} HTTP/1.1\r\nHost: gw\r\n\r\n"


def cl_te(name: str, te: str = "Transfer-Encoding: chunked") -> str:
    body = "0\r\n\r\n" + hidden(name)
    return f"{FRONT}Content-Length: {len(body)}\r\n{te}\r\n\r\n{body}"


def te_cl(name: str, te: str = "Transfer-Encoding: chunked") -> str:
    inner = hidden(name)
    return f"{FRONT}{te}\r\nContent-Length: 4\r\n\r\n{len(inner):x}\r\n{inner}\r\n0\r\n\r\n"


def with_length(name: str, *lengths: str) -> str:
    body = hidden(name)
    fields = "".join(f"Content-Length: {v}\r\n" for v in lengths)
    return f"{FRONT}{fields}\r\n{body}"


def chunked(name: str, size_line: str) -> str:
    return f"{FRONT}Transfer-Encoding: chunked\r\n\r\n{size_line}\r\n{hidden(name)}\r\n0\r\n\r\n"


def raw_head(name: str, field: str) -> str:
    body = hidden(name)
    return f"{FRONT}{field}\r\nContent-Length: {len(body)}\r\n\r\n{body}"


PROBES: dict[str, Callable[[str], str]] = {
    "cl-te": cl_te,
    "te-cl": te_cl,
    "te-space-before-colon": lambda n: cl_te(n, "Transfer-Encoding : chunked"),
    "te-xchunked": lambda n: cl_te(n, "Transfer-Encoding: xchunked"),
    "te-tab": lambda n: cl_te(n, "Transfer-Encoding:\tchunked"),
    "te-obs-fold": lambda n: cl_te(n, "Transfer-Encoding:\r\n chunked"),
    "te-twice": lambda n: cl_te(n, "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity"),
    "te-list": lambda n: cl_te(n, "Transfer-Encoding: identity, chunked"),
    "te-upper": lambda n: cl_te(n, "TRANSFER-ENCODING: CHUNKED"),
    "te-bare-lf": lambda n: cl_te(n, "X-A: b\nTransfer-Encoding: chunked"),
    "te-leading-space-name": lambda n: cl_te(n, " Transfer-Encoding: chunked"),
    "te-cl-tab": lambda n: te_cl(n, "Transfer-Encoding:\tchunked"),
    "te-cl-chunked-identity": lambda n: te_cl(n, "Transfer-Encoding: chunked, identity"),
    "cl-conflicting": lambda n: with_length(n, "5", str(len(hidden(n)))),
    "cl-list": lambda n: with_length(n, f"5, {len(hidden(n))}"),
    "cl-plus": lambda n: with_length(n, f"+{len(hidden(n))}"),
    "cl-negative": lambda n: with_length(n, "-1"),
    "cl-hex": lambda n: with_length(n, "0x10"),
    "cl-junk": lambda n: with_length(n, f"{len(hidden(n))}abc"),
    "cl-huge": lambda n: with_length(n, "99999999999999999999999"),
    "cl-space-in-name": lambda n: raw_head(n, "Content Length: 3"),
    "chunk-size-overflow": lambda n: chunked(n, "ffffffffffffffffffff"),
    "chunk-size-negative": lambda n: chunked(n, "-1"),
    "chunk-size-leading-space": lambda n: chunked(n, f" {len(hidden(n)):x}"),
    "chunk-ext-bare-lf": lambda n: f"{FRONT}Transfer-Encoding: chunked\r\n\r\n0;x\n\r\n"
                                   + hidden(n),
    "chunk-bare-lf-end": lambda n: f"{FRONT}Transfer-Encoding: chunked\r\n\r\n0\n\n" + hidden(n),
    "chunk-size-0x": lambda n: chunked(n, f"0x{len(hidden(n)):x}"),
    "http10-te": lambda n: cl_te(n).replace("HTTP/1.1\r\nHost: gw\r\nAuth", "HTTP/1.0\r\n"
                                            "Host: gw\r\nAuth", 1),
    "nul-in-value": lambda n: raw_head(n, "X-A: a\x00b"),
    "cr-in-value": lambda n: raw_head(n, "X-A: a\rTransfer-Encoding: chunked"),
    "connection-strips-length": lambda n: raw_head(n, "Connection: Content-Length"),
    "connection-strips-te": lambda n: cl_te(n, "Transfer-Encoding: chunked\r\n"
                                               "Connection: Transfer-Encoding"),
    "trailer-te": lambda n: f"{FRONT}Transfer-Encoding: chunked\r\n\r\n0\r\n"
                            f"Transfer-Encoding: chunked\r\n\r\n{hidden(n)}",
    "expect-100": lambda n: raw_head(n, "Expect: 100-continue"),
    "absolute-target": lambda n: f"GET http://other.example/smuggled-{n} HTTP/1.1\r\n"
                                 f"Host: gw\r\n\r\n",
    "space-in-target": lambda n: f"GET /api/v1/tasks /smuggled-{n} HTTP/1.1\r\nHost: gw\r\n\r\n",
    "pipelined-without-token": lambda n: f"GET /api/v1/tasks HTTP/1.1\r\nHost: gw\r\n"
                                         f"Authorization: Bearer {TOKEN}\r\n\r\n" + hidden(n),
}
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@pytest.fixture(scope="module")
async def strict_backend() -> AsyncIterator[StrictBackend]:
    backend = StrictBackend()
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture(scope="module")
def gw(strict_backend: StrictBackend) -> Iterator[Proc]:
    proc = start_gateway({"PLANT_GUARDS": "auth,tenant", "CUSTOMER_ENRICHMENT": "false",
                          "UPSTREAM_RETRIES": "0"}, backend_url=strict_backend.url)
    yield proc
    proc.stop()


async def exchange(gw: Proc, data: str) -> list[int]:
    """Send the bytes, read until the gateway closes (or 3 s of silence); the statuses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    received = b""
    try:
        writer.write(data.encode("latin-1"))
        await writer.drain()
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 3)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        pass  # kept alive after a complete answer: fine, as long as there was one
    finally:
        writer.close()
    return [int(s) for s in STATUS.findall(received)]


@pytest.mark.parametrize("name", sorted(PROBES))
async def test_a_hidden_request_never_reaches_the_backend(
    gw: Proc, strict_backend: StrictBackend, name: str
) -> None:
    statuses = await exchange(gw, PROBES[name](name))
    assert statuses, "no answer"
    assert all(s < 500 for s in statuses), statuses
    await asyncio.sleep(0.05)  # anything forwarded has reached the backend by now
    assert not [t for t in strict_backend.targets() if "smuggled" in t]
    assert not strict_backend.framing_errors


async def test_the_gateway_still_serves_and_forwarded_clean_framing_only(
    gw: Proc, strict_backend: StrictBackend
) -> None:
    before = len(strict_backend.requests)
    body = '{"customer_id": "cust-A"}'
    statuses = await exchange(gw, f"{FRONT}Content-Length: {len(body)}\r\n"
                                  f"Connection: close\r\n\r\n{body}")
    assert statuses == [200]
    assert strict_backend.requests[before:][0].target == "/api/v1/tasks"
    assert strict_backend.requests[before:][0].body == body.encode()
    assert not strict_backend.framing_errors
