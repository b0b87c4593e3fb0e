"""End-to-end smoke test of the process fixtures: a real gateway in front of a real backend.

Proves that ``start_gateway``/``start_backend`` work and a request passes through.
"""

from __future__ import annotations

import json
import urllib.request

from tests.fixtures.processes import Proc


def test_request_passes_through(backend: Proc, gateway_factory) -> None:
    gw = gateway_factory({"PLANT_GUARDS": "tenant"}, backend=backend)
    with urllib.request.urlopen(gw.url + "/api/v1/things?x=1") as resp:
        doc = json.loads(resp.read())
        assert resp.headers["X-Correlation-ID"]
    assert doc["backend"] == "production"
    assert doc["path"] == "/api/v1/things"
    assert doc["query"] == "x=1"
