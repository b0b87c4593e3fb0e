"""The audit spool on real files: the cap and its headroom, failed appends that leave no torn
line, the in-place offset, the reserve file, and a real full file system (a tmpfs of 64 KiB in
a private mount namespace: ``unshare -m``, skipped where the runner may not create one)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plant_gateway.audit.spool import Spool, SpoolFull

ROOT = Path(__file__).resolve().parents[3]


def _row(i: int, size: int = 100) -> bytes:
    """A line of exactly ``size`` bytes."""
    head = f'[{i}, "'
    return (head + "x" * (size - len(head) - 3) + '"]\n').encode()


def test_ordinary_rows_stop_at_the_headroom_reserved_rows_at_the_cap(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.jsonl", max_bytes=1000, headroom=300)
    try:
        appended = 0
        with pytest.raises(SpoolFull):
            for i in range(100):
                spool.append([_row(i)])
                appended += 1
        assert appended == 7  # 700 bytes of 100-byte rows: 1000 - 300 headroom
        before = spool.path.read_bytes()
        with pytest.raises(SpoolFull):
            spool.append([_row(99)])
        assert spool.path.read_bytes() == before  # a refused append leaves no trace
        for i in range(3):
            spool.append([_row(100 + i)], reserved=True)
        with pytest.raises(SpoolFull):
            spool.append([_row(200)], reserved=True)
        assert (spool.pending, spool.size) == (10, 1000)
    finally:
        spool.close()


def test_the_offset_is_rewritten_in_place_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    spool = Spool(path)
    spool.append([_row(i) for i in range(5)])
    lines, offset = spool.read(2)
    spool.advance(offset, len(lines))
    assert spool.offset_path.read_bytes() == b"%020d\n" % offset
    spool.close()
    again = Spool(path)
    try:
        assert (again.offset, again.pending) == (offset, 3)
        assert json.loads(again.read(10)[0][0])[0] == 2  # oldest first, from the offset
    finally:
        again.close()


@pytest.mark.parametrize(("content", "expected"), [(b"300", 300), (b"junk", 0), (b"", 0)])
def test_an_old_or_broken_offset_file_is_read_or_means_zero(
    tmp_path: Path, content: bytes, expected: int
) -> None:
    """Rename-era files hold a bare number; a broken one resends rows (deduplicated) rather
    than skipping any."""
    path = tmp_path / "s.jsonl"
    path.write_bytes(_row(1, 400))
    path.with_suffix(".offset").write_bytes(content)
    spool = Spool(path)
    try:
        assert spool.offset == expected
    finally:
        spool.close()


def test_a_torn_last_line_is_cut_when_the_spool_is_opened(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(_row(1) + _row(2) + b'[3, "half a ro')  # a crash mid-append
    spool = Spool(path)
    try:
        spool.append([_row(4)])
        lines, _ = spool.read(10)
        assert [json.loads(line)[0] for line in lines] == [1, 2, 4]
    finally:
        spool.close()


def test_a_drained_spool_gives_its_space_back_and_sets_the_reserve_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.jsonl", max_bytes=100_000, headroom=4096)
    try:
        assert spool.make_reserve() and spool.reserve_path.stat().st_size == 4096
        spool.append([_row(i) for i in range(50)])
        assert not spool.reset_if_drained()  # rows still pending
        lines, offset = spool.read(100)
        spool.advance(offset, len(lines))
        assert spool.reset_if_drained()
        assert (spool.size, spool.offset, spool.path.stat().st_size) == (0, 0, 0)
        assert spool.offset_path.read_bytes() == b"%020d\n" % 0
    finally:
        spool.close(remove_if_empty=True)
    assert not any(tmp_path.iterdir())  # spool, offset and reserve files removed


# A child process in its own mount namespace fills a 64 KiB tmpfs: ENOSPC from the kernel.
FULL_DISK_CHILD = textwrap.dedent("""
    import errno, json, os, sys
    from pathlib import Path
    from plant_gateway.audit.spool import Spool, SpoolFull
    path = Path(sys.argv[1]) / "s.jsonl"
    spool = Spool(path, max_bytes=10**9, headroom=8192)
    out = {"reserve": spool.make_reserve()}
    rows = [(f'[{i:04d}, "' + "x" * 500 + '"]\\n').encode() for i in range(1000)]
    n = 0
    try:
        while True:
            spool.append([rows[n]]); n += 1
    except OSError as exc:
        out["errno"] = exc.errno
    out["appended"] = n
    out["file_intact"] = path.read_bytes().endswith(b"\\n") and spool.size == path.stat().st_size
    lines, offset = spool.read(10)
    spool.advance(offset, len(lines))            # the offset is saved on the full disk
    out["offset_saved"] = int(spool.offset_path.read_bytes()) == offset
    spool.append([rows[900]], reserved=True)     # the reserve's blocks take a refusal row
    out["reserved_row"] = True
    try:
        spool.append([rows[901]])
        out["ordinary_after"] = True
    except SpoolFull as exc:
        out["ordinary_after"] = "reserved" if "reserve" in str(exc) else str(exc)
    lines, offset = spool.read(60)              # a replay under way: its blocks come back
    spool.advance(offset, len(lines))
    out["reclaimed"] = spool.reclaim()
    spool.append([rows[902]])                    # ordinary rows fit again, the reserve is back
    out["after_reclaim"] = spool.reserve_path.exists()
    lines, offset = spool.read(10_000)
    spool.advance(offset, len(lines))
    out["reset"] = spool.reset_if_drained()
    spool.append(rows[:3])                       # room again
    out["after_reset"] = spool.pending
    print(json.dumps(out))
""")


def _namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(  # noqa: S603
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],  # noqa: S607
        capture_output=True, check=False,
    )
    return probe.returncode == 0


def test_a_full_file_system_never_tears_a_line_or_loses_the_offset(tmp_path: Path) -> None:
    if not _namespaces_available():
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    mount = tmp_path / "spool"
    mount.mkdir()
    script = 'mount -t tmpfs -o size=64k tmpfs "$1" && shift && exec "$@"'
    result = subprocess.run(  # noqa: S603
        ["unshare", "-m", "sh", "-c", script, "sh", str(mount),  # noqa: S607
         sys.executable, "-c", FULL_DISK_CHILD, str(mount)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["reserve"] is True and out["errno"] == 28  # ENOSPC, not the cap
    assert 60 <= out["appended"] < 130  # ~56 KiB of 512-byte rows: the disk, not the loop
    assert out["file_intact"] and out["offset_saved"] and out["reserved_row"]
    assert out["ordinary_after"] == "reserved"  # the freed reserve is for refusals only
    assert out["reclaimed"] >= 16 * 1024 and out["after_reclaim"] is True
    assert out["reset"] is True and out["after_reset"] == 3


def test_replayed_rows_give_their_blocks_back_before_the_file_is_drained(tmp_path: Path) -> None:
    """Rows arriving while the replay runs keep the file from ever being empty: the replayed
    part is punched out (its bytes stop counting against the cap), the rest reads as before."""
    path = tmp_path / "s.jsonl"
    spool = Spool(path, max_bytes=400_000, headroom=0)
    spool.append([_row(i, 1000) for i in range(300)])
    with pytest.raises(SpoolFull):
        spool.append([_row(i, 1000) for i in range(300, 401)])
    lines, offset = spool.read(200)
    spool.advance(offset, len(lines))
    freed = spool.reclaim()
    assert freed >= 196_000 and spool.used == 300_000 - freed
    assert path.stat().st_size == 300_000 and path.stat().st_blocks * 512 < 120_000
    spool.append([_row(i, 1000) for i in range(300, 401)])  # fits now
    spool.close()
    again = Spool(path)
    try:
        assert again.pending == 201 and again.used < 220_000
        assert [json.loads(line)[0] for line in again.read(2)[0]] == [200, 201]
    finally:
        again.close()
