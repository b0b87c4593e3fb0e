"""Unit tests of the problem documents (plant_gateway.problems): the RFC 7807 body and the 503s.

What a caller reads in a refusal: members, title, and the ``Retry-After`` of a fail-closed 503.
"""

from __future__ import annotations

import json

from plant_gateway.problems import Problem


def test_problem_document_shape() -> None:
    doc = json.loads(Problem(413, "payload-too-large", "too big").render(
        base="https://waooaw.com", instance="/x", correlation_id="c"))
    assert doc == {"type": "https://waooaw.com/errors/payload-too-large",
                   "title": "Payload Too Large", "status": 413, "detail": "too big",
                   "instance": "/x", "correlation_id": "c"}
