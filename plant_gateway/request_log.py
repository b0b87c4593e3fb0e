"""The request log: one JSON line per request, built once after the response is sent.

Cloud Logging's ``httpRequest`` and trace fields, the correlation and request ids, the
principal, the guard that refused and why, and the gateway / policy / upstream latency.
``REQUEST_LOG_SAMPLE_RATE`` picks requests at random; a failure (a 5xx answer, an upstream
stream that broke after the head was sent) and a request whose trace was recorded are always
logged. Severity: INFO below 400, WARNING for 4xx, ERROR for failures, so
``LOG_LEVEL=WARNING`` keeps only refused and failed requests. Secrets never reach the line:
the query string is redacted by parameter name, and the path, user agent and refusal text are
masked by value (``redaction``).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

import orjson

from plant_gateway.logs import SPAN_KEY, trace_fields, write_line
from plant_gateway.memo import BoundedMemo
from plant_gateway.redaction import MASK, mask_text, sensitive_key

if TYPE_CHECKING:
    from plant_gateway.context import Identity, RequestContext
    from plant_gateway.settings import Settings

LOGGER = "plant_gateway.request"
TEXT_CAP = 512  # user agent, host and refusal text are cut to this many characters
URL_CAP = 2048
# failures logged (as errors) at any sample rate, like a 5xx: the status may say 2xx
FAILURES = frozenset({"upstream-stream-error", "internal-error"})
_CACHE_MAX = 1024


class RequestLog:
    """Writes the request line (see the module docstring); ``record`` never raises."""

    def __init__(self, settings: Settings, write: Any = write_line) -> None:
        self.rate = settings.request_log_sample_rate
        self.project = settings.google_cloud_project
        key = settings.cp_registration_key
        self.secrets = (key.get_secret_value(),) if key is not None else ()
        self.logger = logging.getLogger(LOGGER)
        self.write = write
        # user agent -> masked (a few distinct values)
        self._agents: BoundedMemo[str, str] = BoundedMemo(_CACHE_MAX)
        # query -> redacted, when nothing was masked
        self._queries: BoundedMemo[str, str] = BoundedMemo(_CACHE_MAX)
        # path -> (masked, as a URL path)
        self._paths: BoundedMemo[str, tuple[str, str]] = BoundedMemo(_CACHE_MAX)

    def wanted(self, ctx: RequestContext, status: int) -> int:
        """The line's level, or 0 when this request is not logged."""
        failed = status >= 500 or ctx.error_type in FAILURES
        level = logging.ERROR if failed else (
            logging.WARNING if status >= 400 else logging.INFO)
        if not failed and SPAN_KEY not in ctx.scratch:
            rate = self.rate
            if rate < 1.0 and (rate <= 0.0 or random.random() >= rate):  # noqa: S311
                return 0
        return level if self.logger.isEnabledFor(level) else 0

    def record(self, ctx: RequestContext, status: int, total_ms: float, sent: int) -> None:
        level = self.wanted(ctx, status)
        if not level:
            return
        try:
            line = self.line(ctx, status, total_ms, sent, level)
            self.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        except Exception:  # noqa: BLE001 - a log line must never fail a request
            self.logger.exception("request log line failed")

    def line(
        self, ctx: RequestContext, status: int, total_ms: float, sent: int, level: int
    ) -> dict[str, Any]:
        path, url_path = self.path(ctx.path)
        doc: dict[str, Any] = {
            "time": ctx.timestamp,  # orjson writes RFC 3339
            "severity": SEVERITY[level],
            "logger": LOGGER,
            "message": f"{ctx.method} {path[:URL_CAP]} {status} {total_ms:.1f} ms",
            "httpRequest": self.http_request(ctx, url_path, status, total_ms, sent),
            "correlation_id": ctx.correlation_id,
            "request_id": ctx.request_id,
        }
        doc.update(trace_fields(ctx.traceparent, self.project, SPAN_KEY in ctx.scratch))
        if ctx.identity is not None:
            doc["principal"] = principal(ctx.identity)
        if ctx.error_type or ctx.refused_by or ctx.error_message:
            doc.update(self.refusal(ctx))
        doc["latency_ms"] = latencies(ctx, total_ms)
        if ctx.upstream_latency_ms is not None:
            doc["upstream"] = ctx.target_backend
        return doc

    def path(self, raw: str) -> tuple[str, str]:
        """The path masked (JWTs, keys, card numbers), and that as a URL path (memoised)."""
        found = self._paths.data.get(raw)
        if found is None:
            masked = mask_text(raw, self.secrets)
            found = self._paths.put(raw, (masked, quote(masked, safe=_SAFE)))
        return found

    def http_request(
        self, ctx: RequestContext, url_path: str, status: int, total_ms: float, sent: int
    ) -> dict[str, Any]:
        url = f"{ctx.scheme}://{ctx.host[:TEXT_CAP]}{url_path}"
        if ctx.query_string:
            url += "?" + self.query(ctx.query_string)
        out: dict[str, Any] = {
            "requestMethod": ctx.method,
            "requestUrl": url[:URL_CAP],
            "status": status,
            "responseSize": str(sent),
            "remoteIp": ctx.client_ip,
            "latency": f"{total_ms / 1000:.6f}s",
            "protocol": f"HTTP/{ctx.http_version}",
        }
        if ctx.content_length:
            out["requestSize"] = str(ctx.content_length)
        agent = ctx.headers.get("user-agent")
        if agent:
            out["userAgent"] = self.user_agent(agent)
        return out

    def user_agent(self, agent: str) -> str:
        found = self._agents.data.get(agent)
        if found is None:
            found = self._agents.put(agent, mask_text(agent[:TEXT_CAP], self.secrets))
        return found

    def query(self, query: str) -> str:
        """The query with sensitive parameters masked (memoised only when none was)."""
        found = self._queries.data.get(query)
        if found is not None:
            return found
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [(k, MASK if sensitive_key(k) else mask_text(v, self.secrets)) for k, v in pairs]
        text = "&".join(f"{quote(k, safe='')}={quote(v, safe=_SAFE_VALUE)}" for k, v in masked)
        if masked == pairs and len(query) <= URL_CAP:
            self._queries.put(query, text)
        return text

    def refusal(self, ctx: RequestContext) -> dict[str, Any]:
        """Which guard refused (or what failed) and why."""
        out: dict[str, Any] = {}
        if ctx.refused_by:
            out["refused_by"] = ctx.refused_by
        if ctx.error_type:
            out["error_type"] = ctx.error_type
        if ctx.error_message:
            out["reason"] = mask_text(ctx.error_message[:TEXT_CAP], self.secrets)
        decision = ctx.policy_decision
        if ctx.refused_by == "policy" and decision is not None and decision.get("reason"):
            out["policy_reason"] = mask_text(str(decision["reason"])[:TEXT_CAP], self.secrets)
        return out


_SAFE = "/:@!$&'()*+,;=-._~%"
SEVERITY = {logging.INFO: "INFO", logging.WARNING: "WARNING", logging.ERROR: "ERROR"}
_SAFE_VALUE = ":@!$'()*+,;-._~%/"


def principal(ident: Identity) -> dict[str, Any]:
    """Who called: ids and roles from the verified token (never the token or the email)."""
    out: dict[str, Any] = {}
    if ident.user_id:
        out["user_id"] = ident.user_id
    if ident.customer_id:
        out["customer_id"] = ident.customer_id
    if ident.service_account:
        out["service_account"] = ident.service_account
    if ident.roles:
        out["roles"] = ident.roles
    if ident.trial_mode:
        out["trial"] = True
    return out


def latencies(ctx: RequestContext, total_ms: float) -> dict[str, float]:
    """Total, the gateway's own share (total minus upstream), policy and upstream, in ms."""
    out = {"total": _ms(total_ms)}
    upstream = ctx.upstream_latency_ms
    out["gateway"] = _ms(total_ms - upstream if upstream is not None else total_ms)
    if ctx.policy_latency_ms is not None:
        out["policy"] = _ms(ctx.policy_latency_ms)
    if upstream is not None:
        out["upstream"] = _ms(upstream)
    return out


def _ms(value: float) -> float:
    """Rounded to the microsecond (``round(value, 3)`` costs several times as much)."""
    return int(value * 1000.0 + 0.5) / 1000.0 if value > 0 else 0.0
