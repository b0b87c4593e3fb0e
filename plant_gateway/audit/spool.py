"""The audit spool: rows the database cannot take yet, on local disk, replayed oldest first.

One append-only file of lines per process (held under an flock), a persisted read offset, a
size cap with a small headroom, and a "reserve" file that gives that headroom back on a full disk.

Failure rules (why each exists):
- an append that fails (ENOSPC, EIO, the cap) leaves the file exactly as it was: a half-written
  line would glue itself to the next row and corrupt both;
- the offset is rewritten in place (a fixed-width number), never through a new file: on a full
  disk a rename-into-place needs a block it cannot get, and that failure used to kill the
  writer. A stale offset only makes a restarted gateway resend rows the table already holds,
  which the writer's ON CONFLICT retry absorbs;
- rows written while the sink refuses requests (the refusals themselves) may use the last
  ``headroom`` bytes of the cap; a reserve file of that size is deleted to make the room real
  when the file system itself is full before the cap;
- the blocks of replayed rows are given back as the replay moves on (a hole punched in the
  file), not only once the whole file is replayed: rows that keep arriving during a replay
  would otherwise fill the disk behind it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import sys
from pathlib import Path

OFFSET_FORMAT = b"%020d\n"  # fixed width: every rewrite lands on the same bytes
RECLAIM_MIN = 16 * 1024  # punch holes in steps of at least this (whole pages)
PAGE = 4096
_FALLOC_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (linux/falloc.h)


class SpoolFull(Exception):
    """The spool reached its size cap (``AUDIT_SPOOL_MAX_BYTES``)."""


class Spool:
    """Append-only lines with a read offset; ``size`` counts the file's bytes (the cap's unit)."""

    def __init__(
        self, path: Path, max_bytes: int = 0, headroom: int = 0, lock: bool = True
    ) -> None:
        self.path = path
        self.offset_path = path.with_suffix(".offset")
        self.reserve_path = path.with_suffix(".reserve")
        self.max_bytes = max_bytes  # 0: no cap (a spool opened only to be replayed)
        self.headroom = headroom
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if lock:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stat = os.fstat(self.fd)
            self.size = stat.st_size
            self.used = min(stat.st_size, stat.st_blocks * 512)  # bytes on disk (holes: none)
            self.offset = min(_read_offset(self.offset_path), self.size)
            if lock:
                self._cut_torn_tail()
            self.pending = self._count_pending()
        except BaseException:
            os.close(self.fd)
            raise
        self._offset_fd: int | None = None
        self._disk_full = False  # the reserve was given up: until space is back, refusals only
        self.punched = 0  # the file's blocks before this offset were given back
        if lock:  # the offset file's block is taken now, while the disk has room
            with contextlib.suppress(OSError):
                self._persist_offset()

    @classmethod
    def try_claim(cls, path: Path) -> Spool | None:
        """Another process's spool, if it no longer holds it (it exited)."""
        try:
            spool = cls(path)
        except BlockingIOError:
            return None
        spool.reserve_path.unlink(missing_ok=True)  # its owner is gone: give the space back
        return spool

    # --- appending -------------------------------------------------------------------------
    def append(self, rows: list[bytes], reserved: bool = False) -> None:
        """Append and fsync ``rows``; raise ``SpoolFull`` or the ``OSError`` and leave the file
        as it was. ``reserved`` rows may use the headroom (and the reserve file's space)."""
        data = b"".join(rows)
        if self.max_bytes:
            limit = self.max_bytes if reserved else self.max_bytes - self.headroom
            if self.used + len(data) > limit:
                raise SpoolFull(f"full: AUDIT_SPOOL_MAX_BYTES={self.max_bytes}")
        if not reserved and self._disk_full:
            raise SpoolFull("No space left on device; what the reserve freed is for refusals")
        try:
            self._write(data)
        except OSError as exc:
            if not (reserved and exc.errno == errno.ENOSPC and self._release_reserve()):
                raise
            self._disk_full = True  # ordinary rows: not into the reserve's space
            self._write(data)  # the reserve's blocks are free now
        self.size += len(data)
        self.used += len(data)
        self.pending += len(rows)

    def _write(self, data: bytes) -> None:
        if os.fstat(self.fd).st_size != self.size:  # an earlier rollback did not finish
            os.ftruncate(self.fd, self.size)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError:
            with contextlib.suppress(OSError):  # retried before the next append
                os.ftruncate(self.fd, self.size)
            raise

    def _cut_torn_tail(self) -> None:
        """A crash mid-append leaves a line without its newline: cut it, so the next row
        starts a line of its own (it was never acknowledged as spooled)."""
        if self.size == 0:
            return
        with self.path.open("rb") as fh:
            start = max(0, self.size - 65536)
            while True:
                fh.seek(start)
                chunk = fh.read(self.size - start)
                end = chunk.rfind(b"\n")
                if end >= 0 or start == 0:
                    break
                start = max(0, start - 65536)
        keep = start + end + 1 if end >= 0 else 0
        if keep != self.size:
            os.ftruncate(self.fd, keep)
            self.size = keep
            self.offset = min(self.offset, keep)

    # --- the reserve -----------------------------------------------------------------------
    def make_reserve(self) -> bool:
        """Set ``headroom`` bytes aside in a file of their own (False if the disk has no room:
        the headroom is then only a margin under the cap)."""
        if not self.headroom or self.reserve_path.exists():
            return bool(self.headroom)
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return False
        try:
            try:
                os.posix_fallocate(fd, 0, self.headroom)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.write(fd, bytes(self.headroom))  # a file system without fallocate
            return True
        except OSError:
            self.reserve_path.unlink(missing_ok=True)
            return False
        finally:
            os.close(fd)

    def _release_reserve(self) -> bool:
        try:
            self.reserve_path.unlink()
        except OSError:
            return False
        return True

    # --- replaying -------------------------------------------------------------------------
    def _count_pending(self) -> int:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            return sum(1 for line in fh if line.endswith(b"\n"))

    def read(self, limit: int) -> tuple[list[bytes], int]:
        """Up to ``limit`` lines from the offset and the offset after them."""
        lines: list[bytes] = []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            while len(lines) < limit:
                line = fh.readline()
                if not line.endswith(b"\n"):
                    break  # EOF (or a torn last line of a crashed owner)
                lines.append(line)
            return lines, fh.tell() if lines else self.offset

    def advance(self, new_offset: int, rows: int) -> None:
        """Mark rows up to ``new_offset`` as stored. The in-memory offset moves first: an
        ``OSError`` persisting it costs at most a resend after a crash, never a row."""
        self.pending = max(0, self.pending - rows)
        self.offset = new_offset
        self._persist_offset()

    def reclaim(self) -> int:
        """Give the blocks of replayed rows (whole pages before the offset) back to the disk,
        and set the reserve aside again if it was given up; the bytes freed."""
        end = self.offset - self.offset % PAGE
        if end - self.punched < RECLAIM_MIN or not _punch_hole(self.fd, self.punched, end):
            return 0
        freed, self.punched = end - self.punched, end
        self.used = max(0, self.used - freed)
        if self._disk_full and self.make_reserve():
            self._disk_full = False
        return freed

    def reset_if_drained(self) -> bool:
        """Once every row is stored, empty the file (its space goes back to the disk) and set
        the reserve aside again. True if it did."""
        if self.pending or self.offset == 0:
            return False
        # offset 0 on disk first: a crash between the two steps resends rows (absorbed),
        # whereas an old offset over a refilled file would skip rows
        stored, self.offset = self.offset, 0
        try:
            self._persist_offset()
        except OSError:
            try:  # no offset file means offset 0 as well, and unlinking needs no free block
                self._forget_offset()
            except OSError:
                self.offset = stored
                raise
        os.ftruncate(self.fd, 0)
        self.size = self.used = self.punched = 0
        self._disk_full = False
        self.make_reserve()
        return True

    def _persist_offset(self) -> None:
        if self._offset_fd is None:
            self._offset_fd = os.open(self.offset_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(self._offset_fd, OFFSET_FORMAT % self.offset, 0)

    def _forget_offset(self) -> None:
        if self._offset_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._offset_fd)
            self._offset_fd = None
        self.offset_path.unlink(missing_ok=True)

    def close(self, remove_if_empty: bool = False) -> None:
        empty = self.pending == 0
        for fd in (self.fd, self._offset_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._offset_fd = None
        self.reserve_path.unlink(missing_ok=True)
        if remove_if_empty and empty:
            self.path.unlink(missing_ok=True)
            self.offset_path.unlink(missing_ok=True)


def _read_offset(path: Path) -> int:
    """The persisted offset; 0 when missing or unreadable (then rows are resent, deduplicated)."""
    try:
        return max(0, int(path.read_bytes().strip() or 0))
    except (OSError, ValueError):
        return 0


_fallocate: object = None  # libc's fallocate, looked up once; False where there is none


def _punch_hole(fd: int, start: int, end: int) -> bool:
    """Free the blocks of ``[start, end)`` without moving what follows (Linux fallocate;
    False on a system or file system without it: the space then comes back when the file is
    emptied)."""
    global _fallocate
    if _fallocate is None:
        try:
            func = ctypes.CDLL(None, use_errno=True).fallocate
            func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            _fallocate = func if sys.platform.startswith("linux") else False
        except (OSError, AttributeError):
            _fallocate = False
    if _fallocate is False:
        return False
    if _fallocate(fd, _FALLOC_PUNCH_HOLE, start, end - start) == 0:  # type: ignore[operator]
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(code, os.strerror(code))
