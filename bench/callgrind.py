"""Instructions per request of the gateway's full chain, counted by callgrind: a number that a
busy 2-core machine does not blur the way it blurs req/s and CPU seconds.

``python -m bench.callgrind [--requests 2000] [--gateway-env NAME=VALUE] [--venv DIR]`` starts
the static backend and the gateway (scenario 4's settings: embedded backends) under
``valgrind --tool=callgrind`` with instrumentation off, warms it up, switches it on
(``callgrind_control -i on``) for ``--requests`` sequential keep-alive requests of the bench's
traffic, and prints the instructions (Ir) per request. ``--venv`` runs another checkout's
gateway (a baseline). The gateway runs 30-50× slower under callgrind: minutes, not seconds.

The guards default to scenario 4's without ``policy``: regopy's allocator (snmalloc) cannot
reserve its address space under valgrind and aborts the process when the library loads.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import free_port
from bench.scenarios import Context, _gateway_env, _strip_service_env
from bench.tools import VENV_BIN, Tools
from bench.traffic import Request, build_requests, parse_mix

START_TIMEOUT_S = 600.0
GUARDS = "auth,rate_limit,budget,tenant,audit"  # scenario 4's, less policy (see above)


def wait_ready(port: int, proc: subprocess.Popen[bytes], path: str = "/health") -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before answering")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"127.0.0.1:{port} not ready after {START_TIMEOUT_S:.0f} s")


def send(port: int, requests: list[Request], count: int) -> dict[int, int]:
    """``count`` requests (cycling through ``requests``) on one keep-alive connection."""
    statuses: dict[int, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for i in range(count):
        req = requests[i % len(requests)]
        conn.request(req.method, req.path, body=req.body, headers=req.headers)
        resp = conn.getresponse()
        resp.read()
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
    conn.close()
    return statuses


def total_ir(out_dir: Path) -> int:
    """Sum of the ``totals:`` lines of every dump callgrind wrote (``summary:`` of the last
    dump counts from the start, minus what the earlier dumps took)."""
    total = 0
    for dump in out_dir.glob("callgrind.out*"):
        for line in dump.read_text(errors="replace").splitlines():
            match = re.match(r"totals:\s+(\d+)", line)
            if match:
                total += int(match.group(1))
                break
    return total


def measure(
    count: int, extra_env: tuple[tuple[str, str], ...], venv_bin: Path, guards: str
) -> float:
    work = Path(tempfile.mkdtemp(prefix="pg-callgrind-"))
    backend_port, port = free_port(), free_port()
    backend = subprocess.Popen(  # noqa: S603
        [str(VENV_BIN / "python"), "-m", "bench.static_backend", "--port", str(backend_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    guards_json = json.dumps([g.strip() for g in guards.split(",") if g.strip()])
    ctx = Context(Tools(), work, f"http://127.0.0.1:{backend_port}", 1, "callgrind",
                  full_guards=guards_json, gateway_env=extra_env)
    # the whole environment: vgdb (callgrind_control) finds the process by USER, HOST, TMPDIR
    env = {k: v for k, v in os.environ.items() if k not in _strip_service_env()}
    env.update(_gateway_env(ctx, work, port))
    env["PLANT_GUARDS"] = guards_json
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
           f"--callgrind-out-file={work}/callgrind.out.%p",
           str(venv_bin / "python"), "-m", "plant_gateway.cli", "serve"]
    with (work / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        wait_ready(port, gateway)
        requests = build_requests(parse_mix("none", 100))
        send(port, requests, 300)  # warm-up: claims cache, decision memo, pools
        # vgdb names its pipes after $HOST, which is also the gateway's listen address
        control = [shutil.which("callgrind_control") or "callgrind_control"]
        vgdb_env = {**os.environ, "HOST": env["HOST"]}
        subprocess.run([*control, "-i", "on", str(gateway.pid)], check=True,  # noqa: S603
                       capture_output=True, env=vgdb_env)
        statuses = send(port, requests, count)
        for args in (["-d"], ["-i", "off"]):
            subprocess.run([*control, *args, str(gateway.pid)], check=True,  # noqa: S603
                           capture_output=True, env=vgdb_env)
        if set(statuses) != {200}:
            raise RuntimeError(f"unexpected statuses {statuses}")
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(300)
        except subprocess.TimeoutExpired:
            gateway.kill()
        backend.kill()
        backend.wait()
    return total_ir(work) / count


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import gateway_env

    p = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--trace-sample-rate", type=float)
    p.add_argument("--venv", type=Path, help="the virtualenv whose gateway runs (a baseline)")
    p.add_argument("--guards", default=GUARDS, help=f"PLANT_GUARDS (default {GUARDS})")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("python -m bench.callgrind: valgrind is not installed", file=sys.stderr)
        return 2
    extra = gateway_env(args.gateway_env, args.trace_sample_rate)
    venv_bin = (args.venv / "bin") if args.venv else VENV_BIN
    per_request = measure(args.requests, extra, venv_bin, args.guards)
    print(f"{per_request:,.0f} instructions per request ({args.requests} requests, "
          f"guards {args.guards}, gateway {venv_bin.parent}, env {dict(extra) or '{}'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
