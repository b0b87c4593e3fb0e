"""A stand-in OPA server for tests: the REST Data API evaluated with the in-process engine.

``POST /_mode {"mode": ...}`` switches failure modes (ok, slow, error, undefined, bool, garbage);
any other path records the request (``GET /_hits``), so it doubles as a recording backend.
``OpaServer`` runs this file as a child process for the tests, the e2e suite and the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TypedDict

from aiohttp import web

from plant_gateway.backends.policy_local import CompiledBundle, compile_bundle, load_sources

ROOT = Path(__file__).resolve().parents[2]


class ServerState(TypedDict):
    mode: str
    hits: int
    decisions: int


def make_app(policy_dir: Path, token: str | None = None) -> web.Application:
    """``token``: act as the deployed OPA behind Cloud Run IAM (only that bearer token gets in)."""
    app = web.Application()
    state: ServerState = {"mode": "ok", "hits": 0, "decisions": 0}
    sources = load_sources(policy_dir)
    compiled: dict[str, CompiledBundle] = {}

    async def data(request: web.Request) -> web.Response:
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return web.json_response({"code": "unauthorized"}, status=401)
        state["decisions"] += 1
        mode = state["mode"]
        if mode == "slow":
            await asyncio.sleep(5)
        if mode == "error":
            return web.json_response({"code": "internal_error"}, status=500)
        if mode == "undefined":
            return web.json_response({"decision_id": str(uuid.uuid4())})
        if mode == "garbage":
            return web.Response(text="<html>", content_type="text/html")
        body = await request.json()
        if mode == "bool":
            return web.json_response({"result": True})
        path = request.match_info["path"].strip("/")
        if path not in compiled:
            compiled[path] = compile_bundle(sources, path)
        result = compiled[path].evaluate(json.dumps(body.get("input", {})))
        return web.json_response({"result": result, "decision_id": str(uuid.uuid4())})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({}, status=500 if state["mode"] == "down" else 200)

    async def set_mode(request: web.Request) -> web.Response:
        state["mode"] = (await request.json())["mode"]
        return web.json_response(state)

    async def hits(request: web.Request) -> web.Response:
        return web.json_response(state)

    async def record(request: web.Request) -> web.Response:
        state["hits"] += 1
        return web.json_response({"backend": "recorder", "path": request.path})

    app.router.add_post("/v1/data/{path:.*}", data)
    app.router.add_get("/health", health)
    app.router.add_post("/_mode", set_mode)
    app.router.add_get("/_hits", hits)
    app.router.add_route("*", "/{tail:.*}", record)
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OpaServer:
    """This file's server as a child process on a free port; ``stop()`` ends it."""

    def __init__(self, policy_dir: Path = ROOT / "policies", token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.popen = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--port",
             str(self.port), "--policy-dir", str(policy_dir),
             *(("--token", token) if token else ())],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return
            except OSError:
                if self.popen.poll() is not None:
                    output = self.popen.stderr.read().decode()  # type: ignore[union-attr]
                    raise RuntimeError(output) from None
                time.sleep(0.05)
        raise RuntimeError("OPA test server did not start")

    def mode(self, mode: str) -> None:
        req = urllib.request.Request(f"{self.url}/_mode", data=json.dumps({"mode": mode}).encode(),
                                     headers={"content-type": "application/json"})
        urllib.request.urlopen(req, timeout=5).close()

    def state(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/_hits", timeout=5) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--policy-dir", type=Path, required=True)
    parser.add_argument("--token", help="require this bearer token (Cloud Run IAM stand-in)")
    args = parser.parse_args()
    web.run_app(make_app(args.policy_dir, args.token), host="127.0.0.1", port=args.port,
                print=None)


if __name__ == "__main__":
    main()
