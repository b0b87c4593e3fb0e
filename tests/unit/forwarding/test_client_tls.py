"""Forwarding to an ``https://`` upstream (plant_gateway.forwarding.client), real TLS servers.

The gateway has no setting of its own for the upstream CA: ``pool_for_url`` builds the pool's
context with ``ssl.create_default_context()`` when the upstream starts, so it verifies the
certificate and the host name against OpenSSL's default trust store, which an operator points at
a private CA with ``SSL_CERT_FILE`` (or ``SSL_CERT_DIR``). These tests do exactly that, with a
throwaway PKI made with ``cryptography``: a CA the client trusts, one it does not, and server
certificates signed by them.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from yarl import URL

from plant_gateway.forwarding import Proxy
from plant_gateway.forwarding.client import HIGH_WATER, ConnectError, UpstreamPool, pool_for_url
from plant_gateway.pipeline.ingress import BodySource, context_from_scope
from plant_gateway.settings import Settings

BLOCK = bytes(range(256)) * 256  # 64 KiB
UPLOAD = BLOCK * 64  # 4 MiB: more than the socket and TLS buffers, so writes must wait
BIG = 8 * 1024 * 1024


# --- a throwaway PKI ----------------------------------------------------------------------------

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the gateway is told to trust
    good: Leaf  # localhost + 127.0.0.1, signed by that CA
    foreign: Leaf  # the same names, signed by a CA nobody trusts
    wrong_name: Leaf  # signed by the trusted CA, but for another host


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, key: Key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _make_ca(common_name: str) -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False,
    )
    cert = (
        _builder(common_name, _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    directory: Path, stem: str, ca: tuple[x509.Certificate, Key], names: list[x509.GeneralName]
) -> Leaf:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(stem, ca_cert.subject, key)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf = Leaf(directory / f"{stem}.pem", directory / f"{stem}.key")
    leaf.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    leaf.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    trusted, untrusted = _make_ca("plant test CA"), _make_ca("someone else's CA")
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(trusted[0].public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=ca_path,
        good=_make_leaf(directory, "good", trusted, local),
        foreign=_make_leaf(directory, "foreign", untrusted, local),
        wrong_name=_make_leaf(directory, "wrong", trusted, [x509.DNSName("wrong.example")]),
    )


@pytest.fixture
def trust_ca(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The operator's configuration: trust the private CA, and nothing else (empty CA dir)."""
    empty = tmp_path / "no-certs"
    empty.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty))
    yield pki.ca


# --- the TLS backend ----------------------------------------------------------------------------

class TlsBackend:
    """An aiohttp.web backend behind TLS recording, per request, the client port (= the
    connection), and per handshake the SNI name the client sent (None for none)."""

    def __init__(self, leaf: Leaf) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(leaf.cert, leaf.key)
        self.context.sni_callback = self._sni
        self.server_names: list[str | None] = []
        self.ports: list[int] = []
        self.headers: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    def _sni(self, sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self.server_names.append(name)

    def _seen(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.ports.append(peer[1] if peer else -1)
        self.headers.append(dict(request.headers))

    async def echo(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.read()
        return web.json_response({
            "method": request.method, "path": request.path_qs, "length": len(body),
            "te": request.headers.get("Transfer-Encoding"), "tls": request.secure,
            "sha": hashlib.sha256(body).hexdigest(),
        })

    async def big(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        resp = web.StreamResponse()
        resp.content_length = BIG
        await resp.prepare(request)
        for _ in range(BIG // len(BLOCK)):
            await resp.write(BLOCK)
        await resp.write_eof()
        return resp

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/big", self.big)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@asynccontextmanager
async def serving(leaf: Leaf) -> AsyncIterator[TlsBackend]:
    server = TlsBackend(leaf)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def https_pool(port: int, host: str = "127.0.0.1") -> AsyncIterator[UpstreamPool]:
    """The pool exactly as the proxy makes it for PLANT_BACKEND_URL=https://host:port."""
    pool = pool_for_url(URL(f"https://{host}:{port}/api"), limit=8, connect_timeout=2.0,
                        read_timeout=5.0)
    try:
        yield pool
    finally:
        await pool.close()


def head(method: str, path: str, port: int, *extra: bytes) -> bytes:
    lines = b"".join(line + b"\r\n" for line in extra)
    return b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n" % (
        method.encode(), path.encode(), port, lines)


async def get(pool: UpstreamPool, path: str) -> tuple[int, bytes]:
    resp = await pool.request(head("GET", path, pool.port))
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


async def upload_chunks() -> AsyncIterator[bytes]:
    for i in range(0, len(UPLOAD), 100_000):
        yield UPLOAD[i : i + 100_000]


def tls_failure(caught: pytest.ExceptionInfo[ConnectError]) -> ssl.SSLCertVerificationError:
    cause = caught.value.__cause__
    assert isinstance(cause, ssl.SSLCertVerificationError), repr(cause)
    return cause


# --- trusted: requests go through, over TLS ------------------------------------------------------

async def test_https_request_is_forwarded_to_a_backend_signed_by_the_trusted_ca(
    pki: Pki, trust_ca: Path
) -> None:
    async with serving(pki.good) as backend, https_pool(backend.port) as pool:
        assert pool.ssl_context is not None
        assert pool.ssl_context.verify_mode == ssl.CERT_REQUIRED
        assert pool.ssl_context.check_hostname
        resp = await pool.request(head("GET", "/api/v1/x?a=1", backend.port))
        doc = await resp.read()
        transport = resp.conn.transport
        resp.release()
        assert resp.status == 200
        assert b'"path": "/api/v1/x?a=1"' in doc and b'"tls": true' in doc
        assert transport is not None and transport.get_extra_info("ssl_object") is not None
        assert transport.get_extra_info("peercert")["subjectAltName"] == (
            ("DNS", "localhost"), ("IP Address", "127.0.0.1"))


async def test_keep_alive_reuses_one_tls_connection(pki: Pki, trust_ca: Path) -> None:
    async with serving(pki.good) as backend, https_pool(backend.port) as pool:
        assert (await get(pool, "/one"))[0] == 200
        assert (await get(pool, "/two"))[0] == 200
        assert len(backend.ports) == 2 and backend.ports[0] == backend.ports[1]
        assert len(backend.server_names) == 1  # one handshake for both requests
        assert pool.open == 1 and len(pool.idle) == 1


async def test_post_bodies_are_forwarded_over_tls(pki: Pki, trust_ca: Path) -> None:
    small = b'{"customer_id": "c1", "amount": 42}'
    async with serving(pki.good) as backend, https_pool(backend.port) as pool:
        sized = head("POST", "/orders", backend.port, b"Content-Length: %d" % len(small))
        resp = await pool.request(sized, small)
        doc = await resp.read()
        assert resp.status == 200 and b'"method": "POST"' in doc
        assert hashlib.sha256(small).hexdigest().encode() in doc
        chunked = head("POST", "/upload", backend.port, b"Transfer-Encoding: chunked")
        resp = await pool.request(chunked, upload_chunks(), chunked=True)
        doc = await resp.read()
        assert resp.status == 200 and b'"te": "chunked"' in doc
        assert b'"length": %d' % len(UPLOAD) in doc
        assert hashlib.sha256(UPLOAD).hexdigest().encode() in doc
        assert len(set(backend.ports)) == 1


async def test_large_tls_response_streams_with_read_flow_control(
    pki: Pki, trust_ca: Path
) -> None:
    async with serving(pki.good) as backend, https_pool(backend.port) as pool:
        resp = await pool.request(head("GET", "/big", backend.port))
        for _ in range(500):  # not reading: until the client stopped reading the socket
            if resp.paused:
                break
            await asyncio.sleep(0.01)
        assert resp.paused and not resp.conn.transport.is_reading()  # type: ignore[union-attr]
        assert resp._buffered <= HIGH_WATER + 1024 * 1024  # bounded, not the whole 8 MiB
        digest, total = hashlib.sha256(), 0
        async for chunk in resp.chunks():
            digest.update(chunk)
            total += len(chunk)
        resp.release()
        assert total == BIG
        assert digest.hexdigest() == hashlib.sha256(BLOCK * (BIG // len(BLOCK))).hexdigest()
        assert (await get(pool, "/after"))[0] == 200
        assert len(set(backend.ports)) == 1


async def test_sni_carries_the_upstream_host_name(pki: Pki, trust_ca: Path) -> None:
    async with serving(pki.good) as backend:
        async with https_pool(backend.port, host="localhost") as pool:
            assert (await get(pool, "/by-name"))[0] == 200
        async with https_pool(backend.port) as pool:
            assert (await get(pool, "/by-ip"))[0] == 200
        assert backend.server_names == ["localhost", None]  # no SNI for an IP address


def _scope(method: str, has_body: bool) -> dict[str, Any]:
    headers = [(b"host", b"gw"), (b"x-keep", b"1"), (b"authorization", b"Bearer t")]
    if has_body:
        headers.append((b"content-type", b"application/json"))
    return {"type": "http", "method": method, "path": "/api/v1/x", "raw_path": b"/api/v1/x",
            "query_string": b"q=1", "headers": headers, "client": ("10.0.0.9", 5555),
            "scheme": "http"}


def _body(chunks: list[bytes]) -> BodySource:
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    return BodySource(receive, 16 * 1024 * 1024, has_body=bool(chunks))


def _settings(port: int) -> Settings:
    return Settings(plant_backend_url=f"https://127.0.0.1:{port}", guards=[],
                    upstream_read_timeout_s=2.0, upstream_connect_timeout_s=2.0)


async def _forward(
    proxy: Proxy, method: str, chunks: list[bytes]
) -> tuple[Any, list[dict[str, Any]]]:
    ctx = context_from_scope(_scope(method, bool(chunks)), proxy.settings)
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    problem = await proxy.forward(ctx, _body(chunks), send, [])
    return problem, sent


async def test_proxy_forwards_get_and_post_to_an_https_backend(
    pki: Pki, trust_ca: Path
) -> None:
    payload = [b'{"customer_id": "c1", ', b'"amount": 42}']
    async with serving(pki.good) as backend:
        proxy = Proxy(_settings(backend.port))
        await proxy.start()
        try:
            problem, sent = await _forward(proxy, "GET", [])
            assert problem is None and sent[0]["status"] == 200
            assert b'"path": "/api/v1/x?q=1"' in sent[1]["body"]
            problem, sent = await _forward(proxy, "POST", payload)
            assert problem is None and sent[0]["status"] == 200
            doc = sent[1]["body"]
            assert b'"method": "POST"' in doc and b'"te": "chunked"' in doc
            assert hashlib.sha256(b"".join(payload)).hexdigest().encode() in doc
        finally:
            await proxy.close()
        assert len(backend.ports) == 2 and backend.ports[0] == backend.ports[1]
        forwarded = backend.headers[-1]
        assert forwarded["Host"] == f"127.0.0.1:{backend.port}"
        assert forwarded["X-Gateway"] == "plant-gateway"
        assert forwarded["X-Original-Authorization"] == "Bearer t"
        assert "Authorization" not in forwarded


# --- refused: nothing is sent ---------------------------------------------------------------------

async def test_certificate_from_an_untrusted_ca_is_refused(pki: Pki, trust_ca: Path) -> None:
    async with serving(pki.foreign) as backend, https_pool(backend.port) as pool:
        with pytest.raises(ConnectError) as caught:
            await get(pool, "/secret")
        cause = tls_failure(caught)
        assert cause.verify_code == 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        assert backend.ports == []  # no request reached the backend
        assert pool.open == 0 and not pool.idle


async def test_the_system_store_alone_does_not_trust_the_private_ca(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without SSL_CERT_FILE pointing at it, the private CA is not trusted: verification is on
    by default, not something the CA configuration switches on."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with serving(pki.good) as backend, https_pool(backend.port) as pool:
        with pytest.raises(ConnectError) as caught:
            await get(pool, "/secret")
        tls_failure(caught)
        assert backend.ports == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_host_name_mismatch_is_refused(pki: Pki, trust_ca: Path, host: str) -> None:
    async with serving(pki.wrong_name) as backend, https_pool(backend.port, host) as pool:
        with pytest.raises(ConnectError) as caught:
            await get(pool, "/secret")
        cause = tls_failure(caught)
        assert "mismatch" in cause.verify_message  # the chain itself is trusted
        assert backend.ports == []


async def test_proxy_answers_an_untrusted_backend_with_a_problem_and_sends_nothing(
    pki: Pki, trust_ca: Path
) -> None:
    async with serving(pki.foreign) as backend:
        proxy = Proxy(_settings(backend.port))
        await proxy.start()
        try:
            for method, chunks in (("GET", []), ("POST", [b'{"a": 1}'])):
                problem, sent = await _forward(proxy, method, chunks)
                # a handshake failure is a ConnectError: 503 upstream-unavailable (not 502)
                assert problem is not None and problem.status == 503, (method, problem)
                assert problem.kind == "upstream-unavailable"
                assert sent == []
        finally:
            await proxy.close()
        assert backend.ports == []


async def test_https_url_never_falls_back_to_plaintext() -> None:
    """A plaintext server behind an https URL sees only a TLS ClientHello, never the request."""
    received: list[bytes] = []

    async def plaintext(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plaintext, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with https_pool(port) as pool:
            with pytest.raises(ConnectError) as caught:
                await get(pool, "/secret")
            assert isinstance(caught.value.__cause__, ssl.SSLError)
            assert pool.open == 0
    finally:
        server.close()
        await server.wait_closed()
    assert received and received[0][:1] == b"\x16"  # a TLS handshake record
    assert all(b"/secret" not in data and b"HTTP/1.1" not in data for data in received)
