"""RequestContext: the one object a request is, as it flows through the pipeline.

Steps read and write only this; the audit step turns it into one row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(slots=True)
class Identity:
    """The verified caller, from a token (or a service key)."""

    user_id: str | None = None
    subject: str | None = None
    email: str | None = None
    roles: list[str] = field(default_factory=list)
    customer_id: str | None = None
    governor_agent_id: str | None = None
    agent_id: str | None = None
    trial_mode: bool = False
    trial_expires_at: str | None = None
    jti: str | None = None
    token_digest: str | None = None
    token_exp: int | None = None
    issuer: str | None = None
    service_account: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)

    @property
    def is_governor(self) -> bool:
        return "admin" in self.roles and bool(self.governor_agent_id)


@dataclass(slots=True)
class RequestContext:
    # ingress
    request_id: str
    correlation_id: str
    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    client_ip: str
    scheme: str = "http"
    host: str = ""
    causation_id: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    is_websocket: bool = False
    http_version: str = "1.1"
    started: float = field(default_factory=time.perf_counter)
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    content_length: int | None = None
    # routing
    upstream_path: str = ""
    is_public: bool = False
    service_key_route: bool = False
    brute_force_route: bool = False
    # identity
    identity: Identity | None = None
    authorization: str | None = None
    # policy
    resource: str | None = None
    action: str | None = None
    resource_id: str | None = None
    policy_decision: dict[str, Any] | None = None
    policies_evaluated: list[str] = field(default_factory=list)
    policy_latency_ms: float | None = None
    policy_decision_id: str | None = None
    target_backend: str = "production"
    # per-request feature flags (name -> bool/value), filled lazily by the flags backend
    flags: dict[str, Any] = field(default_factory=dict)
    # body: set when a step must see or rewrite it (tenant binding, audit capture)
    body: bytes | None = None
    body_rewritten: bool = False
    request_body_sample: bytes | None = None
    # response
    status_code: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    extra_response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body_sample: bytes | None = None
    upstream_latency_ms: float | None = None
    upstream_cost_usd: float | None = None
    # outcome
    refused_by: str | None = None  # the step whose Problem answered the request
    error_type: str | None = None
    error_message: str | None = None
    # step-private scratch space, keyed by step name (e.g. a budget reservation to settle)
    scratch: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0
