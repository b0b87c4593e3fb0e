"""The verified caller as later guards see it: the principal, and the per-token cached Identity.

Auth puts ``(request copy, cached original)`` in ``ctx.scratch``; guards that work per token
(rate-limit keys, the policy input, the audit row) key their memos on the cached original.
"""

from __future__ import annotations

from dataclasses import fields
from operator import attrgetter

from plant_gateway.context import Identity, RequestContext

CACHED_IDENTITY = "auth.cached_identity"
_IDENTITY_FIELDS = attrgetter(*(f.name for f in fields(Identity)))


def copy_identity(identity: Identity) -> Identity:
    """A request's own copy of a cached Identity (its roles list too), field by field."""
    copy = Identity(*_IDENTITY_FIELDS(identity))
    copy.roles = list(copy.roles)
    return copy


def remember_cached(ctx: RequestContext, copy: Identity, cached: Identity) -> None:
    """``copy`` (now ``ctx.identity``) is an untouched copy of the claims cache's ``cached``."""
    ctx.scratch[CACHED_IDENTITY] = (copy, cached)


def cached_identity(ctx: RequestContext) -> Identity | None:
    """The claims cache's Identity that ``ctx.identity`` is an untouched copy of, else None.

    It lives as long as its token's cache entry (one object per verified token), is never
    handed to a request and never mutated: later steps may key per-token work on it (``is``).
    """
    found = ctx.scratch.get(CACHED_IDENTITY)
    if found is None or found[0] is not ctx.identity:
        return None
    cached: Identity = found[1]
    return cached


def principal_of(identity: Identity) -> str | None:
    """Whom limits and quotas count: the user, else the service account, else the subject."""
    return identity.user_id or identity.service_account or identity.subject
