"""``plant-gateway serve``: run the gateway on uvicorn (uvloop + httptools, lifespan on).

A bad or missing setting stops start-up with one line naming it and exit code 2: settings are
validated, then the backends that need no network (keys, policy bundle, flags file, state
directory) are built once before uvicorn starts. A failure while the server starts (a port in
use, an embedded server that does not start) is one log line and exit code 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer

from plant_gateway.cli.common import RUNTIME_FAILURE, config_fail
from plant_gateway.settings import Settings, SettingsError, load_settings


def serve(
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file")] = None,
    port: Annotated[int | None, typer.Option("--port", help="listen port (PORT)")] = None,
    host: Annotated[str | None, typer.Option("--host", help="listen address (HOST)")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, max=64, help="worker processes (WORKERS)")
    ] = None,
) -> None:
    """Run the gateway."""
    import uvicorn

    if config is not None:
        os.environ["PLANT_CONFIG"] = str(config)
    if port is not None:
        os.environ["PORT"] = str(port)
    if host is not None:
        os.environ["HOST"] = host
    try:
        settings = load_settings()
        check_backends(settings)
    except SettingsError as exc:
        config_fail(str(exc))
    from plant_gateway.logs import configure_logging

    configure_logging(settings.log_level, settings.google_cloud_project)
    _open_files(settings)
    worker_count = workers or settings.workers
    shared_redis = _share_counters(settings, worker_count)
    metrics_dir = None
    try:
        metrics_dir = _share_metrics(settings, worker_count)
        _run(uvicorn, settings, worker_count)
    finally:
        if shared_redis is not None:
            shared_redis.terminate()
            shared_redis.wait(timeout=10)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def check_backends(settings: Settings) -> None:
    """Build what start-up would build without touching the network; SettingsError if unusable.

    In the server these failures would stop each worker with exit code 3 after uvicorn's own
    start-up lines; here they are one ``config error`` line before anything listens.
    """
    from plant_gateway.backends import flags, keys, policy

    try:
        Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(
            f"PLANT_STATE_DIR: cannot create {str(settings.state_dir)!r}: {exc.strerror}"
        ) from None
    if settings.guard_on("auth"):
        keys.create(settings)
    if settings.guard_on("policy") and not settings.opa_service_url:
        policy.create(settings)  # compiles the bundle (tens of ms); the watcher starts later
    flags.create(settings)


def _share_counters(settings: Settings, worker_count: int) -> subprocess.Popen[bytes] | None:
    """Several workers must share one counters store: per-worker counters are not limits.

    Without REDIS_URL, start an embedded redis-server (unix socket) for the workers to share.
    """
    os.environ["WORKERS"] = str(worker_count)
    if worker_count == 1 or settings.effective_redis_url:
        return None
    from plant_gateway.counters import start_embedded_redis

    try:
        url, proc = start_embedded_redis(settings.state_dir)
    except SettingsError as exc:
        config_fail(str(exc))
    os.environ["REDIS_URL"] = url
    return proc


def _open_files(settings: Settings) -> None:
    """Room for MAX_CONNECTIONS clients plus the upstream pools (inherited by the workers)."""
    import logging

    from plant_gateway.runtime import open_files_needed, raise_open_files_limit

    upstreams = 2 if settings.plant_sandbox_url else 1
    needed = open_files_needed(settings.max_connections, settings.upstream_pool_size, upstreams)
    soft, _ = raise_open_files_limit(needed)
    if soft < needed:
        logging.getLogger("plant_gateway.serve").warning(
            "open-file limit %d is below the %d that MAX_CONNECTIONS and UPSTREAM_POOL_SIZE "
            "need: connections beyond it fail to be accepted; lower MAX_CONNECTIONS or raise "
            "the limit (ulimit -n)", soft, needed, extra={"event": "open_files_short"})


def _share_metrics(settings: Settings, worker_count: int) -> Path | None:
    """Several workers: a fresh directory for their metrics snapshots, so /metrics sums them.

    See ``plant_gateway.metrics.sharing`` (SharedMetrics); removed when serve ends.
    """
    from plant_gateway.metrics.sharing import (
        METRICS_DIR_ENV,
        create_metrics_dir,
        remove_stale_metrics_dirs,
    )

    os.environ.pop(METRICS_DIR_ENV, None)
    remove_stale_metrics_dirs(settings.state_dir)
    if worker_count == 1:
        return None
    try:
        path = create_metrics_dir(settings.state_dir)
    except OSError as exc:
        config_fail(f"PLANT_STATE_DIR: {exc}")
    os.environ[METRICS_DIR_ENV] = str(path)
    return path


# httptools with corked writes: a small response's head and body leave in one send()
HTTP_PROTOCOL = "plant_gateway.http_protocol:CorkedHttpToolsProtocol"


def _run(uvicorn: Any, settings: Settings, worker_count: int) -> None:
    """``uvicorn.run`` with the sockets bound here: PORT and, unless 0, ADMIN_PORT.

    Every worker serves both sockets (the app tells them apart by the local port); binding
    them before the workers start makes a port in use one line naming the setting.
    """
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "plant_gateway.app:factory", factory=True, host=settings.host, port=settings.port,
        workers=worker_count, loop="uvloop", http=HTTP_PROTOCOL, lifespan="on",
        log_config=None, access_log=False, proxy_headers=False, server_header=False,
        date_header=False,
        # the start of SHUTDOWN_GRACE_S; the audit flush (lifespan shutdown) gets the rest
        timeout_graceful_shutdown=settings.connection_drain_s,
    )
    sockets = [listen("PORT", settings.host, settings.port)]
    try:
        if settings.admin_port:
            sockets.append(listen("ADMIN_PORT", settings.admin_host, settings.admin_port))
        server = uvicorn.Server(config)
        if worker_count > 1:
            Multiprocess(config, sockets=sockets).run()
        else:
            server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:
        if exc.code == STARTUP_FAILURE:  # already logged as one line (app.lifespan, uvicorn)
            raise typer.Exit(RUNTIME_FAILURE) from None
        raise
    finally:
        for sock in sockets:
            sock.close()
    if worker_count == 1 and not server.started:  # start-up failed, already logged
        raise typer.Exit(RUNTIME_FAILURE)


def listen(setting: str, host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn, or one error line naming ``setting`` and exit 1."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        logging.getLogger("plant_gateway.serve").error(
            f"{setting}: cannot listen on {host}:{port}: {reason}"
        )
        raise typer.Exit(RUNTIME_FAILURE) from None
    sock.set_inheritable(True)
    return sock


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
