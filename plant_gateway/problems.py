"""RFC 7807 problem documents: the one error value of the request path.

Steps return a ``Problem``; ``render`` turns it into ``application/problem+json`` bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TITLES: dict[str, str] = {
    "bad-request": "Bad Request",
    "payload-too-large": "Payload Too Large",
    "unauthorized": "Unauthorized",
    "invalid-token-format": "Invalid Token Format",
    "token-expired": "Token Expired",
    "invalid-token": "Invalid Token",
    "token-revoked": "Token Revoked",
    "token-version-mismatch": "Token Version Mismatch",
    "invalid-service-key": "Invalid Service Key",
    "permission-denied": "Permission Denied",
    "trial-expired": "Trial Expired",
    "forbidden": "Forbidden",
    "not-found": "Not Found",
    "method-not-allowed": "Method Not Allowed",
    "rate-limited": "Too Many Requests",
    "trial-limit-exceeded": "Trial Limit Exceeded",
    "budget-exceeded": "Budget Exceeded",
    "governor-approval-required": "Governor Approval Required",
    "approval-already-used": "Approval Already Used",
    "approvals-unavailable": "Approvals Unavailable",
    "policy-unavailable": "Policy Engine Unavailable",
    "dependency-unavailable": "Dependency Unavailable",
    "audit-unavailable": "Audit Log Unavailable",
    "request-timeout": "Request Timeout",
    "client-disconnected": "Client Closed Request",
    "overloaded": "Overloaded",
    "bad-gateway": "Bad Gateway",
    "upstream-unavailable": "Upstream Unavailable",
    "gateway-timeout": "Gateway Timeout",
    "internal-error": "Internal Server Error",
}


@dataclass(slots=True)
class Problem:
    """A gateway-made error. ``extra`` holds kind-specific members of the document."""

    status: int
    kind: str
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def title(self) -> str:
        return TITLES.get(self.kind, self.kind.replace("-", " ").title())

    def document(self, *, base: str, instance: str, correlation_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": f"{base.rstrip('/')}/errors/{self.kind}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            "correlation_id": correlation_id,
        }
        doc.update(self.extra)
        return doc

    def render(self, *, base: str, instance: str, correlation_id: str) -> bytes:
        doc = self.document(base=base, instance=instance, correlation_id=correlation_id)
        return json.dumps(doc, separators=(",", ":"), default=str).encode()


def unauthorized(kind: str, detail: str) -> Problem:
    """A 401 with the ``WWW-Authenticate`` challenge every 401 must carry."""
    request_errors = ("unauthorized", "invalid-token-format")
    error = "invalid_request" if kind in request_errors else "invalid_token"
    challenge = f'Bearer realm="plant-gateway", error="{error}"'
    return Problem(401, kind, detail, headers=[("www-authenticate", challenge)])


def unavailable(
    dependency: str, detail: str, *, kind: str = "dependency-unavailable",
    retry_after_s: int = 1, extra: dict[str, Any] | None = None,
) -> Problem:
    """The fail-closed 503 of the request path: ``dependency`` is down or did not answer.

    Every guard refuses through this one builder (deny by default), so each such answer names
    its dependency and carries ``Retry-After``.
    """
    return Problem(
        503, kind, detail, extra={"dependency": dependency, **(extra or {})},
        headers=[("retry-after", str(retry_after_s))],
    )


# Retry-After of an audit refusal: the writer retries the database at least every 5 s
AUDIT_RETRY_AFTER_S = 5


def audit_unavailable() -> Problem:
    """The 503 for a request whose audit row could not be secured (``AUDIT_ON_LOSS=refuse``)."""
    return unavailable(
        "audit", "the audit log cannot record requests right now; the request was not processed",
        kind="audit-unavailable", retry_after_s=AUDIT_RETRY_AFTER_S,
    )
