"""Integration tests of plant_gateway.backends against real local servers (OPA, JWKS, approvals)."""
