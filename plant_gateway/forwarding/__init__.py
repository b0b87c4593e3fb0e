"""Forwarding: requests to their upstream and the answers back (HTTP and WebSockets).

The rest of the gateway needs only the names below; the modules hold the details.
"""

from plant_gateway.forwarding.deadlines import ClientLink
from plant_gateway.forwarding.id_tokens import IdTokenSource
from plant_gateway.forwarding.proxy import Proxy
from plant_gateway.forwarding.relay import ResponseStarted

__all__ = ["ClientLink", "IdTokenSource", "Proxy", "ResponseStarted"]
