"""Sampling a gateway under load with py-spy and summarising where the time goes.

``--profile`` records the first measured run of each gateway scenario (all its processes);
raw collapsed stacks go to bench/results/raw/, a top-functions summary to results/profile-*.md.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

from bench.tools import VENV_BIN


def py_spy() -> str | None:
    binary = VENV_BIN / "py-spy"
    return str(binary) if binary.exists() else shutil.which("py-spy")


def start(pid: int, duration_s: int, out: Path) -> subprocess.Popen[bytes] | None:
    binary = py_spy()
    if binary is None:
        return None
    cmd = [binary, "record", "--pid", str(pid), "--subprocesses", "--duration", str(duration_s),
           "--rate", "250", "--format", "raw", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` → ``func (module.py)``; line numbers merged."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def summarise(raw: Path, top: int = 25) -> str:
    """Markdown: the functions with the most samples on-CPU (self) and on the stack (total)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    if not samples:
        return "_no samples_\n"
    lines = [f"{samples} samples (on-CPU, all gateway processes). Coroutines resumed by the "
             "event loop appear without their callers, so read the self column first.", "",
             "| self % | total % | function |", "|---:|---:|---|"]
    for name, count in own.most_common(top):
        share, inclusive = 100 * count / samples, 100 * total[name] / samples
        lines.append(f"| {share:.1f} | {inclusive:.1f} | `{name}` |")
    lines += ["", "Largest inclusive (on the stack):", "", "| total % | function |", "|---:|---|"]
    for name, count in total.most_common(top):
        lines.append(f"| {100 * count / samples:.1f} | `{name}` |")
    return "\n".join(lines) + "\n"
