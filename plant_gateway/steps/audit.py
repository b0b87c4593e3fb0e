"""The audit step: turns every finished RequestContext into exactly one redacted, hash-chained row.

The core app calls ``AuditRecorder.record(ctx)`` in ``finally`` for every request except the
probe routes; it is synchronous, never raises and never waits for the database.

Decisions (documented in the README):
- ``enable_audit_logging`` cannot switch auditing off (one row per request is non-negotiable);
  when the flag is off for a request the row is written without headers and bodies
  (metadata only). Only the operator setting ``PLANT_GUARDS`` (without ``audit``) removes the
  step, which ``/ready`` and the startup log then show.
- A user id that is not a UUID is stored as NULL in ``user_id`` and verbatim in ``user_ref``
  (RLS ``user_own_logs`` matches either); other id columns that are not UUIDs (correlation,
  causation, request) get a deterministic uuid5 so the row stays insertable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from plant_gateway.backends.audit_schema import (
    GENESIS,
    NAMES,
    canonical,
    dump_json,
    load_json,
)

if TYPE_CHECKING:
    from plant_gateway.backends.base import AuditSink
    from plant_gateway.context import RequestContext
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

log = logging.getLogger("plant_gateway.audit")

ID_NAMESPACE = uuid.UUID("6f1c3b52-52f4-4c55-9d1e-7b0f6c1d2a90")
MASK = "***"
REDACTED_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
    "x-cp-registration-key", "x-original-authorization", "x-governor-approval",
    "x-approval-token", "x-csrf-token", "x-xsrf-token", "x-amz-security-token",
    "x-goog-iap-jwt-assertion", "x-serverless-authorization",
})
HEADER_WORDS = ("auth", "token", "secret", "key", "cookie", "password", "signature", "session")
SENSITIVE_WORDS = frozenset({
    "password", "passwd", "pwd", "passcode", "passphrase", "token", "secret", "otp", "totp",
    "card", "cardnumber", "cvv", "cvc", "cvv2", "pan", "pin", "iban", "ssn", "apikey",
    "authorization", "cookie", "signature", "credential", "credentials", "privatekey",
})
CODE_WORDS = frozenset({
    "otp", "verification", "verify", "auth", "security", "sms", "mfa", "totp", "access",
    "recovery", "backup", "one", "login", "confirmation", "reset", "pin",
})
PAIR_WORDS = (("account", "number"), ("account", "no"), ("account", "num"), ("routing", "number"),
              ("registration", "key"), ("api", "key"), ("private", "key"), ("client", "secret"),
              ("sort", "code"), ("bank", "account"), ("acct", "number"), ("acct", "no"))
JWT_RE = re.compile(r"eyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]*")
DIGITS_RE = re.compile(r"(?:\d[ -]?){13,19}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_FULL = UUID_RE.fullmatch
TEXT_CAP = 2000
HEADER_CACHE_MAX = 2048


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


@lru_cache(maxsize=4096)
def sensitive_key(key: str) -> bool:
    words = _words(key)
    joined = "".join(words)
    if not words:
        return False
    if joined in SENSITIVE_WORDS or any(w in SENSITIVE_WORDS for w in words):
        return True
    if "code" in words and (len(words) == 1 or any(w in CODE_WORDS for w in words)):
        return True
    return any(a in words and b in words for a, b in PAIR_WORDS) or "accountnumber" in joined


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return MASK if 13 <= len(digits) <= 19 and _luhn(digits) else match.group(0)


def _mask_text(value: str, secrets_: tuple[str, ...]) -> str:
    """Mask known secrets, JWTs and card numbers in free text; the common case costs 2 scans."""
    for s in secrets_:
        if s and s in value:
            return MASK
    if "eyJ" in value:
        value = JWT_RE.sub(MASK, value)
    if DIGITS_RE.search(value) is not None:
        value = DIGITS_RE.sub(_card, value)
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def redact(value: Any, secrets_: tuple[str, ...] = (), depth: int = 0) -> Any:
    """Mask sensitive fields recursively (by key) and card numbers, JWTs, known keys (by value)."""
    if depth > 32:
        return MASK
    if isinstance(value, dict):
        return {
            str(k): MASK if sensitive_key(str(k)) else redact(v, secrets_, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, secrets_, depth + 1) for v in value]
    if isinstance(value, str):
        return _mask_text(value, secrets_)
    return value


def redact_headers(headers: Any, secrets_: tuple[str, ...]) -> dict[str, str] | None:
    items = headers.items() if isinstance(headers, dict) else headers
    out: dict[str, str] = {}
    for name, value in items:
        lname = str(name).lower()
        text = MASK if _hidden_header(lname) else _mask_text(str(value), secrets_)[:TEXT_CAP]
        out[lname] = f"{out[lname]}, {text}" if lname in out else text
    return out or None


@lru_cache(maxsize=1024)
def _hidden_header(lname: str) -> bool:
    return lname in REDACTED_HEADERS or any(w in lname for w in HEADER_WORDS)


def body_json(raw: bytes | None, cap: int, secrets_: tuple[str, ...]) -> Any:
    """The body as redacted JSON, or a small note when it is absent, too big or not JSON."""
    if not raw:
        return None
    if len(raw) > cap:
        return {"_omitted": "too_large", "_size": len(raw)}
    try:
        parsed = load_json(raw)
    except (ValueError, UnicodeDecodeError):
        return {"_omitted": "not_json", "_size": len(raw)}
    return redact(parsed, secrets_)


def as_uuid(raw: str | None) -> str | None:
    """A UUID string, or a deterministic uuid5 of a non-UUID value (None stays None)."""
    if raw is None or raw == "":
        return None
    if len(raw) == 36 and UUID_RE.fullmatch(raw):  # the common case: ingress made it
        return raw
    try:
        return str(uuid.UUID(str(raw)))
    except ValueError:
        return str(uuid.uuid5(ID_NAMESPACE, str(raw)))


def strict_uuid(raw: str | None) -> str | None:
    if raw and len(raw) == 36 and UUID_RE.fullmatch(raw):
        return raw
    try:
        return str(uuid.UUID(str(raw))) if raw else None
    except ValueError:
        return None


def _text(value: Any, cap: int = TEXT_CAP) -> str | None:
    if value is None:
        return None
    if type(value) is str and len(value) <= cap and "\x00" not in value:
        return value  # the common case: no copy
    return str(value).replace("\x00", "\ufffd")[:cap]


def _ms(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 3) if value > 0.0 else 0.0


def _uuid_or_new(raw: str | None) -> str:
    if type(raw) is str and len(raw) == 36 and _UUID_FULL(raw):
        return raw
    return as_uuid(raw) or str(uuid.uuid4())


class AuditRecorder:
    """Builds rows, chains them (one chain per process) and hands them to the sink."""

    name = "audit"

    def __init__(self, settings: Settings, sink: AuditSink, flags: Any = None) -> None:
        self.settings = settings
        self.sink = sink
        self.flags = flags
        # one chain per process: workers of one gateway share settings.instance_id
        self.instance_id = f"{settings.instance_id}/{os.getpid()}-{secrets.token_hex(3)}"
        self.seq = 0
        self.prev_hash = GENESIS
        self.gateway_type = settings.gateway_type
        key = settings.cp_registration_key
        self.secret_values = (key.get_secret_value(),) if key is not None else ()
        # row ids: a random UUIDv4-shaped prefix per recorder + a counter (unique, cheap)
        self._id_prefix = str(uuid.uuid4())[:24]
        self._ids = 0
        self._header_cache: dict[tuple[tuple[str, str], ...], str | None] = {}
        self._query_cache: dict[str, str] = {}
        self._seen_names: set[str] = set()  # header names classified so far
        self._hidden_names: set[str] = set()  # ... and those among them that are redacted

    def record(self, ctx: RequestContext) -> None:
        try:
            row = self.build_row(ctx)
        except Exception:  # noqa: BLE001 - a bug here must never lose the row
            log.exception("audit: building the row failed; writing a minimal row")
            row = self.minimal_row(ctx)
        self.submit_chained(row)

    def submit_chained(self, row: dict[str, Any]) -> None:
        """Chain the row (jsonb values already serialised by ``build_row``) and queue it."""
        self.seq += 1
        row["instance_id"] = self.instance_id
        row["seq"] = self.seq
        row["prev_hash"] = self.prev_hash
        try:
            digest = hashlib.sha256(canonical(row)).hexdigest()
        except TypeError:  # a value orjson refuses (e.g. a lone surrogate): clean and retry
            _clean_row(row)
            digest = hashlib.sha256(canonical(row)).hexdigest()
        row["row_hash"] = self.prev_hash = digest
        self.sink.submit(row)

    def next_id(self) -> str:
        self._ids += 1
        return f"{self._id_prefix}{self._ids & 0xFFFFFFFFFFFF:012x}"

    def headers_json(self, headers: Any) -> str | None:
        """Redacted headers as jsonb text, memoised for repeated header sets (no secrets kept:
        the key is the redacted form for hidden headers)."""
        key = self._header_key(headers)
        try:
            cached = self._header_cache.get(key, _MISS)
        except TypeError:  # unhashable items (lists, not tuples): no memo
            return dump_json(redact_headers(key, self.secret_values))
        if cached is not _MISS:
            return cached  # type: ignore[return-value]
        text = dump_json(redact_headers(key, self.secret_values))
        if len(self._header_cache) >= HEADER_CACHE_MAX:
            self._header_cache.clear()
        self._header_cache[key] = text
        return text

    def _header_key(self, headers: Any) -> tuple[tuple[str, str], ...]:
        """The headers with hidden values replaced by the mask (set operations, no per-header
        Python work for a dict whose names were all seen before)."""
        if isinstance(headers, dict):
            names = headers.keys()
            if not self._seen_names.issuperset(names):
                self._classify(names)
            hidden = self._hidden_names.intersection(names)
            if not hidden:
                return tuple(headers.items())
            masked = dict(headers)
            for name in hidden:
                masked[name] = MASK
            return tuple(masked.items())
        listed = [n for n, _ in headers]
        if not self._seen_names.issuperset(listed):
            self._classify(listed)
        hidden_names = self._hidden_names
        if hidden_names.isdisjoint(listed):
            return tuple(headers)
        return tuple((n, MASK if n in hidden_names else v) for n, v in headers)

    def _classify(self, names: Any) -> None:
        if len(self._seen_names) > HEADER_CACHE_MAX:
            self._seen_names.clear()
            self._hidden_names.clear()
        for name in names:
            if name not in self._seen_names:
                if _hidden_header(str(name).lower()):
                    self._hidden_names.add(name)
                self._seen_names.add(name)

    def _detail_on(self, ctx: RequestContext) -> bool:
        if self.flags is None:
            return True
        try:
            return bool(self.flags.enabled("enable_audit_logging", ctx))
        except Exception:  # noqa: BLE001 - flag trouble never reduces the audit trail
            return True

    def build_row(self, ctx: RequestContext) -> dict[str, Any]:
        ident = ctx.identity
        detail = self._detail_on(ctx)
        status = ctx.status_code if ctx.status_code is not None else 500
        error_type = ctx.error_type
        if not 100 <= status <= 599:
            error_type = error_type or "invalid_upstream_status"
            status = 502
        if ctx.status_code is None and error_type is None:
            error_type = "no_response"
        secrets_ = self.secret_values
        row: dict[str, Any] = {
            "id": self.next_id(),
            "correlation_id": _uuid_or_new(ctx.correlation_id),
            "causation_id": as_uuid(ctx.causation_id) if ctx.causation_id else None,
            "timestamp": ctx.timestamp,
            "gateway_type": self.gateway_type,
            "request_id": as_uuid(ctx.request_id),
            "http_method": _text(ctx.method, 16),
            "endpoint": _text(ctx.path),
            "query_params": None,
            "request_headers": None,
            "request_body": None,
            "user_id": None,
            "customer_id": None,
            "email": None,
            "roles": None,
            "trial_mode": None,
            "opa_policies_evaluated": list(ctx.policies_evaluated) or None,
            "opa_decisions": dump_json(redact(ctx.policy_decision, secrets_))
            if ctx.policy_decision is not None else None,
            "opa_latency_ms": _ms(ctx.policy_latency_ms),
            "status_code": status,
            "response_headers": None,
            "response_body": None,
            "error_type": _text(error_type, 200),
            "error_message": _text(_mask_text(ctx.error_message, secrets_))
            if ctx.error_message else None,
            "total_latency_ms": _ms(ctx.elapsed_ms()) or 0.0,
            "plant_latency_ms": _ms(ctx.upstream_latency_ms),
            "action": _text(ctx.action, 100),
            "resource": _text(ctx.resource, 200),
            "resource_id": _text(ctx.resource_id, 255),
            "user_ref": None,
        }
        if ident is not None:
            row["user_id"] = strict_uuid(ident.user_id)
            row["customer_id"] = _text(ident.customer_id, 255)
            row["email"] = _text(ident.email, 320)
            row["roles"] = [_text(r, 100) for r in ident.roles] if ident.roles else None
            row["trial_mode"] = ident.trial_mode
            row["user_ref"] = _text(ident.user_id or ident.service_account, 255)
        if detail:
            self._add_detail(ctx, row)
        return row

    def _add_detail(self, ctx: RequestContext, row: dict[str, Any]) -> None:
        cap = self.settings.audit_body_cap_bytes
        if ctx.query_string:
            row["query_params"] = self.query_json(ctx.query_string)
        row["request_headers"] = self.headers_json(ctx.headers)
        body = ctx.request_body_sample or ctx.body
        source = ctx.scratch.get("body_source")
        if body is None and source is not None and source.received:
            sample = getattr(source, "sample", None)
            body = bytes(sample) if sample is not None else None
            if body is None:  # bigger than the sample cap
                row["request_body"] = dump_json({"_omitted": "too_large",
                                                 "_size": source.received})
        if body:
            row["request_body"] = dump_json(body_json(body, cap, self.secret_values))
        if ctx.response_headers:
            row["response_headers"] = self.headers_json(ctx.response_headers)
        if self.settings.audit_capture_response_body and ctx.response_body_sample:
            row["response_body"] = dump_json(
                body_json(ctx.response_body_sample, cap, self.secret_values)
            )

    def query_json(self, query_string: str) -> str | None:
        """Redacted query parameters as jsonb text, memoised only when nothing was masked
        (so no secret is ever kept in the memo)."""
        cached = self._query_cache.get(query_string)
        if cached is not None:
            return cached
        text = dump_json(self._query(query_string))
        if text is not None and MASK not in text and len(query_string) <= TEXT_CAP:
            if len(self._query_cache) >= HEADER_CACHE_MAX:
                self._query_cache.clear()
            self._query_cache[query_string] = text
        return text

    def _query(self, query_string: str) -> dict[str, Any] | None:
        if not query_string:
            return None
        parsed = parse_qs(query_string, keep_blank_values=True)
        flat = {k: v[0] if len(v) == 1 else v for k, v in parsed.items()}
        return redact(flat, self.secret_values)

    def minimal_row(self, ctx: Any) -> dict[str, Any]:
        status = getattr(ctx, "status_code", None)
        row: dict[str, Any] = dict.fromkeys(NAMES)
        row.update({
            "id": self.next_id(),
            "correlation_id": as_uuid(getattr(ctx, "correlation_id", None)) or str(uuid.uuid4()),
            "timestamp": datetime.now(UTC),
            "gateway_type": self.settings.gateway_type,
            "http_method": _text(getattr(ctx, "method", None), 16),
            "endpoint": _text(getattr(ctx, "path", None)),
            "status_code": status if isinstance(status, int) and 100 <= status <= 599 else 500,
            "error_type": "audit_row_error",
            "total_latency_ms": 0.0,
        })
        return row


_MISS = object()


def _clean_row(row: dict[str, Any]) -> None:
    """Replace lone surrogates in text columns (orjson, like PostgreSQL, refuses them)."""
    for name, value in row.items():
        if isinstance(value, str):
            row[name] = value.encode("utf-8", "replace").decode()
        elif isinstance(value, list):
            row[name] = [v.encode("utf-8", "replace").decode() if isinstance(v, str) else v
                         for v in value]


def build(settings: Settings, deps: Dependencies) -> AuditRecorder | None:
    """The recorder, or None when the operator removed ``audit`` from ``PLANT_GUARDS``."""
    if not settings.guard_on("audit") or deps.audit_sink is None:
        return None
    return AuditRecorder(settings, deps.audit_sink, deps.flags)
