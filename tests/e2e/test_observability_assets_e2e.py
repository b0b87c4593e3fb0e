"""The Grafana dashboard, the Prometheus alert rules and the Terraform alert policies load,
their PromQL parses, and every metric they name is in a running gateway's ``/metrics``.

A dashboard panel or an alert on a misspelt or renamed metric shows nothing and never fires,
silently; this is the check that it cannot happen. The gateway runs every guard (audit
included, on its embedded PostgreSQL) so that every family is registered.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from plant_gateway.settings import Settings
from tests.fixtures.processes import Proc, mint_token, start_gateway

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "plant-gateway.json"
RULES = ROOT / "deploy" / "prometheus" / "plant-gateway-alerts.yaml"
STACK = ROOT / "deploy" / "terraform" / "stacks" / "plant"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                              "_created"), "gauge": ("",)}
# Grafana's variables, replaced by values PromQL accepts
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                "$job": ".*", "$route": ".*"}
TF_JOB = '${local.metrics_job}'


@pytest.fixture(scope="module")
def exposed(backend: Proc) -> Iterator[set[str]]:
    """Every sample name the gateway's /metrics can carry (from its families and types)."""
    gateway = start_gateway({"CUSTOMER_ENRICHMENT": "false"}, backend=backend)
    try:
        request = urllib.request.Request(gateway.url + "/api/v1/agents")  # noqa: S310
        request.add_header("Authorization", f"Bearer {mint_token(roles=['admin'])}")
        urllib.request.urlopen(request, timeout=10).close()  # noqa: S310 - loopback
        with urllib.request.urlopen(gateway.admin_url + "/metrics", timeout=10) as resp:  # noqa: S310
            text = resp.read().decode()
    finally:
        gateway.stop()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    yield names


def selectors(expr: str) -> set[str]:
    """The metric names an expression selects (by name or by a __name__ matcher)."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                found.add(node.name)
            found.update(m.value for m in node.matchers.matchers if m.name == "__name__")

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def grafana_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            assert match, variable["definition"]
            exprs.append(match.group(1))
    out = []
    for expr in exprs:
        for name, value in GRAFANA_VARS.items():
            expr = expr.replace(name, value)
        out.append(expr)
    return out


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def hcl_string(value: Any) -> Any:
    """python-hcl2 keeps a string literal as written: quoted, with its escapes."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


def terraform_alerts() -> dict[str, dict[str, Any]]:
    with (STACK / "monitoring.tf").open() as fh:
        doc = hcl2.load(fh)
    alerts: dict[str, dict[str, Any]] = {}
    for block in doc["locals"]:
        for name, body in block.get("alerts", {}).items():
            alerts[name] = {k: hcl_string(v) for k, v in body.items()}
    return alerts


def unscoped(query: str) -> str:
    """A Terraform policy's query without its job matcher: the rule's expression."""
    return query.replace(f'job="{TF_JOB}",', "").replace(f'{{job="{TF_JOB}"}}', "")


def canonical(expr: str) -> str:
    return str(promql_parser.parse(expr).prettify())


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "plant-gateway" and doc["title"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    names = [v["name"] for v in doc["templating"]["list"]]
    assert names[0] == "datasource"  # picked at import: no fixed data source uid
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_every_dashboard_query_parses_and_names_only_exposed_metrics(exposed: set[str]) -> None:
    used: set[str] = set()
    for expr in grafana_exprs():
        used |= selectors(expr)  # raises on a PromQL syntax error
    assert used, "no metric referenced"
    assert used - exposed == set()


def test_every_alert_rule_parses_and_names_only_exposed_metrics(exposed: set[str]) -> None:
    found = rules()
    assert {r["alert"] for r in found} >= {
        "PlantGateway5xxRatio", "PlantGatewayP99Latency", "PlantGatewayAuditRowsLost",
        "PlantGatewayAuditBacklog", "PlantGatewayCircuitOpen", "PlantGatewayBudgetCritical"}
    for rule in found:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert selectors(rule["expr"]) - exposed == set(), rule["alert"]


def test_terraform_alert_policies_are_the_rules_scoped_to_the_environment(
    exposed: set[str]
) -> None:
    policies = terraform_alerts()
    by_name = {r["alert"]: r for r in rules()}
    assert set(policies) == set(by_name)
    for name, policy in policies.items():
        query = policy["query"]
        assert selectors(query.replace(TF_JOB, "x")) - exposed == set(), name
        # every selector is scoped to this environment's job, and nothing else differs
        assert query.count("plant_gateway_") == query.count(f'{{job="{TF_JOB}"'), name
        assert canonical(unscoped(query)) == canonical(by_name[name]["expr"]), name
        seconds = int(policy["for"].rstrip("s"))
        unit = {"s": 1, "m": 60, "h": 3600}[by_name[name]["for"][-1]]
        assert seconds == int(by_name[name]["for"][:-1]) * unit, name


def test_the_collector_scrapes_the_admin_listener_the_gateway_opens() -> None:
    with (STACK / "variables.tf").open() as fh:
        variables = {hcl_string(k): v for block in hcl2.load(fh)["variable"]
                     for k, v in block.items()}
    default_port = variables["gateway_admin_port"]["default"]
    assert default_port == Settings(plant_backend_url="http://x").admin_port
    monitoring = (STACK / "monitoring.tf").read_text()
    assert "port     = var.gateway_admin_port" in monitoring
    assert 'path     = "/metrics"' in monitoring
    main = (STACK / "main.tf").read_text()
    assert "ADMIN_PORT                 = tostring(var.gateway_admin_port)" in main
