"""``LoopCounter``/``LoopHistogram`` (plant_gateway.metrics) expose what prometheus_client would.

Each case records the same observations into a Loop* metric in one fresh registry and into
prometheus_client's own Counter/Histogram (same name, labels, buckets) in another, then
compares the text and OpenMetrics expositions byte for byte, except the values of the
``_created`` samples (creation timestamps, never equal).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from plant_gateway import metrics
from plant_gateway.metrics import LoopCounter, LoopHistogram

Exposition = Callable[[CollectorRegistry], bytes]
EXPOSITIONS = pytest.mark.parametrize("expose", [generate_latest, generate_openmetrics],
                                      ids=["text", "openmetrics"])
CREATED_VALUE = re.compile(rb"^(\S+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)

MODULE_BUCKETS: tuple[float, ...] = metrics._BUCKETS
SHORT_BUCKETS: tuple[float, ...] = (0.5, 1, 2)  # ints among the bounds, as a caller may write them
# Below the first bound, exactly on bounds (first, middle, an int, the last), between bounds,
# above the last, 0 and repeats.
OBSERVATIONS: dict[tuple[float, ...], list[float]] = {
    MODULE_BUCKETS: [0, 0.0001, 0.001, 0.001, 0.0011, 0.0025, 0.05, 0.07, 1, 1.0, 2.5, 29.999,
                     30, 30.0001, 31, 600, 0],
    SHORT_BUCKETS: [0, 0.1, 0.5, 0.5000001, 1, 1.5, 2, 2.0, 2.1, 100],
}


def normalised(exposition: bytes) -> bytes:
    replaced, count = CREATED_VALUE.subn(rb"\1 <created>", exposition)
    assert count > 0, "no _created sample: the comparison would not cover them"
    return replaced


def pair() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)


def record(histogram: LoopHistogram | Histogram, series: dict[tuple[str, ...], Sequence[float]]
           ) -> None:
    for labels, values in series.items():
        child = histogram.labels(*labels)
        for value in values:
            child.observe(value)


@EXPOSITIONS
@pytest.mark.parametrize("buckets", [MODULE_BUCKETS, SHORT_BUCKETS], ids=["module", "short"])
def test_histogram_exposition_matches_prometheus_client(expose: Exposition,
                                                        buckets: Sequence[float]) -> None:
    observations = OBSERVATIONS[tuple(buckets)]
    series: dict[tuple[str, ...], Sequence[float]] = {
        ("/api/v1",): observations, ("/health",): observations[::-1][:3], ("/idle",): []}
    ours, theirs = pair()
    record(LoopHistogram("gw_duration_seconds", "Time", ["route"], buckets=buckets,
                         registry=ours), series)
    record(Histogram("gw_duration_seconds", "Time", ["route"], buckets=buckets,
                     registry=theirs), series)

    assert normalised(expose(ours)) == normalised(expose(theirs))


@EXPOSITIONS
def test_unlabelled_histogram_exposition_matches_prometheus_client(expose: Exposition) -> None:
    ours, theirs = pair()
    loop_child = LoopHistogram("gw_policy_seconds", "Policy", [], buckets=MODULE_BUCKETS,
                               registry=ours).labels()
    stock = Histogram("gw_policy_seconds", "Policy", buckets=MODULE_BUCKETS, registry=theirs)
    assert normalised(expose(ours)) == normalised(expose(theirs))  # zero series, before use
    for value in OBSERVATIONS[MODULE_BUCKETS]:
        loop_child.observe(value)
        stock.observe(value)

    assert normalised(expose(ours)) == normalised(expose(theirs))


@EXPOSITIONS
def test_counter_exposition_matches_prometheus_client(expose: Exposition) -> None:
    increments: dict[tuple[str, ...], list[float]] = {
        ("/api/v1", "GET", "200"): [1, 1, 1], ("/api/v1", "POST", "502"): [1],
        ("/", "GET", "404"): [2.5, 0], ("/x", "GET", "200"): []}
    ours, theirs = pair()
    loop = LoopCounter("gw_requests", "Requests", ["route", "method", "status"], registry=ours)
    stock = Counter("gw_requests", "Requests", ["route", "method", "status"], registry=theirs)
    for labels, amounts in increments.items():
        loop_child, stock_child = loop.labels(*labels), stock.labels(*labels)
        for amount in amounts:
            loop_child.inc(amount)
            stock_child.inc(amount)

    assert normalised(expose(ours)) == normalised(expose(theirs))


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    """An independent check of the counts, in case both libraries ever agreed on a mistake."""
    registry = CollectorRegistry()
    histogram = LoopHistogram("g", "g", ["k"], buckets=SHORT_BUCKETS, registry=registry)
    record(histogram, {("v",): OBSERVATIONS[SHORT_BUCKETS]})
    samples = {(s.name, s.labels.get("le")): s.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               for s in family.samples if s.name.startswith("g_")}

    assert samples[("g_bucket", "0.5")] == 3  # 0, 0.1, 0.5
    assert samples[("g_bucket", "1.0")] == 5  # + 0.5000001, 1
    assert samples[("g_bucket", "2.0")] == 8  # + 1.5, 2, 2.0
    assert samples[("g_bucket", "+Inf")] == samples[("g_count", None)] == 10
    assert samples[("g_sum", None)] == pytest.approx(sum(OBSERVATIONS[SHORT_BUCKETS]))


def test_module_requests_series_show_up_in_render() -> None:
    route = f"/test-{uuid.uuid4().hex}"
    metrics.child(metrics.REQUESTS, route, "GET", "200").inc()
    metrics.REQUESTS.labels(route, "GET", "200").inc()
    metrics.REQUESTS.labels(route, "POST", "503").inc()
    metrics.child(metrics.LATENCY, route).observe(0.01)

    rendered = metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(rendered)}

    requests = {(s.name, s.labels["method"], s.labels["status"]): s.value
                for s in families["plant_gateway_requests"].samples
                if s.labels.get("route") == route}
    assert requests[("plant_gateway_requests_total", "GET", "200")] == 2
    assert requests[("plant_gateway_requests_total", "POST", "503")] == 1
    assert len(requests) == 2
    assert families["plant_gateway_requests"].type == "counter"
    created = [s for s in families["plant_gateway_requests_created"].samples
               if s.labels.get("route") == route]
    assert len(created) == 2
    assert f'plant_gateway_request_duration_seconds_count{{route="{route}"}} 1.0' in rendered
    assert "plant_gateway_policy_duration_seconds_bucket" in rendered
    assert "plant_gateway_upstream_duration_seconds" in rendered
