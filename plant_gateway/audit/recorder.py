"""The audit recorder: every finished RequestContext becomes exactly one redacted, hash-chained row.

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
from operator import itemgetter
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from orjson import Fragment
from orjson import dumps as dumps

from plant_gateway.audit.schema import (
    GENESIS,
    HASHED,
    JSONB,
    NAMES,
    NEWLINE,
    TAB,
    dump_json,
    from_content,
    iso,
    load_json,
)
from plant_gateway.json_limits import MAX_DEPTH as MAX_JSON_DEPTH
from plant_gateway.json_limits import too_deep
from plant_gateway.memo import BoundedMemo
from plant_gateway.pipeline.identity import CACHED_IDENTITY
from plant_gateway.redaction import MASK, redact, sensitive_key
from plant_gateway.redaction import mask_text as _mask_text

if TYPE_CHECKING:
    from plant_gateway.backends.base import RowSink
    from plant_gateway.context import Identity, RequestContext
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

log = logging.getLogger("plant_gateway.audit")

ID_NAMESPACE = uuid.UUID("6f1c3b52-52f4-4c55-9d1e-7b0f6c1d2a90")
REDACTED_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
    "x-cp-registration-key", "x-original-authorization", "x-governor-approval",
    "x-approval-token", "x-csrf-token", "x-xsrf-token", "x-amz-security-token",
    "x-goog-iap-jwt-assertion", "x-serverless-authorization",
})
HEADER_WORDS = ("auth", "token", "secret", "key", "cookie", "password", "signature", "session")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_FULL = UUID_RE.fullmatch
_TWO_UUIDS = re.compile(UUID_RE.pattern * 2).fullmatch
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
TEXT_CAP = 2000
HEADER_CACHE_MAX = 2048


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
    return lname in REDACTED_HEADERS or any(w in lname for w in HEADER_WORDS) \
        or sensitive_key(lname)


def body_json(
    raw: bytes | None, cap: int, secrets_: tuple[str, ...], max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """The body as redacted JSON, or a small note when it is absent, too big, too deeply
    nested (a parser would recurse past Python's limit) or not JSON."""
    if not raw:
        return None
    if len(raw) > cap:
        return {"_omitted": "too_large", "_size": len(raw)}
    if too_deep(raw, max_depth):
        return {"_omitted": "too_deep", "_size": len(raw)}
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
    """Milliseconds rounded to the microsecond, never negative (NaN counts as 0)."""
    if value is None:
        return None
    if value.__class__ is not float:
        value = float(value)
    if 0.0 < value < 1e12:
        return int(value * 1000.0 + 0.5) / 1000.0  # round(value, 3) costs 4 times as much
    return value if value > 0.0 else 0.0


def _uuid_or_new(raw: str | None) -> str:
    if type(raw) is str and len(raw) == 36 and _UUID_FULL(raw):
        return raw
    return as_uuid(raw) or str(uuid.uuid4())


class AuditRecorder:
    """Builds rows, chains them (one chain per process) and hands them to the sink as lines.

    A row is built straight into its canonical form (a list in column order, jsonb values as
    ready-made ``orjson.Fragment`` s), serialised once, hashed, and queued as bytes: no dict,
    no second encoding in the writer, nothing the garbage collector has to walk.
    """

    name = "audit"

    def __init__(self, settings: Settings, sink: RowSink, flags: Any = None) -> None:
        self.settings = settings
        self.sink = sink
        self.flags = flags
        # one chain per process: workers of one gateway share settings.instance_id
        self.instance_id = f"{settings.instance_id}/{os.getpid()}-{secrets.token_hex(3)}"
        self.seq = 0
        self.prev_hash = GENESIS
        register = getattr(sink, "register_chain", None)
        if register is not None:  # the sink ends the chain with a close mark at shutdown
            register(self)
        self.gateway_type = settings.gateway_type
        key = settings.cp_registration_key
        self.secret_values = (key.get_secret_value(),) if key is not None else ()
        self.body_cap = settings.audit_body_cap_bytes
        self.max_json_depth = settings.max_json_depth
        self.capture_response_body = settings.audit_capture_response_body
        # row ids: a random UUIDv4-shaped prefix per recorder + a counter (unique, cheap)
        self._id_prefix = str(uuid.uuid4())[:24]
        self._ids = 0
        self._header_cache: BoundedMemo[tuple[tuple[str, str], ...], Fragment | None] = (
            BoundedMemo(HEADER_CACHE_MAX)
        )
        # header lists (as tuples of pairs) with no hidden header -> the same Fragment
        self._open_header_cache: BoundedMemo[tuple[Any, ...], Fragment | None] = BoundedMemo(
            HEADER_CACHE_MAX
        )
        self._query_cache: BoundedMemo[str, Fragment] = BoundedMemo(HEADER_CACHE_MAX)
        # header name tuple -> itemgetter of its visible values (see ``_header_key``)
        self._plans: BoundedMemo[tuple[Any, ...], Any] = BoundedMemo(HEADER_CACHE_MAX)
        # id(shared Identity) -> (that Identity, its columns): see ``_identity_values``
        self._identity_cache: BoundedMemo[int, tuple[Identity, tuple[Any, ...]]] = BoundedMemo(
            HEADER_CACHE_MAX
        )

    def record(self, ctx: RequestContext) -> None:
        try:
            values = self.build_values(ctx)
        except Exception:  # noqa: BLE001 - a bug here must never lose the row
            log.exception("audit: building the row failed; writing a minimal row")
            values = self.minimal_values(ctx)
        self.submit_chained(values)

    def submit_chained(self, values: list[Any]) -> None:
        """Chain the row (every column but the chain's, in table order) and queue its line."""
        self.seq += 1
        values += (self.instance_id, self.seq, self.prev_hash)
        try:
            content = dumps(values)
        except TypeError:  # a value orjson refuses (e.g. a lone surrogate): clean and retry
            content = dumps(_cleaned(values))
        digest = hashlib.sha256(content).hexdigest()
        self.prev_hash = digest
        self.sink.submit(b"".join((content, TAB, digest.encode(), NEWLINE)))

    def submit_row(self, row: dict[str, Any]) -> None:
        """Chain and queue a row given as a dict (jsonb values as text): tools and tests."""
        values = [row.get(name) for name in HASHED[:-3]]
        for i in _JSONB_AT:
            if values[i] is not None:
                values[i] = Fragment(str(values[i]))
        self.submit_chained(values)

    def next_id(self) -> str:
        self._ids += 1
        return f"{self._id_prefix}{self._ids & 0xFFFFFFFFFFFF:012x}"

    def headers_json(self, headers: Any) -> Fragment | None:
        """Redacted headers as jsonb text, memoised for repeated header sets (no secrets kept:
        the key is the redacted form for hidden headers)."""
        pairs = None
        try:
            if headers.__class__ is list:  # response headers: often none hidden
                pairs = tuple(headers)
                cached = self._open_header_cache.data.get(pairs, _MISS)
                if cached is not _MISS:
                    return cached  # type: ignore[return-value]
            key = self._header_key(headers)
            cached = self._header_cache.data.get(key, _MISS)
        except TypeError:  # unhashable names or items (lists, not tuples): no memo
            return _fragment(dump_json(redact_headers(headers, self.secret_values)))
        if cached is not _MISS:
            return cached  # type: ignore[return-value]
        text = _fragment(dump_json(redact_headers(headers, self.secret_values)))
        self._header_cache.put(key, text)
        if pairs is not None and _all_visible(pairs):
            self._open_header_cache.put(pairs, text)
        return text

    def _header_key(self, headers: Any) -> tuple[Any, ...]:
        """The headers with hidden values left out: their names plus the visible values
        (one C-level itemgetter call once the name tuple was seen)."""
        if isinstance(headers, dict):
            names = tuple(headers)
        else:
            if type(headers) is not list:
                headers = list(headers)
            names = tuple(map(_FIRST, headers))
        plan = self._plans.data.get(names, _MISS)
        if plan is _MISS:
            plan = self._plan(names, isinstance(headers, dict))
        if plan is None:
            return names
        return names, plan(headers)  # type: ignore[operator]

    def _plan(self, names: tuple[Any, ...], by_name: bool) -> Any:
        """An itemgetter of the visible headers' values (by name for a dict, by position for
        a list of pairs), or None when every header is hidden."""
        self._plans.make_room()
        visible = [name if by_name else i for i, name in enumerate(names)
                   if not _hidden_header(str(name).lower())]
        plan = itemgetter(*visible) if visible else None
        self._plans.data[names] = plan  # room was made above
        return plan

    def _detail_on(self, ctx: RequestContext) -> bool:
        if self.flags is None:
            return True
        try:
            return bool(self.flags.enabled("enable_audit_logging", ctx))
        except Exception:  # noqa: BLE001 - flag trouble never reduces the audit trail
            return True

    def build_values(self, ctx: RequestContext) -> list[Any]:
        """The row's columns from ``id`` to ``user_ref`` in table order (see ``COLUMNS``).

        The common case is inlined (no helper calls for plain values): this runs on every
        request, and each Python call costs about as much as the check it would make.
        """
        status = ctx.status_code
        error_type = ctx.error_type
        if status is None:
            status = 500
            error_type = error_type or "no_response"
        elif not 100 <= status <= 599:
            error_type = error_type or "invalid_upstream_status"
            status = 502
        ts: datetime | str = ctx.timestamp
        if type(ts) is not datetime or ts.tzinfo is not UTC or not ts.microsecond:
            ts = iso(ts)  # orjson prints exactly ``iso`` for the common case, not for these
        self._ids = ids = self._ids + 1
        # ingress hands over canonical UUIDs: one regex checks both, convert only odd ones
        cid: str = ctx.correlation_id
        rid: str | None = ctx.request_id
        if not (cid.__class__ is str and rid.__class__ is str and len(cid) == 36
                and _TWO_UUIDS(cid + rid)):  # type: ignore[operator]
            if not (cid.__class__ is str and len(cid) == 36 and _UUID_FULL(cid)):
                cid = _uuid_or_new(cid)
            if not (rid.__class__ is str and len(rid) == 36 and _UUID_FULL(rid)):
                rid = as_uuid(rid)
        method = ctx.method
        if method.__class__ is not str or method not in _METHODS:  # else: already short, plain
            method = _text(method, 16)  # type: ignore[assignment]
        path = ctx.path
        if not (path.__class__ is str and len(path) <= TEXT_CAP and "\x00" not in path):
            path = _text(path)  # type: ignore[assignment]
        elapsed = ctx.elapsed_ms()
        if elapsed.__class__ is float and 0.0 < elapsed < 1e12:
            elapsed = int(elapsed * 1000.0 + 0.5) / 1000.0
        else:
            elapsed = _ms(elapsed) or 0.0
        values = [
            f"{self._id_prefix}{ids & 0xFFFFFFFFFFFF:012x}",
            cid,
            None if not ctx.causation_id else as_uuid(ctx.causation_id),
            ts,
            self.gateway_type,
            rid,
            method,
            path,
            None,  # query_params
            None,  # request_headers
            None,  # request_body
            None,  # user_id
            None,  # customer_id
            None,  # email
            None,  # roles
            None,  # trial_mode
            None,  # opa_policies_evaluated
            None,  # opa_decisions
            None,  # opa_latency_ms
            status,
            None,  # response_headers
            None,  # response_body
            None if error_type is None else _text(error_type, 200),
            None,  # error_message
            elapsed,
            _upstream_ms(ctx.upstream_latency_ms),
            None,  # action
            None,  # resource
            None,  # resource_id
            None,  # user_ref
        ]
        if ctx.policies_evaluated or ctx.policy_decision is not None \
                or ctx.policy_latency_ms is not None or ctx.error_message:
            self._add_policy(ctx, values)
        if ctx.action is not None or ctx.resource is not None or ctx.resource_id is not None:
            values[26] = None if ctx.action is None else _text(ctx.action, 100)
            values[27] = None if ctx.resource is None else _text(ctx.resource, 200)
            values[28] = None if ctx.resource_id is None else _text(ctx.resource_id, 255)
        ident = ctx.identity
        if ident is not None:
            (values[11], values[12], values[13], values[14], values[15],
             values[29]) = self._identity_values(ctx, ident)
        if self.flags is None or self._detail_on(ctx):
            self._add_detail(ctx, values)
        return values

    def _add_policy(self, ctx: RequestContext, values: list[Any]) -> None:
        decision = ctx.policy_decision
        if ctx.policies_evaluated:
            values[16] = _texts(ctx.policies_evaluated, TEXT_CAP)
        if decision is not None:
            values[17] = _fragment(dump_json(redact(decision, self.secret_values)))
        if ctx.policy_latency_ms is not None:
            values[18] = _ms(ctx.policy_latency_ms)
        if ctx.error_message:
            values[23] = _text(_mask_text(ctx.error_message, self.secret_values))

    def _identity_values(self, ctx: RequestContext, ident: Identity) -> tuple[Any, ...]:
        """user_id, customer_id, email, roles, trial_mode and user_ref of an identity, worked
        out once per verified token when ``ctx.identity`` is an untouched copy of the claims
        cache's Identity (``auth.cached_identity``: one object per token, never mutated)."""
        found = ctx.scratch.get(CACHED_IDENTITY)
        if found is None or found[0] is not ident:
            return _identity_columns(ident)
        shared = found[1]
        entry = self._identity_cache.data.get(id(shared))
        if entry is not None and entry[0] is shared:
            return entry[1]  # type: ignore[no-any-return]
        columns = _identity_columns(shared)
        self._identity_cache.put(id(shared), (shared, columns))  # holds it: no id() reuse
        return columns

    def build_row(self, ctx: RequestContext) -> dict[str, Any]:
        """The row as a dict (jsonb values as text), without the chain columns: tools, tests."""
        values = self.build_values(ctx)
        row = from_content(dumps(values + [None, None, None]))
        for name in ("instance_id", "seq", "prev_hash"):
            del row[name]
        return row

    def _add_detail(self, ctx: RequestContext, values: list[Any]) -> None:
        if ctx.query_string:
            values[8] = self.query_json(ctx.query_string)
        values[9] = self.headers_json(ctx.headers)
        body = ctx.request_body_sample or ctx.body
        if body is None:
            source = ctx.scratch.get("body_source")
            if source is not None and source.received:
                sample = getattr(source, "sample", None)
                body = bytes(sample) if sample is not None else None
                if body is None:  # bigger than the sample cap
                    values[10] = _fragment(dump_json({"_omitted": "too_large",
                                                      "_size": source.received}))
        if body:
            values[10] = _fragment(dump_json(body_json(body, self.body_cap, self.secret_values,
                                                       self.max_json_depth)))
        if ctx.response_headers:
            values[20] = self.headers_json(ctx.response_headers)
        if self.capture_response_body and ctx.response_body_sample:
            values[21] = _fragment(dump_json(
                body_json(ctx.response_body_sample, self.body_cap, self.secret_values,
                          self.max_json_depth)
            ))

    def query_json(self, query_string: str) -> Fragment | None:
        """Redacted query parameters as jsonb text, memoised only when nothing was masked
        (so no secret is ever kept in the memo)."""
        cached = self._query_cache.data.get(query_string)
        if cached is not None:
            return cached
        text = dump_json(self._query(query_string))
        if text is None:
            return None
        fragment = Fragment(text)
        if MASK not in text and len(query_string) <= TEXT_CAP:
            self._query_cache.put(query_string, fragment)
        return fragment

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
            "timestamp": iso(datetime.now(UTC)),
            "gateway_type": self.settings.gateway_type,
            "http_method": _text(getattr(ctx, "method", None), 16),
            "endpoint": _text(getattr(ctx, "path", None)),
            "status_code": status if isinstance(status, int) and 100 <= status <= 599 else 500,
            "error_type": "audit_row_error",
            "total_latency_ms": 0.0,
        })
        return row

    def minimal_values(self, ctx: Any) -> list[Any]:
        row = self.minimal_row(ctx)
        return [row[name] for name in HASHED[:-3]]


_MISS = object()
_FIRST = itemgetter(0)
_JSONB_AT = tuple(i for i, name in enumerate(HASHED) if name in JSONB)


def _all_visible(pairs: tuple[Any, ...]) -> bool:
    """Whether no header of the pairs is hidden: they may then key a memo as they are (they
    hold no value the redacted form leaves out)."""
    return not any(_hidden_header(str(name).lower()) for name in map(_FIRST, pairs))


def _identity_columns(ident: Identity) -> tuple[Any, ...]:
    """user_id, customer_id, email, roles, trial_mode, user_ref (a non-UUID user id is NULL
    in user_id and kept in user_ref)."""
    uid = ident.user_id
    customer = ident.customer_id
    email = ident.email
    roles = ident.roles
    return (
        uid if uid.__class__ is str and len(uid) == 36 and _UUID_FULL(uid)  # type: ignore[arg-type]
        else strict_uuid(uid),
        customer if customer.__class__ is str and len(customer) <= 255  # type: ignore[arg-type]
        and "\x00" not in customer else _text(customer, 255),  # type: ignore[operator]
        email if email.__class__ is str and len(email) <= 320  # type: ignore[arg-type]
        and "\x00" not in email else _text(email, 320),  # type: ignore[operator]
        [r if r.__class__ is str and len(r) <= 100 and "\x00" not in r else _text(r, 100)
         for r in roles] if roles else None,
        ident.trial_mode,
        _text(uid or ident.service_account, 255),
    )


def _upstream_ms(value: float | None) -> float | None:
    if value.__class__ is float and 0.0 < value < 1e12:  # type: ignore[operator]
        return int(value * 1000.0 + 0.5) / 1000.0  # type: ignore[operator]
    return None if value is None else _ms(value)


def _fragment(text: str | None) -> Fragment | None:
    return None if text is None else Fragment(text)


def _texts(values: Any, cap: int) -> list[Any] | None:
    """A text[] value: a list of capped strings, or None when empty."""
    if not values:
        return None
    return [_text(v, cap) for v in values]


def _cleaned(values: list[Any]) -> list[Any]:
    """Lone surrogates replaced in text values (orjson, like PostgreSQL, refuses them)."""
    out: list[Any] = []
    for value in values:
        if isinstance(value, str):
            value = value.encode("utf-8", "replace").decode()
        elif isinstance(value, list):
            value = [v.encode("utf-8", "replace").decode() if isinstance(v, str) else v
                     for v in value]
        out.append(value)
    return out


def build(settings: Settings, deps: Dependencies) -> AuditRecorder | None:
    """The recorder, or None when the operator removed ``audit`` from ``PLANT_GUARDS``."""
    if not settings.guard_on("audit") or deps.audit_sink is None:
        return None
    return AuditRecorder(settings, deps.audit_sink, deps.flags)
