"""Feature flags backend: targeting per context, defaults, file reload, the LaunchDarkly path.

Every test evaluates through the real LaunchDarkly SDK (file data source or a local stream).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from plant_gateway.backends import flags as F
from plant_gateway.context import Identity, RequestContext
from plant_gateway.settings import Settings

SECRET = "s" * 40


def settings(**kw: Any) -> Settings:
    return Settings(plant_backend_url="http://127.0.0.1:9", jwt_secret=SecretStr(SECRET), **kw)


def request(identity: Identity | None) -> RequestContext:
    ctx = RequestContext(
        request_id="r", correlation_id="c", method="GET", path="/api/v1/agents",
        query_string="", headers={}, client_ip="127.0.0.1",
    )
    ctx.identity = identity
    return ctx


def user(uid: str = "u-1", **kw: Any) -> Identity:
    kw.setdefault("roles", ["viewer"])
    return Identity(user_id=uid, **kw)


def bool_flag(key: str, *, targets: list[str] | None = None,
              clause: dict[str, Any] | None = None) -> dict[str, Any]:
    """A full LaunchDarkly flag: on for everyone except the targets / rule matches."""
    flag: dict[str, Any] = {
        "key": key, "on": True, "variations": [True, False], "offVariation": 0,
        "fallthrough": {"variation": 0},
    }
    if targets:
        flag["targets"] = [{"values": targets, "variation": 1}]
    if clause:
        flag["rules"] = [{"id": "r1", "variation": 1, "clauses": [
            {"contextKind": "user", "negate": False, "op": "in", **clause}]}]
    return flag


def write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    later = time.time() + 2  # a distinct mtime even on coarse-grained file systems
    os.utime(path, (later, later))


async def started(flags_file: Path, **kw: Any) -> F.LaunchDarklyFlags:
    backend = F.create(settings(flags_file=flags_file, **kw))
    assert isinstance(backend, F.LaunchDarklyFlags)
    await backend.start()
    return backend


async def wait_for(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


# --- no file: every guard on ------------------------------------------------------------------


async def test_without_flags_file_every_flag_is_on() -> None:
    backend = F.create(settings(budget_alert_thresholds=[0.5, 0.9, 1.0]))
    assert isinstance(backend, F.DefaultFlags)
    await backend.start()
    ctx = request(user())
    assert all(backend.enabled(flag, ctx) for flag in F.BOOLEAN_FLAGS)
    assert backend.value(F.BUDGET_ALERT_THRESHOLDS, ctx, None) == [0.5, 0.9, 1.0]
    assert (await backend.check()).ok


# --- each flag, per context -------------------------------------------------------------------


@pytest.mark.parametrize("flag", F.BOOLEAN_FLAGS)
async def test_each_flag_off_for_targeted_user_only(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "flags.json"
    write(path, {"flags": {flag: bool_flag(flag, targets=["u-off"])}})
    backend = await started(path)
    try:
        off, other = request(user("u-off")), request(user("u-on"))
        assert backend.enabled(flag, off) is False
        assert backend.enabled(flag, other) is True
        assert all(backend.enabled(f, off) for f in F.BOOLEAN_FLAGS if f != flag)
    finally:
        await backend.close()


CASES = [
    ({"attribute": "customer_id", "values": ["cust-a"]},
     user(customer_id="cust-a"), user(customer_id="cust-b")),
    ({"attribute": "roles", "values": ["admin"]},
     user(roles=["viewer", "admin"]), user(roles=["viewer"])),
    ({"attribute": "trial_mode", "values": [True]},
     user(trial_mode=True), user(trial_mode=False)),
    ({"attribute": "key", "values": ["anonymous"]}, None, user()),
]


@pytest.mark.parametrize(("clause", "matching", "other"), CASES,
                         ids=["customer", "roles", "trial", "anonymous"])
async def test_rules_on_context_attributes(
    tmp_path: Path, clause: dict[str, Any], matching: Identity | None, other: Identity
) -> None:
    path = tmp_path / "flags.json"
    write(path, {"flags": {"enable_rbac": bool_flag("enable_rbac", clause=clause)}})
    backend = await started(path)
    try:
        assert backend.enabled("enable_rbac", request(matching)) is False
        assert backend.enabled("enable_rbac", request(other)) is True
    finally:
        await backend.close()


async def test_rule_on_gateway_type(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    clause = {"attribute": "gateway_type", "values": ["PP"]}
    write(path, {"flags": {"enable_sandbox_routing": bool_flag("enable_sandbox_routing",
                                                               clause=clause)}})
    pp, plant = await started(path, gateway_type="PP"), await started(path)
    try:
        assert pp.enabled("enable_sandbox_routing", request(user())) is False
        assert plant.enabled("enable_sandbox_routing", request(user())) is True
    finally:
        await pp.close()
        await plant.close()


async def test_budget_thresholds_variation_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    flag = {
        "key": "budget_alert_thresholds", "on": True, "offVariation": 0,
        "variations": [[0.8, 0.95, 1.0], [0.5, 0.75, 1.0], ["bad"]],
        "fallthrough": {"variation": 0},
        "rules": [
            {"id": "t", "variation": 1, "clauses": [{"contextKind": "user", "attribute":
             "trial_mode", "op": "in", "values": [True], "negate": False}]},
            {"id": "b", "variation": 2, "clauses": [{"contextKind": "user", "attribute":
             "customer_id", "op": "in", "values": ["broken"], "negate": False}]},
        ],
    }
    write(path, {"flags": {"budget_alert_thresholds": flag}})
    backend = await started(path, budget_alert_thresholds=[0.7, 0.9, 1.0])
    try:
        key = F.BUDGET_ALERT_THRESHOLDS
        assert backend.value(key, request(user(trial_mode=True)), None) == [0.5, 0.75, 1.0]
        assert backend.value(key, request(user()), None) == [0.8, 0.95, 1.0]
        # a malformed variation is ignored: the configured thresholds apply
        assert backend.value(key, request(user(customer_id="broken")), None) == [0.7, 0.9, 1.0]
    finally:
        await backend.close()


async def test_missing_flag_defaults_on_and_non_boolean_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "flags.yaml"
    path.write_text("flagValues:\n  enable_rbac: 'no'\n  enable_trial_mode: false\n")
    backend = await started(path)
    try:
        ctx = request(user())
        assert backend.enabled("enable_rbac", ctx) is True  # a string is not a boolean
        assert backend.enabled("enable_trial_mode", ctx) is False
        assert backend.enabled("enable_audit_logging", ctx) is True  # absent -> on
    finally:
        await backend.close()


async def test_identity_change_on_same_request_re_evaluates(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    write(path, {"flags": {"enable_rate_limiting": bool_flag("enable_rate_limiting",
                                                             targets=["u-off"])}})
    backend = await started(path)
    try:
        ctx = request(None)
        assert backend.enabled("enable_rate_limiting", ctx) is True
        ctx.identity = user("u-off")  # authentication ran after an early lookup
        assert backend.enabled("enable_rate_limiting", ctx) is False
        assert ctx.flags["enable_rate_limiting"] is False
    finally:
        await backend.close()


# --- reload ----------------------------------------------------------------------------------


async def test_file_reload_and_broken_file_keeps_last_values(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    write(path, {"flagValues": {"enable_audit_logging": True}})
    backend = await started(path)
    try:
        assert backend.enabled("enable_audit_logging", request(user())) is True
        generation = backend.generation
        write(path, {"flagValues": {"enable_audit_logging": False}})
        await wait_for(lambda: backend.generation != generation)
        await wait_for(lambda: not backend.enabled("enable_audit_logging", request(user())))

        generation = backend.generation
        path.write_text("{ this is not json or yaml: [")
        later = time.time() + 4
        os.utime(path, (later, later))
        await asyncio.sleep(1.5)  # give the poller time to see (and reject) the broken file
        assert backend.enabled("enable_audit_logging", request(user())) is False
        assert (await backend.check()).ok
    finally:
        await backend.close()


# --- start-up errors ----------------------------------------------------------------------------


def test_missing_or_malformed_flags_file_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(F.FlagsConfigError, match="FLAGS_FILE"):
        F.create(settings(flags_file=tmp_path / "nope.yaml"))
    bare_on = tmp_path / "bare.yaml"
    bare_on.write_text("flags:\n  enable_rbac:\n    key: enable_rbac\n    on: true\n")
    with pytest.raises(F.FlagsConfigError, match='"on"'):
        F.create(settings(flags_file=bare_on))


def test_example_flags_file_is_valid() -> None:
    example = Path(__file__).resolve().parents[3] / "deploy" / "flags.example.yaml"
    assert isinstance(F.create(settings(flags_file=example)), F.LaunchDarklyFlags)


# --- the LaunchDarkly path --------------------------------------------------------------------


def test_sdk_key_selects_launchdarkly() -> None:
    backend = F.create(settings(launchdarkly_sdk_key="sdk-test-key"))
    assert isinstance(backend, F.LaunchDarklyFlags)
    assert backend.source == "launchdarkly"


async def test_launchdarkly_path_with_sdk_file_data_source(tmp_path: Path) -> None:
    from ldclient.integrations import Files

    path = tmp_path / "flags.json"
    write(path, {"flags": {"enable_trial_mode": bool_flag("enable_trial_mode",
                                                          targets=["u-off"])}})
    backend = F.LaunchDarklyFlags(settings(), sdk_key="sdk-test-key",
                                  data_source=Files.new_data_source(paths=[str(path)]))
    await backend.start()
    try:
        assert backend.enabled("enable_trial_mode", request(user("u-off"))) is False
        assert backend.enabled("enable_trial_mode", request(user("u-on"))) is True
        status = await backend.check()
        assert status.ok and status.detail.startswith("launchdarkly")
    finally:
        await backend.close()


class FakeLaunchDarkly:
    """A loopback stand-in for LaunchDarkly's streaming endpoint (one ``put`` then idle)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def stream(self, request: web.Request) -> web.StreamResponse:
        assert request.headers.get("Authorization") == "sdk-test-key"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        payload = json.dumps({"path": "/", "data": self.data})
        await resp.write(f"event: put\ndata: {payload}\n\n".encode())
        while True:
            await asyncio.sleep(0.5)
            await resp.write(b":\n\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/all", self.stream)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def fake_ld() -> AsyncIterator[FakeLaunchDarkly]:
    server = FakeLaunchDarkly({
        "flags": {"enable_budget_enforcement": {
            **bool_flag("enable_budget_enforcement", clause={"attribute": "customer_id",
                                                             "values": ["cust-free"]}),
            "version": 3}},
        "segments": {},
    })
    await server.start()
    yield server
    await server.stop()


async def test_launchdarkly_stream_and_outage_keeps_last_values(
    fake_ld: FakeLaunchDarkly,
) -> None:
    overrides = {"stream_uri": fake_ld.url, "base_uri": fake_ld.url,
                 "events_uri": fake_ld.url, "send_events": False,
                 "initial_reconnect_delay": 0.1}
    backend = F.LaunchDarklyFlags(settings(), sdk_key="sdk-test-key",
                                  config_overrides=overrides)
    await backend.start()
    try:
        flag = "enable_budget_enforcement"
        await wait_for(lambda: not backend.enabled(flag, request(user(customer_id="cust-free"))))
        assert backend.enabled(flag, request(user(customer_id="cust-paid"))) is True

        await fake_ld.stop()  # the flag service goes away
        await asyncio.sleep(0.5)
        assert backend.enabled(flag, request(user(customer_id="cust-free"))) is False
        assert backend.enabled(flag, request(user(customer_id="other"))) is True
    finally:
        await backend.close()
