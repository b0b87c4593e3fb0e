"""Forwarding: requests to their upstream and the answers back (HTTP, WebSockets).

The rest of the gateway needs only the names below; the modules hold the details.
"""

from plant_gateway.forwarding.proxy import ClientLink, IdTokenSource, Proxy, ResponseStarted

__all__ = ["ClientLink", "IdTokenSource", "Proxy", "ResponseStarted"]
