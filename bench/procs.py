"""Starting, probing, measuring and stopping the servers under test.

Each server is a process tree; RSS and CPU time are summed over the tree with psutil.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> int:
    """Status of one GET (0 when nothing answers)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return 0


@dataclass
class TreeUsage:
    """A snapshot of a process tree: resident memory per process and total CPU seconds."""

    rss_bytes: list[int]
    cpu_s: float

    @property
    def rss_total_mb(self) -> float:
        return sum(self.rss_bytes) / 2**20


@dataclass
class Server:
    """One running server process (and its children), with its log file."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str | None] = field(default_factory=dict)  # None removes a variable
    # Helpers the server starts outside its own process tree (a daemonised embedded
    # PostgreSQL) are found by this string in their command line; counted, and stopped.
    helper_marker: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        merged = {**os.environ, **self.env}
        env = {name: value for name, value in merged.items() if value is not None}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603
            self.cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
        """Poll ``url`` until it answers (any status) or fail with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early; log: {self.log_tail()}")
            if http_status(url, headers, timeout=1.0):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the log; for JSON log records, the message and the exception's
        last line (the part that says what went wrong)."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(_readable(line) for line in text[-lines:])

    def tree(self) -> list[psutil.Process]:
        if not self.alive() or self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        known = {p.pid for p in procs}
        return procs + [p for p in self.helpers() if p.pid not in known]

    def helpers(self) -> list[psutil.Process]:
        if not self.helper_marker:
            return []
        found: list[psutil.Process] = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if self.helper_marker in cmdline:
                found.append(proc)
        return found

    def usage(self, include_root: bool = True) -> TreeUsage:
        """RSS of every process in the tree and their summed CPU seconds."""
        rss: list[int] = []
        cpu = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                cpu += times.user + times.system
                if include_root or proc.pid != (self.proc.pid if self.proc else -1):
                    rss.append(int(proc.memory_info().rss))
        return TreeUsage(rss_bytes=rss, cpu_s=cpu)

    def worker_rss_mb(self, python_workers: bool = False) -> list[float]:
        """RSS of the serving processes: the children (only Python ones for the gateway, whose
        tree may hold an embedded PostgreSQL) when there are any, else the root."""
        procs = self.tree()
        children = [p for p in procs[1:] if _is_worker(p)] if python_workers else procs[1:]
        workers = children or procs[:1]
        out: list[float] = []
        for proc in workers:
            with contextlib.suppress(psutil.Error):
                out.append(proc.memory_info().rss / 2**20)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Children that outlived their parent go too, and so do helpers it left running.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._stop_helpers()

    def _stop_helpers(self) -> None:
        leftovers = self.helpers()
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGINT)  # PostgreSQL: fast shutdown
        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _readable(line: str) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return line[:200]
    if not isinstance(record, dict):
        return line[:200]
    exc = str(record.get("exc") or "").strip().splitlines()
    return f"{record.get('message', '')}" + (f": {exc[-1]}" if exc else "")


def _is_worker(proc: psutil.Process) -> bool:
    """A gateway worker is a Python child; helper children (postgres, resource tracker) are not."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "python" in cmdline and "resource_tracker" not in cmdline and "postgres" not in cmdline
