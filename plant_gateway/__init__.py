"""Plant Gateway: a policy-enforcing API gateway in front of the Plant backend.

Each request flows through a flat pipeline of steps (see ``plant_gateway.app``).
"""

__version__ = "0.1.0"
