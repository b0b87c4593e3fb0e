"""JSON logging for the gateway: one object per line, with the request's correlation id.

Secrets never reach a log line: Authorization-like values and fields the audit log would mask
(``redaction.sensitive_key``) are redacted by the formatter.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from plant_gateway.redaction import sensitive_key

correlation_id_var: ContextVar[str | None] = ContextVar("correlation_id", default=None)

_SECRET_PATTERN = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_SECRET_KEYS = ("authorization", "secret", "password", "token", "key", "cookie")
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message",
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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        cid = correlation_id_var.get()
        if cid:
            doc["correlation_id"] = cid
        for key, val in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                doc[key] = redact(val)
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
