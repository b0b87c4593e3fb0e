"""The IP allow/deny guard: which client addresses reach which routes, and its settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from plant_gateway.context import RequestContext
from plant_gateway.deps import Dependencies
from plant_gateway.guards.ip_access import (
    GUARD,
    IpAccessConfig,
    IpAccessSettings,
    IpAccessStep,
    parse_address,
)
from plant_gateway.pipeline.registry import build_pipeline
from plant_gateway.pipeline.routes import RoutesStep
from plant_gateway.settings import Settings, SettingsError, load_settings

ADMIN_ONLY_OFFICE = {"routes": ["/api/v1/admin/*"], "allow": ["10.0.0.0/8", "2001:db8::/32"],
                     "deny": ["10.66.0.0/16"]}
NO_BOTS = {"routes": ["POST /api/v1/auth/login"], "deny": ["203.0.113.0/24"]}


def settings(*rules: dict[str, Any], **more: Any) -> Settings:
    s = Settings(**{"plant_backend_url": "http://backend", "guards": ["ip_access"], **more})
    s.section(IpAccessSettings)  # parsed from this test's environment: replace with the rules
    s._sections[IpAccessSettings] = IpAccessSettings(rules=list(rules))  # type: ignore[misc]
    return s


def step(*rules: dict[str, Any]) -> IpAccessStep:
    built = GUARD.create(settings(*rules), Dependencies(settings(), None, None))  # type: ignore[arg-type]
    assert isinstance(built, IpAccessStep)
    return built


def request(ip: str, path: str = "/api/v1/admin/users", method: str = "GET") -> RequestContext:
    ctx = RequestContext(request_id="r", correlation_id="c", method=method, path=path,
                         query_string="", headers={}, client_ip=ip)
    ctx.upstream_path = path
    return ctx


@pytest.mark.parametrize(("ip", "admitted"), [
    ("10.1.2.3", True),  # in allow
    ("10.66.1.1", False),  # in allow, but deny wins
    ("192.168.1.1", False),  # not in allow
    ("2001:db8::7", True),
    ("2001:db9::7", False),
    ("::ffff:10.1.2.3", True),  # IPv4-mapped IPv6 counts as its IPv4 address
    ("::ffff:10.66.0.9", False),
    ("not-an-address", False),  # unparseable: refused (deny by default)
    ("", False),
])
async def test_allow_and_deny_on_a_guarded_route(ip: str, admitted: bool) -> None:
    ctx = request(ip)
    problem = await step(ADMIN_ONLY_OFFICE).run(ctx)
    if admitted:
        assert problem is None
        assert ctx.error_type is None
    else:
        assert problem is not None and problem.status == 403 and problem.kind == "forbidden"
        assert ip not in problem.detail or not ip  # the answer does not echo the address
        assert ctx.error_type == "ip-not-allowed"  # what the audit row says


async def test_routes_and_methods_outside_every_rule_pass() -> None:
    guard = step(ADMIN_ONLY_OFFICE, NO_BOTS)
    assert await guard.run(request("192.168.1.1", "/api/v1/agents")) is None
    assert await guard.run(request("203.0.113.5", "/api/v1/auth/login", "GET")) is None
    refused = await guard.run(request("203.0.113.5", "/api/v1/auth/login", "POST"))
    assert refused is not None and refused.status == 403
    assert await guard.run(request("198.51.100.1", "/api/v1/auth/login", "POST")) is None


async def test_every_applying_rule_must_admit() -> None:
    guard = step({"routes": ["/api/v1/*"], "deny": ["10.66.0.0/16"]},
                 {"routes": ["/api/v1/admin/*"], "allow": ["10.0.0.0/8"]})
    assert await guard.run(request("10.1.1.1")) is None
    assert await guard.run(request("10.66.1.1")) is not None  # the first rule refuses
    assert await guard.run(request("172.16.0.1")) is not None  # the second rule refuses
    assert await guard.run(request("172.16.0.1", "/api/v1/agents")) is None


async def test_it_sees_the_rewritten_upstream_path() -> None:
    s = settings(ADMIN_ONLY_OFFICE, path_rewrites={"/admin/*": "/api/v1/admin/*"})
    ctx = request("192.168.1.1", "/admin/users")
    assert await RoutesStep(s).run(ctx) is None
    assert ctx.upstream_path == "/api/v1/admin/users"
    assert await step(ADMIN_ONLY_OFFICE).run(ctx) is not None


def test_no_rules_means_not_in_the_pipeline() -> None:
    s = settings()
    deps = Dependencies(s, None, None)  # type: ignore[arg-type]
    assert GUARD.create(s, deps) is None
    assert "ip_access" not in [step.name for step in build_pipeline(s, deps)]


def test_opt_in_and_placed_before_auth() -> None:
    s = Settings(plant_backend_url="http://backend")
    assert "ip_access" not in s.guards  # not in the default PLANT_GUARDS
    on = settings(ADMIN_ONLY_OFFICE, guards=["ip_access", "auth"], jwt_secret="x" * 32)
    names = [st.name for st in build_pipeline(on, Dependencies(on, None, None))]  # type: ignore[arg-type]
    assert names.index("ip_access") < names.index("auth")


@pytest.mark.parametrize(("value", "message"), [
    ('[{"routes": ["/x"], "allow": ["10.0.0.1/8"]}]', "host bits set"),
    ('[{"routes": ["/x"], "allow": ["10.0.0.0/33"]}]', "not a network"),
    ('[{"routes": ["/x"], "deny": ["example.com"]}]', "not a network"),
    ('[{"routes": ["/x"]}]', "neither 'allow' nor 'deny'"),
    ('[{"routes": [], "allow": ["10.0.0.0/8"]}]', "at least 1 item"),
    ('[{"routes": ["no-slash"], "allow": ["10.0.0.0/8"]}]', "no-slash"),
    ('{"routes": ["/x"]}', "IP_ACCESS_RULES"),
    ("not json", "IP_ACCESS_RULES"),
])
def test_a_bad_rule_stops_start_up_with_one_line(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("IP_ACCESS_RULES", value)
    with pytest.raises(SettingsError) as caught:
        load_settings(plant_backend_url="http://backend", guards=["ip_access"])
    assert str(caught.value).startswith("IP_ACCESS_RULES")
    assert message in str(caught.value)


def test_rules_come_from_the_environment_or_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IP_ACCESS_RULES", '[{"routes": ["/a"], "deny": ["10.0.0.0/8"]}]')
    from_env = load_settings(plant_backend_url="http://backend", guards=["ip_access"])
    assert len(IpAccessConfig.from_settings(from_env).rules) == 1
    monkeypatch.delenv("IP_ACCESS_RULES")
    config = tmp_path / "gateway.yaml"
    config.write_text("ip_access_rules:\n  - routes: ['/a', '/b']\n    allow: ['192.0.2.0/24']\n")
    monkeypatch.setenv("PLANT_CONFIG", str(config))
    from_file = load_settings(plant_backend_url="http://backend", guards=["ip_access"])
    [rule] = IpAccessConfig.from_settings(from_file).rules
    assert rule.routes("/b") and not rule.admits(parse_address("10.0.0.1"))


def test_parse_address_normalises_mapped_addresses() -> None:
    assert str(parse_address("::ffff:192.0.2.1")) == "192.0.2.1"
    assert parse_address("192.0.2.1\x00") is None
    assert parse_address("1" * 5000) is None
