"""IP access: a per-route allow/deny list of client networks (CIDRs), refused with a 403.

The client address is the one ingress worked out through the trusted proxy hops
(``TRUSTED_PROXY_HOPS``; on Cloud Run the load balancer's), never one the caller can choose.
A rule applies to the routes it names; its ``deny`` networks win over its ``allow`` ones, and a
non-empty ``allow`` admits only its networks (as Kong's ip-restriction and nginx's allow/deny
do). An address that does not parse is refused by every rule that applies (deny by default);
an IPv4-mapped IPv6 address counts as its IPv4 address. Opt-in: add ``ip_access`` to
``PLANT_GUARDS`` and set ``IP_ACCESS_RULES``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, field_validator, model_validator

from plant_gateway import routing
from plant_gateway.context import RequestContext
from plant_gateway.pipeline.step import GuardSpec, Phase
from plant_gateway.problems import Problem
from plant_gateway.routing import RouteSet
from plant_gateway.settings import GuardSettings, env_alias

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_NETWORKS = 10_000  # per rule: a list meant for a firewall does not belong here


class IpAccessRule(BaseModel):
    """One entry of ``IP_ACCESS_RULES``: the routes it guards and the networks it allows or
    denies, e.g. ``{"routes": ["/api/v1/admin/*"], "allow": ["10.0.0.0/8"]}``."""

    routes: list[str] = Field(min_length=1)
    allow: list[str] = Field(default_factory=list, max_length=MAX_NETWORKS)
    deny: list[str] = Field(default_factory=list, max_length=MAX_NETWORKS)

    @field_validator("routes")
    @classmethod
    def _route_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            routing.parse(pattern)  # ValueError names the bad pattern
        return value

    @field_validator("allow", "deny")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_network(text)
        return value

    @model_validator(mode="after")
    def _says_something(self) -> IpAccessRule:
        if not self.allow and not self.deny:
            raise ValueError(f"the rule for {self.routes} has neither 'allow' nor 'deny'")
        return self


class IpAccessSettings(GuardSettings):
    """The guard's own variable: ``IP_ACCESS_RULES`` (a JSON list, or a list in PLANT_CONFIG)."""

    rules: list[IpAccessRule] = Field(
        default_factory=list, validation_alias=env_alias("IP_ACCESS_RULES")
    )


def parse_network(text: str) -> Network:
    """A CIDR (or one address); ValueError naming it, also for host bits set (a typo)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a network in CIDR notation: {exc}") from None


def parse_address(text: str) -> Address | None:
    """The client address, an IPv4-mapped IPv6 one as IPv4; None when it does not parse."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class CompiledRule:
    routes: RouteSet
    allow: tuple[Network, ...]
    deny: tuple[Network, ...]

    def admits(self, address: Address | None) -> bool:
        if address is None:
            return False
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)


@dataclass(frozen=True, slots=True)
class IpAccessConfig:
    rules: tuple[CompiledRule, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> IpAccessConfig:
        section = settings.section(IpAccessSettings)
        return cls(tuple(
            CompiledRule(
                RouteSet(list(rule.routes)),
                tuple(parse_network(n) for n in rule.allow),
                tuple(parse_network(n) for n in rule.deny),
            )
            for rule in section.rules
        ))


def not_allowed(ctx: RequestContext) -> Problem:
    """The 403, which does not echo the address; the audit row's ``error_type`` says why."""
    ctx.error_type = "ip-not-allowed"
    return Problem(403, "forbidden", "this route is not open to the client's network")


class IpAccessStep:
    name = "ip_access"

    def __init__(self, config: IpAccessConfig) -> None:
        self.rules = config.rules

    async def run(self, ctx: RequestContext) -> Problem | None:
        path, method = ctx.upstream_path or ctx.path, ctx.method
        applying = [rule for rule in self.rules if rule.routes(path, method)]
        if not applying:
            return None
        address = parse_address(ctx.client_ip)
        if all(rule.admits(address) for rule in applying):
            return None
        return not_allowed(ctx)


def build(config: IpAccessConfig, deps: Dependencies) -> IpAccessStep | None:
    return IpAccessStep(config) if config.rules else None


GUARD = GuardSpec(
    name="ip_access", phase=Phase.ACCESS, config=IpAccessConfig.from_settings, build=build,
    default_on=False, section=IpAccessSettings,
)
