"""`serve` start-up removes metrics-* directories left by a killed serve, never a live one's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from plant_gateway.metrics import (
    METRICS_OWNER_FILE,
    UNOWNED_MAX_AGE_S,
    _owner_id,
    remove_stale_metrics_dirs,
)


def metrics_dir(state_dir: Path, name: str, owner: str | None) -> Path:
    path = state_dir / f"metrics-{name}"
    path.mkdir()
    (path / "123.json").write_text("{}")
    if owner is not None:
        (path / METRICS_OWNER_FILE).write_text(owner)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: S603
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_leftovers_of_dead_serves_go_and_live_ones_stay(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # noqa: S603
    try:
        live_owner = _owner_id(live.pid)
        assert live_owner is not None
        gone = dead_pid()
        dead = metrics_dir(tmp_path, "dead", f"{gone} 1")
        dead_no_start = metrics_dir(tmp_path, "deadpid", str(gone))
        owned = metrics_dir(tmp_path, "live", live_owner)
        owned_by_me = metrics_dir(tmp_path, "me", _owner_id(os.getpid()))
        reused = metrics_dir(tmp_path, "reused", f"{live.pid} 1")  # same pid, other start time
        unowned_old = metrics_dir(tmp_path, "old", None)
        age(unowned_old, UNOWNED_MAX_AGE_S + 60)
        unowned_new = metrics_dir(tmp_path, "new", None)  # a serve between mkdtemp and owner.pid
        empty_owner_new = metrics_dir(tmp_path, "empty", "")
        other = tmp_path / "redis"
        other.mkdir()
        age(other, UNOWNED_MAX_AGE_S + 60)

        removed = remove_stale_metrics_dirs(tmp_path)

        assert sorted(removed) == sorted([dead, dead_no_start, reused, unowned_old])
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(p.name for p in (owned, owned_by_me, unowned_new,
                                               empty_owner_new, other))
        assert (owned / "123.json").exists()
    finally:
        live.kill()
        live.wait()
    assert remove_stale_metrics_dirs(tmp_path) == [owned]  # its owner has exited now


def test_missing_state_dir_is_not_an_error(tmp_path: Path) -> None:
    assert remove_stale_metrics_dirs(tmp_path / "absent") == []
    assert not (tmp_path / "absent").exists()
