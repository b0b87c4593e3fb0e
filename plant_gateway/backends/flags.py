"""Feature flags (README → Feature flags): LaunchDarkly's SDK, fed by LaunchDarkly or a local file.

Both paths share the SDK's evaluation engine; evaluation is in-memory and memoised per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from plant_gateway.backends.base import DependencyStatus
from plant_gateway.memo import BoundedMemo
from plant_gateway.settings import SettingsError

if TYPE_CHECKING:
    from ldclient.client import LDClient
    from ldclient.context import Context

    from plant_gateway.context import RequestContext
    from plant_gateway.settings import Settings

log = logging.getLogger(__name__)

ENABLE_RBAC = "enable_rbac"
ENABLE_TRIAL_MODE = "enable_trial_mode"
ENABLE_GOVERNOR_APPROVAL = "enable_governor_approval"
ENABLE_SANDBOX_ROUTING = "enable_sandbox_routing"
ENABLE_BUDGET_ENFORCEMENT = "enable_budget_enforcement"
ENABLE_RATE_LIMITING = "enable_rate_limiting"
ENABLE_AUDIT_LOGGING = "enable_audit_logging"
BUDGET_ALERT_THRESHOLDS = "budget_alert_thresholds"

BOOLEAN_FLAGS = (
    ENABLE_RBAC,
    ENABLE_TRIAL_MODE,
    ENABLE_GOVERNOR_APPROVAL,
    ENABLE_SANDBOX_ROUTING,
    ENABLE_BUDGET_ENFORCEMENT,
    ENABLE_RATE_LIMITING,
    ENABLE_AUDIT_LOGGING,
)
# The step (settings.guards name) each flag can switch off per request.
GUARD_FLAGS = {
    "rate_limit": ENABLE_RATE_LIMITING,
    "budget": ENABLE_BUDGET_ENFORCEMENT,
    "audit": ENABLE_AUDIT_LOGGING,
}

_SCRATCH_KEY = "flags.context"
_MEMO_MAX = 50_000


class FlagsConfigError(SettingsError):
    """The flags file is missing or unreadable at start-up (names FLAGS_FILE)."""


def context_key(ctx: RequestContext, gateway_type: str) -> tuple[Any, ...]:
    """What flag targeting may depend on: user, customer, roles, trial, gateway type."""
    ident = ctx.identity
    if ident is None:
        return ("anonymous", None, (), False, gateway_type, True)
    return (
        ident.user_id or "anonymous",
        ident.customer_id,
        tuple(sorted(ident.roles)),
        bool(ident.trial_mode),
        gateway_type,
        not ident.user_id,
    )


def build_ld_context(key: tuple[Any, ...]) -> Context:
    """The LaunchDarkly evaluation context (kind ``user``) for a ``context_key``."""
    from ldclient.context import Context

    user_key, customer_id, roles, trial_mode, gateway_type, anonymous = key
    builder = Context.builder(user_key).kind("user").anonymous(anonymous)
    if customer_id is not None:
        builder.set("customer_id", customer_id)
    builder.set("roles", list(roles))
    builder.set("trial_mode", trial_mode)
    builder.set("gateway_type", gateway_type)
    return builder.build()


class _RequestFlags:
    """What one request caches in ``ctx.scratch``: its identity and its context key."""

    __slots__ = ("identity", "key")

    def __init__(self, identity: Any, key: tuple[Any, ...]) -> None:
        self.identity = identity
        self.key = key


class DefaultFlags:
    """No flags file, no LaunchDarkly: every guard on, thresholds from settings."""

    name = "flags"
    static = True  # values never depend on the request: callers may evaluate them once

    def __init__(self, settings: Settings) -> None:
        self._defaults: dict[str, Any] = {f: True for f in BOOLEAN_FLAGS}
        self._defaults[BUDGET_ALERT_THRESHOLDS] = list(settings.budget_alert_thresholds)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check(self) -> DependencyStatus:
        return DependencyStatus(self.name, True, required=False, detail="defaults (all guards on)")

    def enabled(self, flag: str, ctx: RequestContext) -> bool:
        return bool(self._defaults.get(flag, True))

    def value(self, flag: str, ctx: RequestContext, default: Any) -> Any:
        return self._defaults.get(flag, default)


class LaunchDarklyFlags:
    """The LaunchDarkly SDK client, streaming from LaunchDarkly or reading a local flags file.

    Values are memoised per (data generation, context key, flag); every change to the SDK's
    flag store (stream update, file reload) bumps the generation. When the flag service is
    unreachable the SDK keeps serving the last values it received (a broken flags file likewise
    keeps the last good load); before any data arrived every flag falls back to its default
    (guards on).
    """

    name = "flags"

    def __init__(
        self,
        settings: Settings,
        *,
        sdk_key: str | None = None,
        flags_file: Path | None = None,
        data_source: Any = None,
        start_wait_s: float = 5.0,
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        self._sdk_key = sdk_key
        self._flags_file = flags_file
        self._data_source = data_source
        self._start_wait_s = start_wait_s
        self._overrides = dict(config_overrides or {})
        self._gateway_type = settings.gateway_type
        self._defaults: dict[str, Any] = {f: True for f in BOOLEAN_FLAGS}
        self._defaults[BUDGET_ALERT_THRESHOLDS] = list(settings.budget_alert_thresholds)
        self._client: LDClient | None = None
        self._generation = 0
        self._memo: BoundedMemo[tuple[int, tuple[Any, ...], str], Any] = BoundedMemo(_MEMO_MAX)
        self._lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------
    def _config(self) -> Any:
        from ldclient.config import Config
        from ldclient.integrations import Files

        options: dict[str, Any] = {
            "diagnostic_opt_out": True,
            "feature_store": _NotifyingStore(self._invalidate),
        }
        if self._data_source is not None:
            options.update(update_processor_class=self._data_source, send_events=False)
        elif self._sdk_key is None:
            assert self._flags_file is not None
            source = Files.new_data_source(
                paths=[str(self._flags_file)], auto_update=True, poll_interval=0.5,
                force_polling=True,
            )
            options.update(update_processor_class=source, send_events=False)
        options.update(self._overrides)
        return Config(sdk_key=self._sdk_key or "local-flags-file", **options)

    async def start(self) -> None:
        from ldclient.client import LDClient

        config = self._config()
        client = await asyncio.to_thread(LDClient, config, self._start_wait_s)
        self._client = client
        self._invalidate()
        if not client.is_initialized():
            log.warning("feature flags not initialised yet (%s): defaults apply", self.source)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    async def check(self) -> DependencyStatus:
        client = self._client
        if client is None:
            return DependencyStatus(self.name, False, required=False, detail="not started")
        state = client.data_source_status_provider.status.state
        ok = client.is_initialized()
        detail = f"{self.source}: {getattr(state, 'value', state)}"
        if not ok:
            detail += " (defaults: all guards on)"
        return DependencyStatus(self.name, ok, required=False, detail=detail)

    @property
    def source(self) -> str:
        return "launchdarkly" if self._sdk_key else "file"

    @property
    def generation(self) -> int:
        return self._generation

    def _invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._memo = BoundedMemo(_MEMO_MAX)

    # --- evaluation --------------------------------------------------------------------------
    def _request_flags(self, ctx: RequestContext) -> _RequestFlags:
        cached = ctx.scratch.get(_SCRATCH_KEY)
        if cached is not None and cached.identity is ctx.identity:
            return cached
        ctx.flags.clear()  # identity changed (e.g. after auth): earlier values are stale
        req = _RequestFlags(ctx.identity, context_key(ctx, self._gateway_type))
        ctx.scratch[_SCRATCH_KEY] = req
        return req

    def value(self, flag: str, ctx: RequestContext, default: Any) -> Any:
        req = self._request_flags(ctx)
        if flag in ctx.flags:
            return ctx.flags[flag]
        key = (self._generation, req.key, flag)
        result = self._memo.data.get(key, _MISSING)
        if result is _MISSING:
            result = self._evaluate(flag, build_ld_context(req.key), default)
            self._memo.put(key, result)
        ctx.flags[flag] = result
        return result

    def enabled(self, flag: str, ctx: RequestContext) -> bool:
        return bool(self.value(flag, ctx, self._defaults.get(flag, True)))

    def _evaluate(self, flag: str, context: Context, default: Any) -> Any:
        client = self._client
        fallback = self._defaults.get(flag, default)
        if client is None:
            return fallback
        try:
            result = client.variation(flag, context, fallback)
        except Exception:  # an SDK bug must not break the request path
            log.exception("flag %s evaluation failed; default applies", flag)
            return fallback
        return _coerce(flag, result, fallback)


_MISSING = object()


def _notifying_store_class() -> type:
    from ldclient.feature_store import InMemoryFeatureStore

    class NotifyingStore(InMemoryFeatureStore):
        """The SDK's in-memory store, telling the memo about every data change.

        (Flag-change events are not enough: a reloaded file keeps version 1 for every flag.)
        """

        def __init__(self, on_change: Callable[[], None]) -> None:
            super().__init__()
            self._on_change = on_change

        def init(self, all_data: Any) -> None:
            super().init(all_data)
            self._on_change()

        def upsert(self, kind: Any, item: Any) -> None:
            super().upsert(kind, item)
            self._on_change()

        def delete(self, kind: Any, key: str, version: int) -> None:
            super().delete(kind, key, version)
            self._on_change()

    return NotifyingStore


def _NotifyingStore(on_change: Callable[[], None]) -> Any:  # noqa: N802
    return _notifying_store_class()(on_change)


def _coerce(flag: str, result: Any, fallback: Any) -> Any:
    """A flag of the wrong type is ignored (default applies) rather than misread."""
    if flag in BOOLEAN_FLAGS and not isinstance(result, bool):
        log.warning("flag %s is not boolean (%r); default applies", flag, result)
        return fallback
    if flag == BUDGET_ALERT_THRESHOLDS:
        ok = (
            isinstance(result, list)
            and len(result) == 3
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in result)
            and list(result) == sorted(result)
            and result[0] > 0
        )
        if not ok:
            log.warning("flag %s must be three ascending numbers (%r)", flag, result)
            return fallback
        return [float(x) for x in result]
    return result


def _check_flags_file(path: Path) -> None:
    if not path.is_file():
        raise FlagsConfigError(f"FLAGS_FILE: flags file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FlagsConfigError(f"FLAGS_FILE: cannot parse {str(path)!r}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not set(data) <= {"flags", "flagValues", "segments"}:
        raise FlagsConfigError(
            f"FLAGS_FILE: {str(path)!r} must be a mapping with 'flags', 'flagValues' or 'segments'"
        )
    for key, flag in (data.get("flags") or {}).items():
        if not isinstance(flag, dict) or "on" not in flag:
            raise FlagsConfigError(
                f"FLAGS_FILE: flag {key!r} in {str(path)!r} has no \"on\" field "
                "(in YAML write it quoted: a bare on is read as true)"
            )


def create(settings: Settings) -> DefaultFlags | LaunchDarklyFlags:
    """LaunchDarkly when LAUNCHDARKLY_SDK_KEY is set; else the flags file; else all guards on."""
    if settings.launchdarkly_sdk_key is not None:
        return LaunchDarklyFlags(
            settings, sdk_key=settings.launchdarkly_sdk_key.get_secret_value()
        )
    if settings.flags_file is not None:
        _check_flags_file(settings.flags_file)
        return LaunchDarklyFlags(settings, flags_file=settings.flags_file)
    return DefaultFlags(settings)
