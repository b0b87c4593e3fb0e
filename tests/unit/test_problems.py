"""Unit tests of the problem documents (plant_gateway.problems): the RFC 7807 body and the 503s.

What a caller reads in a refusal: members, title, and the ``Retry-After`` of a fail-closed 503.
"""

from __future__ import annotations

import json

from plant_gateway.problems import (
    AUDIT_RETRY_AFTER_S,
    Problem,
    audit_unavailable,
    unauthorized,
    unavailable,
)


def test_problem_document_shape() -> None:
    doc = json.loads(Problem(413, "payload-too-large", "too big").render(
        base="https://waooaw.com", instance="/x", correlation_id="c"))
    assert doc == {"type": "https://waooaw.com/errors/payload-too-large",
                   "title": "Payload Too Large", "status": 413, "detail": "too big",
                   "instance": "/x", "correlation_id": "c"}


def test_unavailable_names_its_dependency_and_says_when_to_retry() -> None:
    problem = unavailable("redis", "the counters store did not answer")
    assert (problem.status, problem.kind) == (503, "dependency-unavailable")
    assert problem.headers == [("retry-after", "1")]
    doc = problem.document(base="https://waooaw.com", instance="/x", correlation_id="c")
    assert doc["dependency"] == "redis" and doc["title"] == "Dependency Unavailable"
    custom = unavailable("opa", "down", kind="policy-unavailable", retry_after_s=3,
                         extra={"breaker": "open"})
    assert custom.extra == {"dependency": "opa", "breaker": "open"}
    assert custom.headers == [("retry-after", "3")] and custom.title == "Policy Engine Unavailable"


def test_audit_unavailable_is_a_503_naming_the_audit_log() -> None:
    problem = audit_unavailable()
    assert (problem.status, problem.kind, problem.extra) == (503, "audit-unavailable",
                                                             {"dependency": "audit"})
    assert problem.headers == [("retry-after", str(AUDIT_RETRY_AFTER_S))]


def test_every_401_carries_a_bearer_challenge() -> None:
    missing = unauthorized("unauthorized", "no token")
    expired = unauthorized("token-expired", "expired")
    assert missing.status == expired.status == 401
    assert missing.headers == [
        ("www-authenticate", 'Bearer realm="plant-gateway", error="invalid_request"')]
    assert expired.headers == [
        ("www-authenticate", 'Bearer realm="plant-gateway", error="invalid_token"')]
