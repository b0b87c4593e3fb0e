"""Micro-benchmark of the authentication step: cold (signature check) vs cached verification.

Run: ``.venv/bin/python bench/auth_bench.py [iterations]``; prints a Markdown table (µs/request).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from plant_gateway.backends.keys import create as create_keys
from plant_gateway.context import RequestContext
from plant_gateway.counters import create as create_counters
from plant_gateway.guards.auth import AuthConfig, AuthStep
from plant_gateway.settings import load_settings

SECRET = "bench-secret-that-is-long-enough-0123456789"


def _pem(private: Any) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {"user_id": "u-1", "sub": "u-1", "email": "a@example.com", "roles": ["user"],
            "iat": now, "exp": now + 3600, "iss": "waooaw.com", "jti": uuid.uuid4().hex}


def _ctx(token: str) -> RequestContext:
    return RequestContext(request_id="r", correlation_id="c", method="GET", path="/api/v1/agents",
                          query_string="", headers={"authorization": f"Bearer {token}"},
                          client_ip="127.0.0.1", upstream_path="/api/v1/agents")


def _step(alg: str, cache_size: int) -> tuple[AuthStep, Any]:
    if alg == "HS256":
        key: Any = SECRET
        overrides: dict[str, Any] = {"jwt_secret": SECRET}
    else:
        key = rsa.generate_private_key(65537, 2048) if alg == "RS256" else ec.generate_private_key(
            ec.SECP256R1())
        overrides = {"jwt_public_key": _pem(key)}
    cfg = load_settings(plant_backend_url="http://127.0.0.1:9", jwt_claims_cache_size=cache_size,
                        guards=["auth"], **overrides)
    return AuthStep(AuthConfig.from_settings(cfg), create_keys(cfg), create_counters(cfg)), key


async def _measure(step: AuthStep, tokens: list[str]) -> float:
    """Median µs per ``step.run`` over 5 rounds of ``tokens``."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for token in tokens:
            if await step.run(_ctx(token)) is not None:
                raise SystemExit("benchmark token refused")
        rounds.append((time.perf_counter() - start) / len(tokens) * 1e6)
    return statistics.median(rounds)


async def main(iterations: int) -> None:
    print("| algorithm | cold: signature check (µs) | cached (µs) | speed-up | checks |")
    print("|---|---:|---:|---:|---:|")
    for alg in ("HS256", "RS256", "ES256"):
        cold_step, key = _step(alg, cache_size=0)
        tokens = [jwt.encode(_claims(), key, algorithm=alg) for _ in range(iterations)]
        cold = await _measure(cold_step, tokens)
        warm_step, _ = _step(alg, cache_size=iterations * 2)
        warm_step.keys = cold_step.keys
        await warm_step.run(_ctx(tokens[0]))
        warm = await _measure(warm_step, [tokens[0]] * iterations)
        print(f"| {alg} | {cold:.1f} | {warm:.1f} | {cold / warm:.0f}x | "
              f"{cold_step.signature_checks} vs {warm_step.signature_checks} |")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
