"""Helpers for the request-path step tests: an ASGI scope and the RequestContext built from it.

Imported by tests/unit/pipeline/test_ingress.py, tests/unit/pipeline/test_routes.py and
tests/unit/guards/test_tenant.py (split out of the former tests/unit/test_core_steps.py).
"""

from __future__ import annotations

from typing import Any

from plant_gateway.context import RequestContext
from plant_gateway.pipeline import ingress
from plant_gateway.settings import Settings

SETTINGS = Settings(plant_backend_url="http://backend:9000", guards=["tenant"],
                    cp_registration_key="k" * 20, trusted_proxy_hops=1)


def scope(path: str = "/api/v1/x", headers: list[tuple[bytes, bytes]] | None = None,
          method: str = "GET", raw_path: bytes | None = None, qs: bytes = b"") -> dict:
    headers = headers or []
    if not any(name == b"host" for name, _ in headers):  # as every HTTP/1.1 client sends it
        headers = [(b"host", b"gateway.test"), *headers]
    return {"type": "http", "http_version": "1.1", "method": method, "path": path,
            "raw_path": raw_path or path.encode(), "query_string": qs, "headers": headers,
            "client": ("10.0.0.9", 5555), "scheme": "http"}


def ctx_for(**kwargs: Any) -> RequestContext:
    return ingress.context_from_scope(scope(**kwargs), SETTINGS)
