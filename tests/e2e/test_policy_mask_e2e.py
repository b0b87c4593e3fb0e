"""Obligation ``mask_fields`` end to end: a real gateway masks a real backend's JSON answers.

The bundle is configured to mask ``email``/``phone``/``ssn`` for the ``viewer`` level (``readonly``
tokens); admins see everything. Bodies the gateway cannot mask are refused (502), never leaked.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.e2e.test_policy_e2e import call, token
from tests.fixtures.processes import Proc, free_port, start_gateway

ROOT = Path(__file__).resolve().parents[2]
SECRET = "4111-1111"
DOC = {
    "id": "c-1",
    "email": "ann@example.com",
    "name": "Ann",
    "contact": {"phone": "+1 555 0100", "city": "Oslo"},
    "accounts": [{"ssn": SECRET, "plan": "pro"}, {"ssn": SECRET, "plan": "free"}],
}
MASKED = {
    "id": "c-1",
    "email": "***",
    "name": "Ann",
    "contact": {"phone": "***", "city": "Oslo"},
    "accounts": [{"ssn": "***", "plan": "pro"}, {"ssn": "***", "plan": "free"}],
}
CAP = 4096


async def customer(request: web.Request) -> web.StreamResponse:
    """One customer document, sent the way ``?mode=`` asks."""
    mode = request.query.get("mode", "plain")
    payload = json.dumps(DOC).encode()
    if mode == "plain":
        return web.json_response(DOC, headers={"ETag": '"v1"'})
    if mode == "gzip":
        return web.Response(body=gzip.compress(payload), headers={
            "Content-Encoding": "gzip", "Content-Type": "application/json"})
    if mode == "text":
        return web.Response(body=payload, content_type="text/plain")
    if mode == "invalid":
        return web.Response(body=payload[:-5], content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    if mode == "big":  # known length over the cap
        payload = json.dumps({**DOC, "pad": "x" * (2 * CAP)}).encode()
        resp.content_length = len(payload)
    elif mode == "huge":  # chunked, growing past the cap
        payload = json.dumps({**DOC, "pad": "x" * (2 * CAP)}).encode()
    await resp.prepare(request)  # "chunked" / "huge": no Content-Length (chunked encoding)
    for k in range(0, len(payload), 1000):
        await resp.write(payload[k:k + 1000])
    await resp.write_eof()
    return resp


class Backend:
    """An aiohttp backend on its own event loop thread (real HTTP on a free port)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/api/v1/customers/{id}", customer)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def masking_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    bundle = tmp_path_factory.mktemp("mask") / "policies"
    shutil.copytree(ROOT / "policies", bundle, ignore=shutil.ignore_patterns("*_test.rego"))
    data = json.loads((bundle / "data.json").read_text())
    data["plant"]["config"]["mask_fields"] = {"viewer": ["email", "phone", "ssn"]}
    (bundle / "data.json").write_text(json.dumps(data))
    backend = Backend()
    # /api/v1/customers is a service-key route by default; here it stands for any JWT route
    proc = start_gateway({"PLANT_GUARDS": "auth,policy", "POLICY_DIR": str(bundle),
                          "POLICY_MASK_MAX_BYTES": str(CAP), "SERVICE_KEY_ROUTES": ""},
                         backend_url=backend.url)
    yield proc
    proc.stop()
    backend.stop()


def get(gw: Proc, mode: str, roles: list[str]) -> tuple[int, dict[str, str], Any]:
    return call(gw, "GET", f"/api/v1/customers/c-1?mode={mode}", token(roles))


@pytest.mark.parametrize("mode", ["plain", "chunked", "gzip"])
def test_readonly_gets_masked_fields(masking_gw: Proc, mode: str) -> None:
    status, headers, body = get(masking_gw, mode, ["readonly"])
    assert status == 200, body
    assert body == MASKED
    assert "content-encoding" not in headers and "etag" not in headers
    assert int(headers["content-length"]) == len(json.dumps(MASKED, separators=(",", ":")))


@pytest.mark.parametrize("mode", ["plain", "chunked", "gzip"])
def test_admin_gets_everything(masking_gw: Proc, mode: str) -> None:
    status, headers, body = get(masking_gw, mode, ["admin"])
    assert status == 200
    if mode == "gzip":  # relayed as the backend sent it (urllib does not decompress)
        assert headers["content-encoding"] == "gzip"
        body = json.loads(gzip.decompress(body))
    assert body == DOC


@pytest.mark.parametrize("mode", ["big", "huge", "invalid"])
def test_unmaskable_json_refused_not_leaked(masking_gw: Proc, mode: str) -> None:
    status, headers, body = get(masking_gw, mode, ["readonly"])
    assert status == 502
    assert headers["content-type"].startswith("application/problem+json")
    assert body["type"].endswith("/errors/bad-gateway")
    assert "masked" in body["detail"]
    assert SECRET not in json.dumps(body)


def test_admin_large_json_still_streams(masking_gw: Proc) -> None:
    status, headers, body = get(masking_gw, "huge", ["admin"])
    assert status == 200 and "content-length" not in headers
    assert body["accounts"][0]["ssn"] == SECRET


def test_non_json_passes_unmasked(masking_gw: Proc) -> None:
    status, headers, body = get(masking_gw, "text", ["readonly"])
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert body == DOC  # not JSON by its media type: the obligation covers JSON only
