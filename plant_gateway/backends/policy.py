"""Policy engine factory: remote OPA when ``OPA_SERVICE_URL`` is set, in-process Rego otherwise.

Both evaluate the same bundle (``policies/``) at the same decision path (``OPA_DECISION_PATH``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plant_gateway.backends.base import PolicyEngine
    from plant_gateway.settings import Settings


def create(settings: Settings) -> PolicyEngine:
    """Raises ``PolicyBundleError`` (a ``SettingsError``) when the local bundle does not compile."""
    if settings.opa_service_url:
        from plant_gateway.backends.policy_remote import RemotePolicyEngine

        return RemotePolicyEngine(settings)
    from plant_gateway.backends.policy_local import LocalPolicyEngine

    return LocalPolicyEngine(settings)
