"""The OPA bundle archive of our policies: layout, no tests inside, same decisions, reproducible."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from plant_gateway.backends import policy_bundle
from plant_gateway.backends.policy_local import compile_bundle, load_sources

ROOT = Path(__file__).resolve().parents[3]


def test_bundle_layout_and_decisions(tmp_path: Path) -> None:
    archive = policy_bundle.build(ROOT / "policies")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert names[:2] == [".manifest", "data.json"]
    assert "main.rego" in names and not any(n.endswith("_test.rego") for n in names)
    manifest = json.loads((tmp_path / ".manifest").read_text())
    assert manifest["roots"] == ["plant"] and manifest["revision"]
    unpacked = compile_bundle(load_sources(tmp_path), "plant/gateway/decision")
    original = compile_bundle(load_sources(ROOT / "policies"), "plant/gateway/decision")
    doc = {"jwt": {"user_id": "u", "roles": ["readonly"]}, "resource": "agents",
           "action": "create", "method": "POST", "path": "/api/v1/agents",
           "gateway_type": "PLANT", "client": {"service_key": False}, "flags": {}, "now_ns": 1}
    assert unpacked.evaluate(doc) == original.evaluate(doc)
    assert unpacked.evaluate(doc)["allow"] is False


def test_bundle_is_reproducible() -> None:
    assert policy_bundle.build(ROOT / "policies") == policy_bundle.build(ROOT / "policies")
