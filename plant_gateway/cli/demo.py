"""``plant-gateway demo``: the demo backend plus a gateway with embedded defaults, in one command.

Prints three ready-to-paste curl commands: one passes, one has a bad token, one meets policy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated

import typer

from plant_gateway.cli.common import config_fail, fail, usage_fail
from plant_gateway.settings import GUARDS

# the modules each guard needs; a guard whose code is not there yet is left out of the demo
GUARD_MODULES = {
    "auth": ["plant_gateway.steps.auth", "plant_gateway.backends.keys"],
    "rate_limit": ["plant_gateway.steps.rate_limit"],
    "policy": ["plant_gateway.steps.policy", "plant_gateway.backends.policy"],
    "budget": ["plant_gateway.steps.budget"],
    "tenant": ["plant_gateway.steps.tenant"],
    "audit": ["plant_gateway.audit.recorder", "plant_gateway.audit.sink"],
}


def available_guards() -> list[str]:
    return [
        g for g in GUARDS
        if all(importlib.util.find_spec(m) is not None for m in GUARD_MODULES.get(g, []))
    ]


def _wait(url: str, proc: subprocess.Popen[bytes], name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # its own line above says why
            fail(f"demo: the {name} exited (code {proc.returncode}) before it answered on {url}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    fail(f"demo: the {name} did not answer on {url} within {timeout:.0f} s")


def _token(secret: str, **kwargs: str) -> str:
    import jwt

    from plant_gateway.cli.token import mint_claims

    claims = mint_claims(
        kwargs.get("sub", "demo-user"), None, "demo@waooaw.com", kwargs.get("roles", "admin"),
        "cust-demo-1", False, 3600, "waooaw.com", [],
    )
    return jwt.encode(claims, secret, algorithm="HS256")


def _demo_chain_key() -> str:
    """The demo's audit chain key (signed checkpoints, as in production), kept beside its other
    state so that `plant-gateway audit verify --chain-key` checks a later demo's rows too."""
    path = Path(os.environ.get("PLANT_STATE_DIR", ".plant-gateway")) / "demo-audit-chain-key"
    with contextlib.suppress(OSError):
        key = path.read_text().strip()
        if len(key) >= 32:
            return key
    key = secrets.token_hex(32)
    with contextlib.suppress(OSError):  # a read-only directory: this run's key only
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(key + "\n")
    return key


def curl_commands(gateway: str, secret: str) -> list[tuple[str, str]]:
    good = _token(secret, roles="admin")
    viewer = _token(secret, sub="demo-viewer", roles="viewer")
    return [
        ("passes (admin token)",
         f"curl -i -H 'Authorization: Bearer {good}' {gateway}/api/v1/agents"),
        ("refused: bad token (401)",
         f"curl -i -H 'Authorization: Bearer not.a.token' {gateway}/api/v1/agents"),
        ("refused by policy: a viewer deleting (403)",
         f"curl -i -X DELETE -H 'Authorization: Bearer {viewer}' {gateway}/api/v1/agents/42"),
    ]


def _run_checks(commands: list[tuple[str, str]]) -> int:
    """Run the three commands (used by tests and ``--check``); print each status line."""
    failures = 0
    for expected, (label, command) in zip(("200", "401", "403"), commands, strict=True):
        out = subprocess.run(  # noqa: S603
            ["sh", "-c", command + " -s -o /dev/null -w '%{http_code}'"],
            capture_output=True, text=True, check=False,
        ).stdout
        ok = out == expected
        failures += not ok
        typer.echo(f"{'PASS' if ok else 'FAIL'} {label}: HTTP {out} (expected {expected})")
    return failures


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _check_config(env: dict[str, str]) -> None:
    """The demo gateway's settings, checked here: a bad one is one line before anything starts."""
    from plant_gateway.cli.serve import check_backends
    from plant_gateway.settings import SettingsError, load_settings

    os.environ.update(env)  # this process only: the settings the gateway child will read
    try:
        check_backends(load_settings())
    except SettingsError as exc:
        config_fail(str(exc))


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _block_stop_signals() -> None:
    """sigwait only receives *blocked* signals: unblocked, SIGTERM killed this process without
    the ``finally`` (gateway and backend left running) and a SIGINT sent to this process alone
    went to Python's handler, never to sigwait (a hang). Blocked only after the children
    started (they must not inherit the mask) and before "Ctrl-C to stop." is printed: a signal
    sent as soon as that line is read used to arrive before the mask and kill the demo."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _wait_for_stop() -> None:
    """Return on SIGINT or SIGTERM (blocked by ``_block_stop_signals``)."""
    signal.sigwait(STOP_SIGNALS)


def demo(
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="gateway port")] = 8000,
    backend_port: Annotated[int, typer.Option("--backend-port", min=1, max=65535)] = 8001,
    check: Annotated[bool, typer.Option("--check", help="run the three calls, then exit")] = False,
) -> None:
    """Start the demo backend and a gateway in front of it; print three curl commands."""
    # A taken port would let the readiness checks below talk to whatever holds it.
    for name, number in (("--port", port), ("--backend-port", backend_port)):
        if _port_taken(number):
            usage_fail(f"demo: port {number} is already in use; choose another with {name}")
    secret = os.environ.get("JWT_SECRET") or secrets.token_urlsafe(48)
    guards = available_guards()
    env = {
        **os.environ, "PORT": str(port), "HOST": "127.0.0.1", "JWT_SECRET": secret,
        "PLANT_BACKEND_URL": f"http://127.0.0.1:{backend_port}", "PLANT_GUARDS": ",".join(guards),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"), "CUSTOMER_ENRICHMENT": "false",
        # one local instance: /metrics and the detailed /ready on the demo port (no admin port
        # to collide with another demo or gateway); ADMIN_PORT in the environment wins
        "ADMIN_PORT": os.environ.get("ADMIN_PORT", "0"),
        "AUDIT_CHAIN_KEY": os.environ.get("AUDIT_CHAIN_KEY") or _demo_chain_key(),
    }
    _check_config(env)
    backend = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "plant_gateway.demo_backend", "--port", str(backend_port),
         "--name", "demo"], env=env,
    )
    gateway = subprocess.Popen([sys.executable, "-m", "plant_gateway.cli", "serve"], env=env)  # noqa: S603
    try:
        _wait(f"http://127.0.0.1:{backend_port}/fast", backend, "demo backend")
        _wait(f"http://127.0.0.1:{port}/health", gateway, "gateway")
        gateway_url = f"http://127.0.0.1:{port}"
        commands = curl_commands(gateway_url, secret)
        typer.echo(f"\nPlant Gateway demo on {gateway_url} (active guards: {', '.join(guards)})")
        typer.echo("Try these:\n")
        for label, command in commands:
            typer.echo(f"# {label}\n{command}\n")
        if check:
            raise typer.Exit(1 if _run_checks(commands) else 0)
        _block_stop_signals()
        typer.echo("Ctrl-C to stop.")
        _wait_for_stop()
    finally:
        for proc in (gateway, backend):
            proc.terminate()
        for proc in (gateway, backend):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
