"""``plant-gateway demo``: the newcomer's command answers 200/401/403 and stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.postgres import _answers
from tests.fixtures.processes import ROOT, free_port


def _demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int, int]:
    port, backend_port = free_port(), free_port()
    env = {**os.environ, "PLANT_STATE_DIR": str(tmp_path / "state")}
    for name in ("REDIS_URL", "DATABASE_URL", "OPA_SERVICE_URL", "JWT_SECRET", "PLANT_CONFIG"):
        env.pop(name, None)
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "plant_gateway.cli", "demo", "--port", str(port),
         "--backend-port", str(backend_port), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return proc, port, backend_port


def test_demo_check_passes_one_call_and_refuses_two(tmp_path: Path) -> None:
    proc, _, _ = _demo(tmp_path, "--check")
    out, _ = proc.communicate(timeout=120)
    assert "PASS passes (admin token): HTTP 200" in out, out[-2000:]
    assert "PASS refused: bad token (401): HTTP 401" in out
    assert "PASS refused by policy: a viewer deleting (403): HTTP 403" in out
    assert proc.returncode == 0
    # the demo signs its audit checkpoints with a key kept in its state directory
    key = (tmp_path / "state" / "demo-audit-chain-key").read_text().strip()
    assert len(key) == 64 and "AUDIT_CHAIN_KEY is not set" not in out


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_demo_stops_its_gateway_and_backend_on_a_signal(tmp_path: Path, stop: int) -> None:
    proc, port, backend_port = _demo(tmp_path)
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 90
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C to stop." in line or not line:
                break
        assert any("Ctrl-C to stop." in line for line in lines), "".join(lines)[-2000:]
        assert _answers("127.0.0.1", port) and _answers("127.0.0.1", backend_port)
        proc.send_signal(stop)  # to the demo process alone, as a supervisor or kill would
        assert proc.wait(timeout=30) == 0
        assert not _answers("127.0.0.1", port), "the gateway outlived the demo command"
        assert not _answers("127.0.0.1", backend_port), "the demo backend outlived the demo command"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_demo_refuses_a_taken_port_instead_of_talking_to_its_owner(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        done = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "plant_gateway.cli", "demo", "--port", str(taken),
             "--backend-port", str(free_port()), "--check"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 2
    assert f"port {taken} is already in use; choose another with --port" in done.stderr
    assert "PASS" not in done.stdout
