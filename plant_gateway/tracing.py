"""OpenTelemetry tracing of the request path, exported over OTLP/HTTP; off by default.

``TRACE_SAMPLE_RATE`` = 0 builds nothing (no provider, no span object; the app tests one
attribute). Above 0: a parent-based sampler (a caller's sampled ``traceparent`` is recorded, an
unsampled one is not, a new trace with that probability), a SERVER span per request named and
attributed by the stable HTTP semantic conventions, a child span per guard, the counters round
trip, the policy decision and a CLIENT span for the upstream call, whose context is the
``traceparent`` the backend receives. Spans leave in batches from the SDK's export thread.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from plant_gateway import __version__, events
from plant_gateway.logs import SPAN_KEY
from plant_gateway.pipeline.counter_batch import BATCH, COUNTER_BATCH
from plant_gateway.pipeline.registry import PLUMBING
from plant_gateway.redaction import MASK, mask_text, sensitive_key

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext
    from plant_gateway.pipeline.step import Step
    from plant_gateway.problems import Problem
    from plant_gateway.settings import Settings

CONTEXT_KEY = "otel_context"  # ctx.scratch: an OpenTelemetry Context holding the server span
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                           "TRACE", "PATCH"})
# steps without a span of their own: the plumbing, but the counter batch (its ``counters`` span)
UNTRACED = PLUMBING - {COUNTER_BATCH}
EXPORT_TIMEOUT_S = 3.0  # per batch, retries included; bounds the flush at shutdown too
_propagator = TraceContextTextMapPropagator()
Forward = Callable[..., Awaitable["Problem | None"]]


class ReportingExporter(SpanExporter):
    """The OTLP exporter, reporting the collector as a dependency (one line per change)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.health = events.dependency("otlp_collector")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        if result is SpanExportResult.SUCCESS:
            self.health.up()
        else:
            self.health.down(f"export of {len(spans)} spans failed")
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base endpoint (as OTEL_EXPORTER_OTLP_ENDPOINT)."""
    return endpoint.rstrip("/") + "/v1/traces"


class Tracing:
    """The tracer of one gateway process; ``build`` returns None when tracing is off."""

    def __init__(self, settings: Settings, exporter: SpanExporter | None = None) -> None:
        resource = Resource.create({
            "service.name": settings.otel_service_name,
            "service.version": __version__,
            "deployment.environment.name": settings.environment,
        })
        # begin() draws new traces at the rate and passes over unsampled callers, so what
        # reaches the SDK is recorded; ParentBased still refuses an unsampled remote parent
        self.rate = settings.trace_sample_rate
        sampler = ParentBased(ALWAYS_ON)
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        if exporter is None:
            exporter = OTLPSpanExporter(
                endpoint=traces_url(settings.otel_exporter_otlp_endpoint),
                timeout=EXPORT_TIMEOUT_S,
            )
        self.provider.add_span_processor(BatchSpanProcessor(ReportingExporter(exporter)))
        self.tracer = self.provider.get_tracer("plant_gateway", __version__)
        key = settings.cp_registration_key
        self.secrets = (key.get_secret_value(),) if key is not None else ()

    @classmethod
    def build(cls, settings: Settings) -> Tracing | None:
        if settings.trace_sample_rate <= 0:
            return None
        return cls(settings)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop."""
        self.provider.shutdown()

    # --- the server span -----------------------------------------------------------------
    def begin(self, ctx: RequestContext, route: str | None = None) -> None:
        """Start the request's SERVER span if it is sampled; ``ctx.traceparent`` becomes its
        context. An unsampled request costs no SDK call: the caller's unsampled
        ``traceparent`` goes on as ingress propagated it, and a new trace not drawn (at
        ``rate``) leaves with the ``00`` flags (a trace of its own: nobody upstream to agree
        with, so a random draw samples as well as the trace-id ratio would).

        Only a recording span is kept (``ctx.scratch[SPAN_KEY]``); child spans name it as their
        parent explicitly (no context attach per span: the SDK's contextvar dance is the most
        expensive part of a span).
        """
        parent = None
        if continues_caller(ctx):
            if ctx.traceparent[53:55] not in SAMPLED_FLAGS:  # type: ignore[index]
                return
            parent = _propagator.extract(ctx.headers)
        elif self.rate < 1.0 and random.random() >= self.rate:  # noqa: S311
            ctx.traceparent = ctx.traceparent[:53] + "00"  # type: ignore[index]
            return
        method = ctx.method if ctx.method in KNOWN_METHODS else "_OTHER"
        span = self.tracer.start_span(
            f"{method} {route}" if route else method, context=parent, kind=SpanKind.SERVER,
        )
        sc = span.get_span_context()
        ctx.traceparent = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
        if not span.is_recording():
            return
        span.set_attributes(self.server_attributes(ctx, method, route))
        ctx.scratch[SPAN_KEY] = span
        ctx.scratch[CONTEXT_KEY] = trace.set_span_in_context(span)

    def server_attributes(
        self, ctx: RequestContext, method: str, route: str | None
    ) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.scheme": ctx.scheme,
            "url.path": mask_text(ctx.path, self.secrets),
            "network.protocol.version": ctx.http_version,
            "client.address": ctx.client_ip,
            "plant.correlation_id": ctx.correlation_id,
        }
        if method == "_OTHER":
            attributes["http.request.method_original"] = ctx.method[:64]
        if route:
            attributes["http.route"] = route
        if ctx.query_string:
            attributes["url.query"] = redacted_query(ctx.query_string, self.secrets)
        host, port = split_host(ctx.host)
        if host:
            attributes["server.address"] = host
        if port:
            attributes["server.port"] = port
        agent = ctx.headers.get("user-agent")
        if agent:
            attributes["user_agent.original"] = mask_text(agent[:512], self.secrets)
        return attributes

    def end(self, ctx: RequestContext, status: int) -> None:
        """End the SERVER span with the outcome (5xx: ERROR status, ``error.type``)."""
        span = ctx.scratch.get(SPAN_KEY)
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        ident = ctx.identity
        if ident is not None and ident.user_id:
            span.set_attribute("user.id", ident.user_id)
        if ctx.refused_by:
            span.set_attribute("plant.refused_by", ctx.refused_by)
        if ctx.error_type:
            span.set_attribute("plant.error_type", ctx.error_type)
        if status >= 500:
            span.set_attribute("error.type", ctx.error_type or str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    # --- child spans ---------------------------------------------------------------------
    def wrap_step(self, step: Step, counters: Any = None) -> Step:
        """``step`` with a span around each run (plumbing steps are returned as they are)."""
        if step.name in UNTRACED:
            return step
        return TracedStep(step, self.tracer, counters)

    def wrap_policy(self, engine: Any) -> Any:
        return None if engine is None else TracedPolicy(engine, self.tracer)

    def wrap_forward(self, forward: Forward, proxy: Any) -> Forward:
        """The proxy's ``forward`` inside a CLIENT span whose context the backend receives."""
        tracer = self.tracer
        secrets = self.secrets

        async def traced(ctx: RequestContext, *args: Any) -> Problem | None:
            parent = ctx.scratch.get(CONTEXT_KEY)
            if parent is None:
                return await forward(ctx, *args)
            upstream = proxy.upstream(ctx.target_backend)
            method = ctx.method if ctx.method in KNOWN_METHODS else "_OTHER"
            query = redacted_query(ctx.query_string, secrets) if ctx.query_string else ""
            attributes = {
                "http.request.method": method,
                "server.address": upstream.base.host or "",
                "server.port": upstream.base.port or 0,
                "url.full": str(upstream.url(mask_text(ctx.upstream_path, secrets), query)),
                "network.protocol.version": "1.1",
                "plant.upstream": upstream.name,
            }
            span = tracer.start_span(method, parent, SpanKind.CLIENT, attributes)
            saved = ctx.traceparent
            sc = span.get_span_context()
            ctx.traceparent = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
            try:
                problem = await forward(ctx, *args)
            except BaseException as exc:
                failed(span, exc)
                raise
            finally:
                ctx.traceparent = saved
            client_outcome(span, ctx, problem)
            span.end()
            return problem

        return traced


def failed(span: Any, exc: BaseException) -> None:
    """End a span that an exception (a bug, a cancelled request) went through."""
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR))
    span.end()


SAMPLED_FLAGS = frozenset(f"{n:02x}" for n in range(256) if n & 1)


def continues_caller(ctx: RequestContext) -> bool:
    """Whether ingress kept the caller's trace (a valid ``traceparent``): same trace id."""
    incoming = ctx.headers.get("traceparent")
    tp = ctx.traceparent
    return incoming is not None and tp is not None and len(tp) == 55 \
        and incoming.strip().lower()[3:35] == tp[3:35]


def client_outcome(span: Any, ctx: RequestContext, problem: Problem | None) -> None:
    """Status code and ``error.type`` of the upstream call (a problem: nothing usable came)."""
    if problem is not None:
        span.set_attribute("error.type", problem.kind)
        span.set_status(Status(StatusCode.ERROR))
        return
    status = ctx.status_code
    if status is not None:
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))


class TracedStep:
    """A pipeline step with a span around ``run``: ``guard <name>``; ``counters`` for the batch.

    Only the policy guard's span is made current (its engine's ``policy decision`` span finds
    its parent there); the others name the server span as their parent.
    """

    def __init__(self, step: Step, tracer: trace.Tracer, counters: Any = None) -> None:
        self.step = step
        self.name = step.name
        self.tracer = tracer
        after = getattr(step, "after", None)
        if after is not None:
            self.after = after  # the app runs ``after`` hooks of the steps that have one
        self.attributes: dict[str, Any] | None = None
        self.kind = SpanKind.INTERNAL
        self.span_name = f"guard {step.name}"
        self.current = step.name == "policy"
        if step.name == COUNTER_BATCH:
            self.span_name, self.attributes = "counters", counter_attributes(counters)
            if self.attributes.get("db.system.name"):
                self.kind = SpanKind.CLIENT

    async def run(self, ctx: RequestContext) -> Problem | None:
        parent = ctx.scratch.get(CONTEXT_KEY)
        if parent is None:
            return await self.step.run(ctx)
        span = self.tracer.start_span(self.span_name, parent, self.kind, self.attributes)
        if self.name == COUNTER_BATCH:
            batch = ctx.scratch.get(BATCH)
            span.set_attribute("plant.counters.ops", len(batch.pending) if batch else 0)
        token = otel_context.attach(trace.set_span_in_context(span, parent)) \
            if self.current else None
        try:
            problem = await self.step.run(ctx)
        except BaseException as exc:
            failed(span, exc)
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
        if problem is not None:
            span.set_attributes({"plant.outcome": "refused", "plant.problem": problem.kind})
            if problem.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()
        return problem


def counter_attributes(counters: Any) -> dict[str, Any]:
    if getattr(counters, "name", "") == "redis":
        return {"db.system.name": "redis", "db.operation.name": "PIPELINE",
                "plant.counters.backend": "redis"}
    return {"plant.counters.backend": "in-process"}


class TracedPolicy:
    """A policy engine whose ``decide`` is a ``policy decision`` span; the rest delegates."""

    def __init__(self, engine: Any, tracer: trace.Tracer) -> None:
        self.engine = engine
        self.tracer = tracer
        remote = type(engine).__name__.startswith("Remote")
        self.kind = SpanKind.CLIENT if remote else SpanKind.INTERNAL
        self.attributes = {"plant.policy.engine": "opa" if remote else "in-process"}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def decide(self, policy_input: dict[str, Any]) -> dict[str, Any]:
        if not trace.get_current_span().is_recording():
            return await self.engine.decide(policy_input)  # type: ignore[no-any-return]
        span = self.tracer.start_span("policy decision", None, self.kind, self.attributes)
        try:
            decision: dict[str, Any] = await self.engine.decide(policy_input)
        except BaseException as exc:
            failed(span, exc)
            raise
        span.set_attribute("plant.policy.allow", decision.get("allow") is True)
        if decision.get("kind"):
            span.set_attribute("plant.policy.kind", str(decision["kind"]))
        span.end()
        return decision


def redacted_query(query: str, secrets: tuple[str, ...]) -> str:
    """A query string with sensitive parameters (by name) and secret values masked."""
    from urllib.parse import parse_qsl, urlencode

    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode(
        [(k, MASK if sensitive_key(k) else mask_text(v, secrets)) for k, v in pairs], safe="*"
    )


def split_host(host: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` of a Host header (IPv6 in brackets)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name, port = host, ""
    return name[:255], int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def quiet_exporter_logs(level: str) -> None:
    """The exporter logs each failed batch; the collector's outages are one line each
    (``ReportingExporter``), so its own lines show only at DEBUG."""
    if level != "DEBUG":
        logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
