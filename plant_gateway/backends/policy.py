"""Policy engine factory: in-process Rego by default; with ``OPA_SERVICE_URL`` a remote OPA.

A remote OPA either serves our bundle at ``OPA_DECISION_PATH`` (set it), or is the deployed
OPA with its own packages (leave it unset): then ``policy_packages`` combines them with our
bundle evaluated in-process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plant_gateway.backends.base import PolicyEngine
    from plant_gateway.settings import Settings


def create(settings: Settings) -> PolicyEngine:
    """Raises ``PolicyBundleError`` (a ``SettingsError``) when the local bundle does not compile."""
    from plant_gateway.backends.policy_local import LocalPolicyEngine

    if not settings.opa_service_url:
        return LocalPolicyEngine(settings)
    from plant_gateway.backends.policy_remote import RemotePolicyEngine

    remote = RemotePolicyEngine(settings)
    if settings.opa_decision_path:
        return remote
    from plant_gateway.backends.policy_packages import PackagesPolicyEngine

    return PackagesPolicyEngine(settings, LocalPolicyEngine(settings), remote)
