"""The OTLP exporter against a real receiver on loopback: a collector that refuses exports is
one ``dependency down`` line and one ``up`` line, however many batches fail; tracing at rate 0
imports nothing of OpenTelemetry."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from plant_gateway import events
from plant_gateway.settings import Settings
from plant_gateway.tracing import Tracing
from tests.fixtures.otlp import OtlpReceiver


def test_a_refusing_collector_is_one_down_and_one_up_line(
    otlp_receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    events.reset()
    caplog.set_level(logging.INFO, logger="plant_gateway.events")
    settings = Settings(plant_backend_url="http://127.0.0.1:9", jwt_secret="s" * 40,
                        trace_sample_rate=1.0, otel_exporter_otlp_endpoint=otlp_receiver.endpoint)
    tracing = Tracing(settings)
    otlp_receiver.fail = 400  # not retried: each flush is one failed export
    try:
        for n in range(3):
            tracing.tracer.start_span(f"refused {n}").end()
            tracing.provider.force_flush()
        otlp_receiver.fail = None
        tracing.tracer.start_span("accepted").end()
        tracing.provider.force_flush()
    finally:
        tracing.shutdown()
        events.reset()
    assert otlp_receiver.requests == 4
    assert [s.name for s in otlp_receiver.received()] == ["accepted"]
    lines = [(r.__dict__["event"], r.__dict__["dependency"]) for r in caplog.records
             if r.name == "plant_gateway.events"]
    assert lines == [("dependency_down", "otlp_collector"), ("dependency_up", "otlp_collector")]


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from plant_gateway.app import build_tracing, create_app\n"
        "from plant_gateway.settings import Settings\n"
        "s = Settings(plant_backend_url='http://127.0.0.1:9', jwt_secret='s' * 40)\n"
        "app = create_app(s)\n"
        "assert build_tracing(s) is None and app.tracing is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
