"""Unit tests of the request adapter (plant_gateway.pipeline.ingress): ids, traceparent, client IP.

Also the framing checks of the ingress step and the body limit while streaming; no network.
"""

from __future__ import annotations

import pytest

from plant_gateway.pipeline import ingress
from plant_gateway.settings import Settings
from tests.unit.scope_support import SETTINGS, ctx_for, scope


def test_correlation_id_valid_uuid_kept_else_minted() -> None:
    cid = "3F2B8C1E-8A4E-4A8E-9C1D-1F2E3D4C5B6A"
    assert ctx_for(headers=[(b"x-correlation-id", cid.encode())]).correlation_id == cid.lower()
    minted = ctx_for(headers=[(b"x-correlation-id", b"not-a-uuid")]).correlation_id
    assert minted != "not-a-uuid" and ingress.parse_uuid(minted) == minted


def test_causation_from_causation_or_request_id() -> None:
    a, b = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
    assert ctx_for(headers=[(b"x-request-id", b.encode())]).causation_id == b
    both = [(b"x-causation-id", a.encode()), (b"x-request-id", b.encode())]
    assert ctx_for(headers=both).causation_id == a
    assert ctx_for(headers=[(b"x-causation-id", b"junk")]).causation_id is None


@pytest.mark.parametrize("bad", [None, "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01",
                                 "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"])
def test_traceparent_invalid_gets_a_fresh_trace(bad: str | None) -> None:
    out = ingress.propagate_traceparent(bad)
    assert ingress._TRACEPARENT.match(out) and "0" * 32 not in out


def test_traceparent_valid_keeps_trace_id_new_span() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    out = ingress.propagate_traceparent(tp)
    assert out.startswith("00-0af7651916cd43dd8448eb211c80319c-") and out.endswith("-01")
    assert "b7ad6b7169203331" not in out


ON_CLOUD_RUN = Settings(plant_backend_url="http://backend:9000", K_SERVICE="plant-gateway")


@pytest.mark.parametrize(
    ("host", "forwarded_for", "client"),
    [
        # through Google's load balancer: "<client-sent>, <client>, <load balancer>"
        ("api.waooaw.com", "6.6.6.6, 203.0.113.7, 34.1.2.3", "203.0.113.7"),
        ("api.waooaw.com", "203.0.113.7, 34.1.2.3", "203.0.113.7"),
        # straight to the run.app URL: Cloud Run's front end appends only the client
        ("gw-abc-uc.a.run.app", "6.6.6.6, 203.0.113.7", "203.0.113.7"),
        ("GW-ABC-UC.A.RUN.APP:443", "203.0.113.7", "203.0.113.7"),
        # fewer entries than Google adds: not from Google's front end, the peer it is
        ("api.waooaw.com", "6.6.6.6", "10.0.0.9"),
    ],
)
def test_client_ip_on_cloud_run_by_default(host: str, forwarded_for: str, client: str) -> None:
    headers = [(b"host", host.encode()), (b"x-forwarded-for", forwarded_for.encode())]
    ctx = ingress.context_from_scope(scope(headers=headers), ON_CLOUD_RUN)
    assert ctx.client_ip == client


def test_client_ip_off_cloud_run_is_the_peer_unless_hops_are_configured() -> None:
    headers = [(b"host", b"api.waooaw.com"), (b"x-forwarded-for", b"6.6.6.6, 203.0.113.7")]
    plain = Settings(plant_backend_url="http://backend:9000")
    assert ingress.context_from_scope(scope(headers=headers), plain).client_ip == "10.0.0.9"
    pinned = Settings(plant_backend_url="http://b:9000", K_SERVICE="gw", TRUSTED_PROXY_HOPS=0)
    assert ingress.context_from_scope(scope(headers=headers), pinned).client_ip == "10.0.0.9"


def test_client_ip_never_the_spoofable_first_entry() -> None:
    assert ingress.client_ip("10.0.0.1", "6.6.6.6, 1.2.3.4", 1) == "1.2.3.4"
    assert ingress.client_ip("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", 2) == "1.2.3.4"
    assert ingress.client_ip("10.0.0.1", "6.6.6.6", 0) == "10.0.0.1"
    assert ingress.client_ip("10.0.0.1", "1.2.3.4", 2) == "10.0.0.1"  # fewer entries than hops


@pytest.mark.parametrize(
    ("headers", "status"),
    [([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], 400),
     ([(b"content-length", b"3"), (b"content-length", b"3")], 400),
     ([(b"host", b"a"), (b"host", b"b")], 400),
     ([(b"transfer-encoding", b"gzip")], 400),
     ([(b"content-length", b"-1")], 400),
     ([(b"x-big", b"v" * 9000)], 400),
     ([(b"content-length", str(SETTINGS.max_body_bytes + 1).encode())], 413),
     ([(b"content-length", b"10")], None)],
)
async def test_ingress_framing(headers, status) -> None:
    problem = await ingress.IngressStep(SETTINGS.max_body_bytes).run(ctx_for(headers=headers))
    assert (problem.status if problem else None) == status


async def test_body_source_enforces_limit_while_streaming() -> None:
    messages = [{"type": "http.request", "body": b"a" * 6, "more_body": True},
                {"type": "http.request", "body": b"a" * 6, "more_body": False}]

    async def receive():
        return messages.pop(0)

    with pytest.raises(ingress.BodyTooLarge):
        await ingress.BodySource(receive, 10, True).read()
