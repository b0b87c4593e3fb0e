"""The one typed settings object of the gateway, read once at start-up.

Environment variables (README → Configuration, with the deployed gateway's aliases) win over
an optional YAML config file (``PLANT_CONFIG``; every key is in
``deploy/plant-gateway.example.yaml``), which wins over the defaults below.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
import uuid
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import pydantic_settings
import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from plant_gateway import routing

GatewayType = Literal["CP", "PP", "PLANT"]
FailMode = Literal["closed", "open"]
# list settings given in the environment as "a,b,c" (or as a JSON list)
CommaList = Annotated[list[str], NoDecode]


def known_guards() -> tuple[str, ...]:
    """Every ``PLANT_GUARDS`` name: the switches the guard registry declares."""
    from plant_gateway.pipeline.registry import switches

    return switches()


def default_guards() -> list[str]:
    """The ``PLANT_GUARDS`` default: every guard but the opt-in ones."""
    from plant_gateway.pipeline.registry import default_switches

    return list(default_switches())


# The deployed gateway's public API routes (callers without a token yet, or with an expired
# one: logout must revoke the refresh token; audit events carry the backend's own service key).
# Its own pages (/health, /api/health, /docs, /redoc, /openapi.json) are ops routes here.
DEFAULT_PUBLIC_ROUTES = [
    "/api/v1/auth/login",
    "/api/v1/auth/register",
    "/api/v1/auth/refresh",
    "/api/v1/auth/logout",
    "/api/v1/auth/otp/*",
    "/api/v1/auth/google/verify",
    "/api/v1/audit/events",
]
DEFAULT_BRUTE_FORCE_ROUTES = [
    "/api/v1/auth/login",
    "/api/v1/auth/refresh",
    "/api/v1/auth/otp/*",
]
# Reached with X-CP-Registration-Key instead of a JWT (the CP backend's server-to-server calls);
# the mobile app's FCM token call under /customers uses the user's JWT.
DEFAULT_SERVICE_KEY_ROUTES = [
    "/api/v1/customers/*",
    "!/api/v1/customers/fcm-token",
    "/api/v1/otp/sessions/*",
    "POST /api/v1/notifications/events",
]

# Route labels of the metrics: the deployed Plant backend's API, one pattern per resource.
DEFAULT_METRICS_ROUTES = [
    f"/api/v1/{resource}/*" for resource in (
        "auth", "otp", "customers", "customer-platform-connections", "notifications",
        "agents", "agent-types", "agent-types-db", "agent-mold", "agent-authoring",
        "reference-agents", "hired-agents", "trials", "trial-status", "usage-events",
        "invoices", "receipts", "payments", "approvals", "audit", "skills", "skill-runs",
        "skill-configs", "scheduler", "flow-runs", "component-runs", "deliverables",
        "campaigns", "marketing", "digital-marketing-activation", "content-creator",
        "brand-voice", "catalog", "genesis", "feature-flags", "publish-receipts", "ops",
        "admin", "runtime",
    )
]
MAX_METRICS_ROUTES = 200


BUNDLE_DECISION_PATH = "plant/gateway/decision"
# The packages the deployed OPA serves (POST /v1/data/gateway/<package>)
DEPLOYED_OPA_PACKAGES = (
    "rbac_pp", "trial_mode", "governor_role", "sandbox_routing", "agent_budget",
)


def env_alias(*names: str) -> AliasChoices:
    return AliasChoices(*names, *(n.lower() for n in names))


class TenantRule(BaseModel):
    """Overwrite the caller-supplied customer id with the token's one (``TENANT_RULES``).

    ``path`` uses the route syntax of ``plant_gateway.routing`` without methods or ``!``
    (exact, anchored prefix ending in ``*``, ``*`` for one segment). ``location`` says where
    the id lives: a query parameter, a path segment (``segment`` is its index in the
    ``/``-split path, 0 being the first segment after the leading slash), or a top-level JSON
    body field.
    """

    path: str
    methods: list[str] = Field(default_factory=lambda: ["GET", "POST", "PUT", "PATCH", "DELETE"])
    location: Literal["query", "path", "body"] = "query"
    field: str = "customer_id"
    segment: int | None = None

    @field_validator("path")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        pattern = routing.parse(value)
        if pattern.methods is not None or pattern.excluded:
            raise ValueError("a tenant rule path takes no methods or '!': use 'methods'")
        return value


# Exactly the routes the deployed gateway binds to the caller's customer (same methods).
DEFAULT_TENANT_RULES = [
    TenantRule(path="/api/v1/invoices/*", methods=["GET"], location="query"),
    TenantRule(path="/api/v1/receipts/*", methods=["GET"], location="query"),
    TenantRule(path="/api/v1/trial-status/*", methods=["GET"], location="query"),
    TenantRule(path="/api/v1/hired-agents/by-subscription/*", methods=["GET"], location="query"),
    TenantRule(path="/api/v1/payments/subscriptions/*/cancel", methods=["POST"], location="query"),
    TenantRule(
        path="/api/v1/payments/subscriptions/by-customer/*", methods=["GET"], location="path",
        segment=5,
    ),
    TenantRule(path="/api/v1/payments/coupon/checkout", methods=["POST"], location="body"),
    TenantRule(path="/api/v1/payments/razorpay/order", methods=["POST"], location="body"),
    TenantRule(path="/api/v1/payments/razorpay/confirm", methods=["POST"], location="body"),
    TenantRule(path="/api/v1/hired-agents/draft", methods=["PUT"], location="body"),
    TenantRule(path="/api/v1/hired-agents/*/finalize", methods=["POST"], location="body"),
]


class RateTier(BaseModel):
    limit: int = Field(gt=0, description="requests per period")
    period_s: int = Field(default=3600, gt=0)
    burst: int = Field(default=20, ge=0, description="extra requests allowed at once")


def default_tiers() -> dict[str, RateTier]:
    return {
        # a screen of the mobile app or portal fires 10-30 calls at once: room for a few
        "trial": RateTier(limit=100, burst=40),
        "paid": RateTier(limit=1000, burst=100),
        "governor": RateTier(limit=10000, burst=200),
        "enterprise": RateTier(limit=10000, burst=200),
        "anonymous": RateTier(limit=600, burst=30),
        # service-key callers (the CP backend's registration, OTP and notification calls)
        "service": RateTier(limit=36000, burst=600),
    }


class SettingsSources(BaseSettings):
    """Where every setting comes from: the environment, then the ``PLANT_CONFIG`` YAML file."""

    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, case_sensitive=False, frozen=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("PLANT_CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


class Settings(SettingsSources):
    """Every setting of the gateway but the guards' own sections, validated once."""

    # --- process -------------------------------------------------------------------------
    host: str = Field("0.0.0.0", validation_alias=env_alias("HOST"))
    port: int = Field(8000, ge=1, le=65535, validation_alias=env_alias("PORT"))
    workers: int = Field(1, ge=1, le=64, validation_alias=env_alias("WORKERS"))
    # The ops surface (/metrics, /ready with every dependency) listens apart from the public
    # port: on Cloud Run only $PORT is reachable from outside, a sidecar collector scrapes
    # ADMIN_PORT over the instance's loopback. 0: no admin listener, the ops surface answers
    # on PORT as before (README → Observability).
    admin_port: int = Field(8081, ge=0, le=65535, validation_alias=env_alias("ADMIN_PORT"))
    admin_host: str = Field("127.0.0.1", validation_alias=env_alias("ADMIN_HOST"))
    environment: str = Field("development", validation_alias=env_alias("ENVIRONMENT"))
    gateway_type: GatewayType = Field("PLANT", validation_alias=env_alias("GATEWAY_TYPE"))
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias=env_alias("LOG_LEVEL")
    )
    debug: bool = Field(False, validation_alias=env_alias("DEBUG"))
    # SIGTERM to exit: Cloud Run kills 10 s after SIGTERM; 8 s leaves 2 for the interpreter's
    # exit. Open connections get the first part, the audit flush the rest (see ``audit_flush_s``).
    shutdown_grace_s: float = Field(
        8.0, gt=0, le=3600, validation_alias=env_alias("SHUTDOWN_GRACE_S")
    )
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        validation_alias=env_alias("PLANT_INSTANCE_ID"),
    )
    state_dir: Path = Field(Path(".plant-gateway"), validation_alias=env_alias("PLANT_STATE_DIR"))
    guards: CommaList = Field(
        default_factory=default_guards, validation_alias=env_alias("PLANT_GUARDS")
    )
    problem_type_base: str = Field(
        "https://waooaw.com", validation_alias=env_alias("PROBLEM_TYPE_BASE")
    )

    # --- upstreams -----------------------------------------------------------------------
    plant_backend_url: str = Field(validation_alias=env_alias("PLANT_BACKEND_URL"))
    plant_sandbox_url: str | None = Field(None, validation_alias=env_alias("PLANT_SANDBOX_URL"))
    plant_backend_use_id_token: bool = Field(
        False, validation_alias=env_alias("PLANT_BACKEND_USE_ID_TOKEN")
    )
    plant_backend_audience: str | None = Field(
        None, validation_alias=env_alias("PLANT_BACKEND_AUDIENCE")
    )
    upstream_connect_timeout_s: float = Field(
        5.0, gt=0, validation_alias=env_alias("UPSTREAM_CONNECT_TIMEOUT_S")
    )
    upstream_read_timeout_s: float = Field(
        30.0, gt=0, validation_alias=env_alias("UPSTREAM_READ_TIMEOUT_S")
    )
    upstream_retries: int = Field(2, ge=0, le=5, validation_alias=env_alias("UPSTREAM_RETRIES"))
    upstream_pool_size: int = Field(256, ge=1, validation_alias=env_alias("UPSTREAM_POOL_SIZE"))
    # a request that finds every pooled connection busy waits at most this long for one (503);
    # like connecting, getting a connection is bounded
    upstream_pool_timeout_s: float = Field(
        5.0, gt=0, validation_alias=env_alias("UPSTREAM_POOL_TIMEOUT_S")
    )
    # the whole exchange (body, backend, streamed answer), counted from the request's arrival:
    # 504 before the answer started, the connection cut after. Just under the deployed Cloud Run
    # request timeout (300 s), so the gateway answers and audits first and frees its upstream
    # connection; any shorter would cut streams the platform allows.
    request_deadline_s: float = Field(
        290.0, gt=0, validation_alias=env_alias("REQUEST_DEADLINE_S")
    )
    breaker_failure_threshold: int = Field(
        5, ge=1, validation_alias=env_alias("BREAKER_FAILURE_THRESHOLD")
    )
    breaker_reset_s: float = Field(30.0, gt=0, validation_alias=env_alias("BREAKER_RESET_S"))

    # --- client connections (per worker process; README -> Client connections) -------------
    # a new connection that sends no byte: closed
    client_idle_timeout_s: float = Field(
        30.0, gt=0, validation_alias=env_alias("CLIENT_IDLE_TIMEOUT_S")
    )
    # a request head must be complete this long after its first byte (slowloris): 408, closed
    client_header_timeout_s: float = Field(
        10.0, gt=0, validation_alias=env_alias("CLIENT_HEADER_TIMEOUT_S")
    )
    # idle between two requests. LONGER than Google's load balancer keeps an idle connection to
    # its backends (600 s, fixed): the proxy in front must close first, or it may send the next
    # request on a connection the gateway is closing, and its client gets a 502.
    client_keepalive_timeout_s: float = Field(
        620.0, gt=0, validation_alias=env_alias("CLIENT_KEEPALIVE_TIMEOUT_S")
    )
    # open client connections; past it the longest-idle one without a request running is
    # closed for the newcomer, and when every one is busy the newcomer gets a 503. 4x the 250
    # concurrent requests Cloud Run sends an instance; ~20 MiB of its 512 (measured: ~7 KiB an
    # idle connection, ~20 KiB one that has served a request)
    max_connections: int = Field(1000, ge=1, validation_alias=env_alias("MAX_CONNECTIONS"))

    # --- ingress -------------------------------------------------------------------------
    max_body_bytes: int = Field(
        10 * 1024 * 1024, gt=0, validation_alias=env_alias("MAX_BODY_BYTES")
    )
    # the whole request body must arrive within this after the head (408): a slow POST holds a
    # connection, never an upstream one (small bodies are read before one is taken); 10 MiB in
    # 60 s is 1.4 Mbit/s
    request_body_timeout_s: float = Field(
        60.0, gt=0, validation_alias=env_alias("REQUEST_BODY_TIMEOUT_S")
    )
    # JSON the gateway parses (tenant-bound bodies, audit capture, masked answers) nests at most
    # this deep; the cap keeps every parser and walker far from Python's recursion limit
    max_json_depth: int = Field(64, ge=1, le=200, validation_alias=env_alias("MAX_JSON_DEPTH"))
    # unset: 0 off Cloud Run; on Cloud Run (K_SERVICE set) the hops Google's front ends add
    trusted_proxy_hops: int | None = Field(
        None, ge=0, validation_alias=env_alias("TRUSTED_PROXY_HOPS")
    )
    cloud_run_service: str | None = Field(None, validation_alias=env_alias("K_SERVICE"))
    cors_origins: CommaList = Field(
        default_factory=list, validation_alias=env_alias("CORS_ORIGINS")
    )
    cors_allow_credentials: bool = Field(True, validation_alias=env_alias("CORS_ALLOW_CREDENTIALS"))

    # --- routes --------------------------------------------------------------------------
    public_routes: CommaList = Field(
        default_factory=lambda: list(DEFAULT_PUBLIC_ROUTES),
        validation_alias=env_alias("PUBLIC_ROUTES"),
    )
    brute_force_routes: CommaList = Field(
        default_factory=lambda: list(DEFAULT_BRUTE_FORCE_ROUTES),
        validation_alias=env_alias("BRUTE_FORCE_ROUTES"),
    )
    brute_force_limit_per_min: int = Field(
        30, gt=0, validation_alias=env_alias("BRUTE_FORCE_LIMIT_PER_MIN")
    )
    service_key_routes: CommaList = Field(
        default_factory=lambda: list(DEFAULT_SERVICE_KEY_ROUTES),
        validation_alias=env_alias("SERVICE_KEY_ROUTES"),
    )
    cp_registration_key: SecretStr | None = Field(
        None, validation_alias=env_alias("CP_REGISTRATION_KEY")
    )
    path_rewrites: dict[str, str] = Field(
        default_factory=lambda: {"/auth/google/verify": "/api/v1/auth/google/verify"},
        validation_alias=env_alias("PATH_REWRITES"),
    )
    tenant_rules: list[TenantRule] = Field(
        default_factory=lambda: list(DEFAULT_TENANT_RULES),
        validation_alias=env_alias("TENANT_RULES"),
    )

    # --- authentication --------------------------------------------------------------------
    jwt_secret: SecretStr | None = Field(None, validation_alias=env_alias("JWT_SECRET"))
    jwt_public_key: str | None = Field(None, validation_alias=env_alias("JWT_PUBLIC_KEY"))
    jwt_jwks_url: str | None = Field(None, validation_alias=env_alias("JWT_JWKS_URL"))
    jwt_algorithms: CommaList = Field(
        default_factory=lambda: ["RS256", "ES256", "HS256"],
        validation_alias=env_alias("JWT_ALGORITHMS", "JWT_ALGORITHM"),
    )
    jwt_issuers: CommaList = Field(
        default_factory=lambda: ["waooaw.com", "cp.waooaw.com", "pp.waooaw.com"],
        validation_alias=env_alias("JWT_ISSUERS", "JWT_ISSUER"),
    )
    jwt_audience: str | None = Field(None, validation_alias=env_alias("JWT_AUDIENCE"))
    # 60 s as on the deployed gateway (its clients mint tokens on other hosts)
    jwt_leeway_s: int = Field(60, ge=0, le=300, validation_alias=env_alias("JWT_LEEWAY_S"))
    jwt_max_lifetime_s: int = Field(
        24 * 3600, gt=0, validation_alias=env_alias("JWT_MAX_LIFETIME_S")
    )
    jwks_refresh_s: float = Field(300.0, gt=0, validation_alias=env_alias("JWKS_REFRESH_S"))
    jwks_min_refetch_s: float = Field(
        10.0, ge=0, validation_alias=env_alias("JWKS_MIN_REFETCH_S")
    )
    jwks_max_stale_s: float = Field(
        3600.0, gt=0, validation_alias=env_alias("JWKS_MAX_STALE_S"),
        description="cached JWKS keys stop verifying when no fetch succeeded for this long",
    )
    jwks_timeout_s: float = Field(3.0, gt=0, validation_alias=env_alias("JWKS_TIMEOUT_S"))
    jwt_claims_cache_size: int = Field(
        10_000, ge=0, validation_alias=env_alias("JWT_CLAIMS_CACHE_SIZE")
    )
    customer_enrichment: bool = Field(True, validation_alias=env_alias("CUSTOMER_ENRICHMENT"))
    enrichment_timeout_s: float = Field(
        2.0, gt=0, validation_alias=env_alias("ENRICHMENT_TIMEOUT_S")
    )
    revoked_prefix: str = Field("revoked_access:", validation_alias=env_alias("REVOKED_PREFIX"))
    token_version_prefix: str = Field(
        "token_version:", validation_alias=env_alias("TOKEN_VERSION_PREFIX")
    )

    # --- policy --------------------------------------------------------------------------
    opa_service_url: str | None = Field(
        None, validation_alias=env_alias("OPA_SERVICE_URL", "OPA_URL")
    )
    # Set: a remote OPA serves our bundle's single entry point at this path. Unset with a
    # remote OPA: the deployed OPA's own packages (OPA_PACKAGES), combined with our bundle.
    opa_decision_path: str | None = Field(None, validation_alias=env_alias("OPA_DECISION_PATH"))
    opa_packages: CommaList = Field(
        default_factory=lambda: list(DEPLOYED_OPA_PACKAGES),
        validation_alias=env_alias("OPA_PACKAGES"),
    )
    # unset: on Cloud Run (K_SERVICE) the OPA service is IAM-protected, so a Google ID token
    opa_use_id_token: bool | None = Field(None, validation_alias=env_alias("OPA_USE_ID_TOKEN"))
    opa_cache_ttl_s: float = Field(5.0, ge=0, validation_alias=env_alias("OPA_CACHE_TTL_S"))
    opa_timeout_s: float = Field(0.5, gt=0, validation_alias=env_alias("OPA_TIMEOUT_S"))
    policy_dir: Path = Field(
        Path(__file__).resolve().parent.parent / "policies",
        validation_alias=env_alias("POLICY_DIR"),
    )
    policy_cache_size: int = Field(10_000, ge=0, validation_alias=env_alias("POLICY_CACHE_SIZE"))
    # JSON responses to mask (obligation mask_fields) are buffered up to this; larger -> 502
    policy_mask_max_bytes: int = Field(
        1024 * 1024, gt=0, validation_alias=env_alias("POLICY_MASK_MAX_BYTES")
    )
    approval_ui_url: str = Field(
        "https://approvals.waooaw.com/approve", validation_alias=env_alias("APPROVAL_UI_URL")
    )
    # the platform's approvals API (PP: .../api/pp/approvals); unset: only the policy's data
    approvals_url: str | None = Field(None, validation_alias=env_alias("APPROVALS_URL"))
    approvals_timeout_s: float = Field(
        2.0, gt=0, validation_alias=env_alias("APPROVALS_TIMEOUT_S")
    )

    # --- counters (rate limit, trial quota, budget, revocation) -------------------------------
    redis_url: SecretStr | None = Field(None, validation_alias=env_alias("REDIS_URL"))
    redis_host: str | None = Field(None, validation_alias=env_alias("REDIS_HOST"))
    redis_port: int = Field(6379, validation_alias=env_alias("REDIS_PORT"))
    redis_password: SecretStr | None = Field(None, validation_alias=env_alias("REDIS_PASSWORD"))
    redis_key_prefix: str = Field("", validation_alias=env_alias("REDIS_KEY_PREFIX"))
    # true: the Redis URL/host is a startup node of a Redis Cluster (redis-py RedisCluster); the
    # keys are hash-tagged so the same Lua scripts and the one-pipeline batch run unchanged
    redis_cluster: bool = Field(False, validation_alias=env_alias("REDIS_CLUSTER"))
    redis_timeout_s: float = Field(
        0.5, gt=0, validation_alias=env_alias("REDIS_TIMEOUT_S"),
        description="timeout of one Redis round trip; past it the fail mode applies",
    )
    rate_tiers: dict[str, RateTier] = Field(
        default_factory=default_tiers, validation_alias=env_alias("RATE_TIERS")
    )
    trial_daily_tasks: int = Field(10, ge=0, validation_alias=env_alias("TRIAL_DAILY_TASKS"))
    rate_limit_fail_mode: FailMode = Field(
        "closed", validation_alias=env_alias("RATE_LIMIT_FAIL_MODE")
    )
    budget_fail_mode: FailMode = Field("closed", validation_alias=env_alias("BUDGET_FAIL_MODE"))

    # --- budget --------------------------------------------------------------------------
    agent_daily_budget_usd: float = Field(
        1.0, gt=0, validation_alias=env_alias("AGENT_DAILY_BUDGET_USD")
    )
    platform_monthly_budget_usd: float = Field(
        100.0, gt=0, validation_alias=env_alias("PLATFORM_MONTHLY_BUDGET_USD")
    )
    customer_monthly_budget_usd: float | None = Field(
        None, validation_alias=env_alias("CUSTOMER_MONTHLY_BUDGET_USD")
    )
    # a flat price per call is opt-in: by default only real cost is charged (the verified
    # metering envelope before forwarding, the backend's cost header after it)
    cost_per_request_usd: float = Field(
        0.0, ge=0, validation_alias=env_alias("COST_PER_REQUEST_USD")
    )
    metering_envelope_secret: SecretStr | None = Field(
        None, validation_alias=env_alias("METERING_ENVELOPE_SECRET")
    )
    metering_envelope_ttl_s: float = Field(
        300, gt=0, validation_alias=env_alias("METERING_ENVELOPE_TTL_SECONDS")
    )
    cost_response_header: str = Field(
        "X-Plant-Cost-USD", validation_alias=env_alias("COST_RESPONSE_HEADER")
    )
    budget_alert_thresholds: list[float] = Field(
        default_factory=lambda: [0.80, 0.95, 1.00],
        validation_alias=env_alias("BUDGET_ALERT_THRESHOLDS"),
    )
    critical_agents: CommaList = Field(
        default_factory=list, validation_alias=env_alias("CRITICAL_AGENTS")
    )

    # --- audit ---------------------------------------------------------------------------
    database_url: SecretStr | None = Field(None, validation_alias=env_alias("DATABASE_URL"))
    cloud_sql_connection_name: str | None = Field(
        None, validation_alias=env_alias("CLOUD_SQL_CONNECTION_NAME")
    )
    audit_retention_days: int = Field(90, gt=0, validation_alias=env_alias("AUDIT_RETENTION_DAYS"))
    audit_batch_size: int = Field(500, gt=0, validation_alias=env_alias("AUDIT_BATCH_SIZE"))
    # small, frequent COPYs: a 2,000-row batch every 0.5 s made PostgreSQL burn ~50 ms of CPU
    # at once and, sharing the cores, pushed the gateway's p99 from 5 to 20 ms (bench, 2k req/s)
    audit_flush_interval_s: float = Field(
        0.05, gt=0, validation_alias=env_alias("AUDIT_FLUSH_INTERVAL_S")
    )
    audit_queue_max: int = Field(100_000, gt=0, validation_alias=env_alias("AUDIT_QUEUE_MAX"))
    audit_body_cap_bytes: int = Field(
        8192, ge=0, validation_alias=env_alias("AUDIT_BODY_CAP_BYTES")
    )
    audit_capture_response_body: bool = Field(
        False, validation_alias=env_alias("AUDIT_CAPTURE_RESPONSE_BODY")
    )
    # When a row can be neither queued nor spooled: refuse the request (503 audit-unavailable,
    # the default: no request without its row) or serve it and count the row lost.
    audit_on_loss: Literal["refuse", "serve"] = Field(
        "refuse", validation_alias=env_alias("AUDIT_ON_LOSS")
    )
    # Cap of the disk spool, per worker process. 64 MiB holds 45,000-90,000 rows (0.7-1.5 KiB
    # each): 8-15 minutes of a database outage at 100 req/s. On Cloud Run the file system is
    # memory counted against the instance's 512 MiB: the gateway's ~120 MiB (RSS measured
    # under load), a full queue (100,000 rows, ~70-150 MiB) and 64 MiB of spool stay under
    # ~340 MiB, whereas a spool allowed to fill the memory would get the instance killed, and
    # every spooled row with it (refusing requests is the better failure).
    audit_spool_max_bytes: int = Field(
        64 * 1024 * 1024, ge=64 * 1024, validation_alias=env_alias("AUDIT_SPOOL_MAX_BYTES")
    )
    # Chain checkpoints (``audit/checkpoints``): the last stored row of each chain,
    # recorded outside the audit table so ``audit verify`` sees a truncated or re-hashed tail
    # and a chain that ended without a clean close. Every 5 s a busy instance adds one small
    # row (~17,000 a day at most; an idle one is marked every 30 s), dropped with its rows.
    audit_checkpoint_interval_s: float = Field(
        5.0, gt=0, le=3600, validation_alias=env_alias("AUDIT_CHECKPOINT_INTERVAL_S")
    )
    audit_checkpoint_rows: int = Field(
        10_000, gt=0, validation_alias=env_alias("AUDIT_CHECKPOINT_ROWS")
    )
    # The secret the checkpoints' MACs are keyed from (per chain). Unset: the gateway runs and
    # writes unsigned checkpoints, with one warning at start (see README "Audit durability").
    audit_chain_key: SecretStr | None = Field(
        None, validation_alias=env_alias("AUDIT_CHAIN_KEY")
    )
    # The deployment's Redis as the first spool (it outlives a Cloud Run instance; the disk
    # spool is then the fallback): auto = whenever REDIS_URL/REDIS_HOST names a real Redis (not
    # the embedded one `serve` starts), on = required, off = never (audit/spool_redis).
    audit_redis_spool: Literal["auto", "on", "off"] = Field(
        "auto", validation_alias=env_alias("AUDIT_REDIS_SPOOL")
    )
    # Caps of the Redis spool, all instances together: it shares the Redis with the rate-limit
    # keys. ~1.2 KiB of Redis memory per row measured: 100,000 rows ≈ 120-140 MiB, under 15 %
    # of a 1 GB Memorystore (numbers in audit/spool_redis.py).
    audit_redis_spool_max_rows: int = Field(
        100_000, gt=0, validation_alias=env_alias("AUDIT_REDIS_SPOOL_MAX_ROWS")
    )
    audit_redis_spool_max_bytes: int = Field(
        128 * 1024 * 1024, ge=64 * 1024, validation_alias=env_alias("AUDIT_REDIS_SPOOL_MAX_BYTES")
    )

    # --- feature flags -------------------------------------------------------------------
    launchdarkly_sdk_key: SecretStr | None = Field(
        None, validation_alias=env_alias("LAUNCHDARKLY_SDK_KEY")
    )
    flags_file: Path | None = Field(None, validation_alias=env_alias("FLAGS_FILE"))

    # --- observability (README → Observability) -------------------------------------------
    # 1.0: a line for every request, like Cloud Run's own request log; the line costs a few
    # µs of CPU (README → Observability), and 5xx answers are logged at any rate
    request_log_sample_rate: float = Field(
        1.0, ge=0, le=1, validation_alias=env_alias("REQUEST_LOG_SAMPLE_RATE")
    )
    # Cloud Logging links a line to its trace only as projects/<id>/traces/<trace>; Cloud Run
    # does not set this variable: set it in the service's environment
    google_cloud_project: str | None = Field(
        None, validation_alias=env_alias("GOOGLE_CLOUD_PROJECT")
    )
    # 0: tracing off, no OpenTelemetry object is built; else the share of new traces recorded
    # (parent-based: a caller's sampled traceparent is recorded, an unsampled one is not)
    trace_sample_rate: float = Field(
        0.0, ge=0, le=1, validation_alias=env_alias("TRACE_SAMPLE_RATE")
    )
    otel_exporter_otlp_endpoint: str = Field(
        "http://127.0.0.1:4318", validation_alias=env_alias("OTEL_EXPORTER_OTLP_ENDPOINT"),
        description="OTLP/HTTP collector; spans go to <endpoint>/v1/traces",
    )
    otel_service_name: str = Field(
        "plant-gateway", validation_alias=env_alias("OTEL_SERVICE_NAME")
    )
    # route labels of the metrics: the first pattern a path matches (routing syntax, no methods
    # or '!'), "other" when none does; never the path itself (clients choose paths)
    metrics_routes: CommaList = Field(
        default_factory=lambda: list(DEFAULT_METRICS_ROUTES),
        validation_alias=env_alias("METRICS_ROUTES"),
    )

    # --- validation ----------------------------------------------------------------------
    @field_validator("gateway_type", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator(
        "jwt_algorithms", "jwt_issuers", "cors_origins", "public_routes", "guards",
        "brute_force_routes", "service_key_routes", "critical_agents", "opa_packages",
        "metrics_routes", mode="before",
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except ValueError:
                return value
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        allowed = {"RS256", "RS384", "RS512", "ES256", "ES384", "HS256", "HS384", "HS512"}
        bad = [alg for alg in value if alg not in allowed]
        if bad:
            raise ValueError(f"unsupported algorithm(s) {bad}; allowed: {sorted(allowed)}")
        return value

    @field_validator("public_routes", "brute_force_routes", "service_key_routes")
    @classmethod
    def _route_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            routing.parse(pattern)  # ValueError names the bad pattern
        return value

    @field_validator("metrics_routes")
    @classmethod
    def _metrics_routes(cls, value: list[str]) -> list[str]:
        for text in value:
            pattern = routing.parse(text)  # ValueError names the bad pattern
            if pattern.methods is not None or pattern.excluded:
                raise ValueError(f"route {text!r}: a metrics route takes no methods or '!'")
        if len(value) > MAX_METRICS_ROUTES:
            raise ValueError(f"at most {MAX_METRICS_ROUTES} patterns (each is a label value)")
        return value

    @field_validator("guards")
    @classmethod
    def _known_guards(cls, value: list[str]) -> list[str]:
        known = known_guards()
        bad = [g for g in value if g not in known]
        if bad:
            raise ValueError(f"unknown guard(s) {bad}; known: {list(known)}")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard(cls, value: list[str]) -> list[str]:
        if "*" in value:
            raise ValueError("'*' is not allowed: list the allowed origins explicitly")
        return value

    @field_validator(
        "plant_backend_url", "plant_sandbox_url", "opa_service_url", "jwt_jwks_url",
        "approvals_url", "otel_exporter_otlp_endpoint",
    )
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        if value is not None:
            _check_host_and_port(value, "an http:// or https:// URL with a host")
        return value.rstrip("/") if value else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        url = value.get_secret_value().strip() if value is not None else ""
        if not url:
            return None  # set but empty: unset
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        _check_host_and_port(url, "a redis://host:port/db URL")
        return SecretStr(url)

    @field_validator("audit_chain_key")
    @classmethod
    def _chain_key(cls, value: SecretStr | None) -> SecretStr | None:
        """A short key could be guessed offline from one checkpoint and its MAC."""
        key = value.get_secret_value().strip() if value is not None else ""
        if not key:
            return None
        if len(key) < 32:
            raise ValueError("must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        return SecretStr(key)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        url = value.get_secret_value().strip() if value is not None else ""
        return SecretStr(postgres_dsn(url)) if url else None

    # --- derived -------------------------------------------------------------------------
    @property
    def audit_flush_s(self) -> float:
        """The end of the shutdown grace kept for the audit flush (queue to the table or spool)."""
        return min(3.0, self.shutdown_grace_s / 2)

    @property
    def connection_drain_s(self) -> float:
        """The start of the shutdown grace: in-flight requests finish, then are cancelled."""
        return self.shutdown_grace_s - self.audit_flush_s

    @property
    def sandbox_url(self) -> str:
        return self.plant_sandbox_url or self.plant_backend_url

    @property
    def bundle_decision_path(self) -> str:
        """Our bundle's entry point (in-process, or on a remote OPA that loaded the bundle)."""
        return (self.opa_decision_path or BUNDLE_DECISION_PATH).strip("/")

    @property
    def opa_id_token(self) -> bool:
        if self.opa_use_id_token is not None:
            return self.opa_use_id_token
        return self.cloud_run_service is not None

    @cached_property
    def effective_redis_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url.get_secret_value()
        if self.redis_host:
            auth = f":{self.redis_password.get_secret_value()}@" if self.redis_password else ""
            return f"redis://{auth}{self.redis_host}:{self.redis_port}/0"
        return None

    # the guards' own settings sections (``GuardSettings``), each parsed once (``section``)
    _sections: dict[type[Any], Any] = PrivateAttr(default_factory=dict)

    def guard_on(self, name: str) -> bool:
        return name in self.guards

    def section(self, model: type[SectionT]) -> SectionT:
        """A guard's own settings, read from the same sources as these, once.

        ``load_settings`` reads every registered section up front, so a bad value stops
        start-up with one line like any other setting.
        """
        found = self._sections.get(model)
        if found is None:
            found = self._sections[model] = model()
        return found  # type: ignore[no-any-return]


class GuardSettings(SettingsSources):
    """The base of a guard's own settings: a guard added later declares its variables itself.

    Read like ``Settings`` (environment names win over the ``PLANT_CONFIG`` file), once per
    ``Settings`` (``Settings.section``); its keys are valid in the config file.
    """


SectionT = TypeVar("SectionT", bound=GuardSettings)


def guard_sections() -> tuple[type[GuardSettings], ...]:
    """The settings sections the registered guards declare."""
    from plant_gateway.pipeline.registry import sections

    return sections()


class SettingsError(Exception):
    """A bad configuration, reduced to one line naming the setting."""


# SQLAlchemy driver forms (the Plant backend's DATABASE_URL) are the same server for asyncpg
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg2")


def postgres_dsn(url: str) -> str:
    """``url`` as a libpq/asyncpg DSN (``postgresql://``); ValueError naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in POSTGRES_SCHEMES:
        raise ValueError("must be a postgresql:// URL (postgresql://user:password@host:5432/db)")
    _check_host_and_port(url, "a postgresql://user:password@host:5432/db URL")
    return f"postgresql://{rest}"


def _check_host_and_port(url: str, expected: str) -> None:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - parsing it raises on a port that is not a number
    except ValueError:
        raise ValueError(f"has an invalid port: expected {expected}") from None
    if parts.scheme.startswith("http") and not parts.hostname:
        raise ValueError(f"has no host: expected {expected}")


def config_keys() -> dict[str, str]:
    """Every key a PLANT_CONFIG file may hold (lower case) -> the setting's name."""
    keys: dict[str, str] = {}
    models: tuple[type[BaseSettings], ...] = (Settings, *guard_sections())
    for model in models:
        for name, field in model.model_fields.items():
            keys[name] = name
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                keys.update({str(choice).lower(): name for choice in alias.choices})
    return keys


def read_config_file(path: str) -> dict[str, Any]:
    """The YAML mapping of a PLANT_CONFIG file, checked: it parses and every key is known."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"PLANT_CONFIG: cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SettingsError(f"PLANT_CONFIG: {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(
            f"PLANT_CONFIG: {path} must be a mapping of setting names to values, "
            f"not a {type(data).__name__}"
        )
    known = config_keys()
    for key in data:
        if str(key).lower() not in known:
            close = difflib.get_close_matches(str(key).lower(), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(f"PLANT_CONFIG: unknown key {key!r} in {path}{hint}")
    return data


def load_settings(**overrides: Any) -> Settings:
    """Read and validate settings once; raise SettingsError with one clear line."""
    config_file = os.environ.get("PLANT_CONFIG")
    if config_file and not Path(config_file).is_file():
        raise SettingsError(f"PLANT_CONFIG: config file {config_file!r} does not exist")
    if config_file:
        read_config_file(config_file)
    settings = _parsed(Settings, lambda: Settings(**overrides))
    for model in guard_sections():
        _parsed(model, lambda model=model: settings.section(model))  # type: ignore[misc]
    _check_consistency(settings)
    return settings


ParsedT = TypeVar("ParsedT")


def _parsed(model: type[BaseSettings], parse: Callable[[], ParsedT]) -> ParsedT:
    """``parse()`` of ``model``, its failure reduced to a SettingsError naming the setting."""
    try:
        return parse()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "is required but not set"
        raise SettingsError(f"{name}: {message}") from None
    except pydantic_settings.SettingsError as exc:  # a value that is not valid JSON
        match = re.search(r'field "(\w+)"', str(exc))
        name = _variable(model, match.group(1)) if match else "settings"
        raise SettingsError(f"{name}: not a valid value (expected JSON)") from None


def _variable(model: type[BaseSettings], field_name: str) -> str:
    """The environment variable of ``model``'s field (its first alias), upper case."""
    field = model.model_fields.get(field_name)
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, AliasChoices) and alias.choices:
        return str(alias.choices[0]).upper()
    return field_name.upper()


def _check_consistency(settings: Settings) -> None:
    if settings.admin_port and settings.admin_port == settings.port:
        raise SettingsError(
            f"ADMIN_PORT: {settings.admin_port} is also PORT; choose another port, or 0 to serve "
            "/metrics and /ready on PORT"
        )
    if settings.guard_on("auth"):
        has_key = settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_url
        if not has_key:
            raise SettingsError(
                "JWT_SECRET: authentication is on but none of JWT_SECRET, JWT_PUBLIC_KEY, "
                "JWT_JWKS_URL is set"
            )
        if settings.jwt_secret and len(settings.jwt_secret.get_secret_value()) < 32:
            raise SettingsError("JWT_SECRET: must be at least 32 characters long")
