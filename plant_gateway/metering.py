"""The Plant platform's signed metering envelope: the real cost of a call, verified.

A trusted caller (the platform's AI services) sends ``X-Metering-*`` headers with the cost of the
LLM work behind a request, signed with HMAC-SHA256 under ``METERING_ENVELOPE_SECRET`` — the same
secret and canonical form the Plant backend verifies. The budget guard charges that cost instead
of a made-up price. No library speaks this platform-specific format; the code is the HMAC of the
standard library over one canonical string, and the tests cover it with hostile input.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

SIGNATURE = "x-metering-signature"
TIMESTAMP = "x-metering-timestamp"
TOKENS_IN = "x-metering-tokens-in"
TOKENS_OUT = "x-metering-tokens-out"
MODEL = "x-metering-model"
CACHE_HIT = "x-metering-cache-hit"
COST = "x-metering-cost-usd"
MAX_FIELD_CHARS = 256  # a header longer than this is not an envelope field
SIX_PLACES = Decimal("0.000001")
MAX_COST_USD = Decimal(1_000_000)  # no single call costs this: refuse rather than overflow


def canonical(
    timestamp: int, correlation_id: str, tokens_in: int, tokens_out: int,
    model: str, cache_hit: bool, cost_usd: Decimal,
) -> bytes:
    """``ts|correlation_id|tokens_in|tokens_out|model|cache_hit(0/1)|cost(6 places)``."""
    fields = (
        str(timestamp), correlation_id, str(tokens_in), str(tokens_out), model.strip(),
        "1" if cache_hit else "0", format(cost_usd.quantize(SIX_PLACES), "f"),
    )
    return "|".join(fields).encode()


def sign(secret: bytes, message: bytes) -> str:
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def verified_cost(
    headers: Mapping[str, str], correlation_id: str, secret: bytes, ttl_s: float, now: float
) -> float | None:
    """The envelope's cost in USD when it is complete, fresh, bound to this request and signed
    with ``secret``; None for a missing, malformed, stale, foreign or forged envelope."""
    signature = headers.get(SIGNATURE)
    if not signature or not secret:
        return None
    fields = [headers.get(name) for name in (TIMESTAMP, TOKENS_IN, TOKENS_OUT, MODEL, COST)]
    if any(f is not None and len(f) > MAX_FIELD_CHARS for f in (signature, *fields)):
        return None
    timestamp_raw, tokens_in_raw, tokens_out_raw, model, cost_raw = fields
    try:
        timestamp = int(timestamp_raw or "")
        tokens_in = int(tokens_in_raw or "")
        tokens_out = int(tokens_out_raw or "")
        cost = Decimal(str(float(cost_raw))) if cost_raw is not None else Decimal(0)
    except (ValueError, InvalidOperation):
        return None
    if not cost.is_finite() or not 0 <= cost <= MAX_COST_USD or abs(now - timestamp) > ttl_s:
        return None
    cache_hit = (headers.get(CACHE_HIT) or "0").strip().lower() in {"1", "true", "yes"}
    message = canonical(
        timestamp, correlation_id, tokens_in, tokens_out, model or "", cache_hit, cost
    )
    if not hmac.compare_digest(signature.strip().encode(), sign(secret, message).encode()):
        return None
    return float(cost)
