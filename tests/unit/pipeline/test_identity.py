"""Unit tests of plant_gateway.pipeline.identity: the request's copy of a cached Identity, and
whom limits and quotas count (the principal)."""

from __future__ import annotations

from plant_gateway.context import Identity, RequestContext
from plant_gateway.pipeline.identity import (
    cached_identity,
    copy_identity,
    principal_of,
    remember_cached,
)


def context() -> RequestContext:
    return RequestContext(request_id="r", correlation_id="c", method="GET", path="/api/v1/x",
                          query_string="", headers={}, client_ip="127.0.0.1")


def test_a_copy_is_equal_but_never_shares_its_roles_list() -> None:
    cached = Identity(user_id="u", roles=["user"], customer_id="cust", claims={"sub": "u"})
    copy = copy_identity(cached)
    assert copy == cached and copy is not cached
    copy.roles.append("admin")  # a later step changing the request's roles
    assert cached.roles == ["user"]


def test_the_cached_identity_only_while_the_request_keeps_its_copy() -> None:
    cached = Identity(user_id="u", roles=["user"])
    ctx = context()
    assert cached_identity(ctx) is None  # no token verified
    ctx.identity = copy_identity(cached)
    remember_cached(ctx, ctx.identity, cached)
    assert cached_identity(ctx) is cached
    ctx.identity = Identity(user_id="someone-else")  # a step that swaps the identity
    assert cached_identity(ctx) is None


def test_principal_is_the_user_else_the_service_account_else_the_subject() -> None:
    assert principal_of(Identity(user_id="u", service_account="sa", subject="s")) == "u"
    assert principal_of(Identity(service_account="sa", subject="s")) == "sa"
    assert principal_of(Identity(subject="s")) == "s"
    assert principal_of(Identity()) is None
