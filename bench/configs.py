"""Configuration text for the baseline servers: nginx (backend and proxy), Envoy, Traefik.

Every server listens on 127.0.0.1 only and keeps its files in the run's temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

_TYPE = "type.googleapis.com/envoy.extensions.filters.http."
BACKEND_BODY = '{"ok":true,"service":"bench-backend","items":[1,2,3]}'


def _nginx_common(prefix: Path, workers: int) -> str:
    return f"""
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
"""


def nginx_backend_conf(prefix: Path, port: int, workers: int = 1) -> str:
    """A static JSON answer for every path and method: the fastest backend we can run."""
    return _nginx_common(prefix, workers) + f"""
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  client_body_temp_path {prefix}/body;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      default_type application/json;
      return 200 '{BACKEND_BODY}';
    }}
  }}
}}
"""


def nginx_proxy_conf(prefix: Path, port: int, backend_port: int, workers: int) -> str:
    """nginx as a plain reverse proxy with upstream keep-alive: the reference proxy."""
    return _nginx_common(prefix, workers) + f"""
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  upstream backend {{
    server 127.0.0.1:{backend_port};
    keepalive 256;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}
}}
"""


def jwks_oct(secret: str, kid: str = "bench") -> str:
    """The HS256 secret as a JWKS ``oct`` key, the form Envoy's jwt_authn reads."""
    from jwt.utils import base64url_encode

    key = base64url_encode(secret.encode()).decode()
    return json.dumps({"keys": [{"kty": "oct", "kid": kid, "alg": "HS256", "k": key}]})


def envoy_conf(port: int, admin_port: int, backend_port: int, secret: str) -> str:
    """Envoy: jwt_authn (local JWKS, HS256) + local_ratelimit (never rejecting) + router."""
    listener = {
        "name": "main",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "ingress",
                "codec_type": "AUTO",
                "route_config": {"virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                }]},
                "http_filters": [_jwt_filter(secret), _ratelimit_filter(), _router_filter()],
            },
        }]}],
    }
    cluster = {
        "name": "backend",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": backend_port}}},
        }]}]},
        "circuit_breakers": {"thresholds": [{
            "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000,
        }]},
    }
    config = {
        "admin": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }
    return json.dumps(config, indent=1)


def _jwt_filter(secret: str) -> dict[str, object]:
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _TYPE + "jwt_authn.v3.JwtAuthentication",
            "providers": {"bench": {
                "local_jwks": {"inline_string": jwks_oct(secret)},
                "forward": False,
                "clock_skew_seconds": 30,
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
        },
    }


def _ratelimit_filter() -> dict[str, object]:
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": _TYPE + "local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "bench_rl",
            "token_bucket": {
                "max_tokens": 10_000_000, "tokens_per_fill": 10_000_000, "fill_interval": "1s",
            },
            "filter_enabled": {"runtime_key": "rl_enabled", **always},
            "filter_enforced": {"runtime_key": "rl_enforced", **always},
        },
    }


def _router_filter() -> dict[str, object]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _TYPE + "router.v3.Router"},
    }


def traefik_dynamic(backend_port: int) -> str:
    """Traefik's file-provider config: one router, one service, nothing else."""
    config = {
        "http": {
            "routers": {"all": {"rule": "PathPrefix(`/`)", "service": "backend",
                                "entryPoints": ["web"]}},
            "services": {"backend": {"loadBalancer": {
                "servers": [{"url": f"http://127.0.0.1:{backend_port}"}],
            }}},
        }
    }
    return json.dumps(config)  # JSON is valid YAML


def traefik_args(port: int, dynamic_file: Path) -> list[str]:
    return [
        f"--entryPoints.web.address=127.0.0.1:{port}",
        f"--providers.file.filename={dynamic_file}",
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
        "--log.level=ERROR",
        "--serversTransport.maxIdleConnsPerHost=256",
    ]
