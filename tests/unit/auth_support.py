"""Helpers for the authentication tests: keys, token minting, settings and request contexts.

Imported by the auth and key tests (tests/unit/guards, tests/unit/backends/test_keys.py,
tests/integration/backends/test_keys_jwks.py), the tests that need a token, and the auth e2e tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from plant_gateway.context import RequestContext
from plant_gateway.settings import Settings, load_settings

SECRET = "test-secret-that-is-long-enough-0123456789"
DROP = object()  # claim value meaning "leave this claim out"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(private: Any) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def private_pem(private: Any) -> str:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "user_id": "11111111-1111-4111-8111-111111111111",
        "sub": "11111111-1111-4111-8111-111111111111",
        "email": "ada@example.com",
        "roles": ["user"],
        "iat": now,
        "exp": now + 3600,
        "iss": "waooaw.com",
        "jti": uuid.uuid4().hex,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


def mint(key: Any = SECRET, alg: str = "HS256", kid: str | None = None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(
    secret: bytes, payload: dict[str, Any], header: dict[str, Any] | None = None
) -> str:
    """HS256 by hand (PyJWT refuses PEM-looking HMAC keys): the algorithm-confusion attack."""
    head = _b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


def unsigned(payload: dict[str, Any], alg: str = "none") -> str:
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps(payload).encode())}."


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"plant_backend_url": "http://127.0.0.1:9", "jwt_secret": SECRET}
    base.update(overrides)
    return load_settings(**base)


def context(
    token: str | None = None,
    path: str = "/api/v1/agents",
    method: str = "GET",
    authorization: str | None = None,
) -> RequestContext:
    headers: dict[str, str] = {}
    if authorization is not None:
        headers["authorization"] = authorization
    elif token is not None:
        headers["authorization"] = f"Bearer {token}"
    return RequestContext(
        request_id=str(uuid.uuid4()),
        correlation_id=str(uuid.uuid4()),
        method=method,
        path=path,
        query_string="",
        headers=headers,
        client_ip="127.0.0.1",
        upstream_path=path,
    )
