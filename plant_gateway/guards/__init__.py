"""The guards of the request path, one self-contained module each (see README → Adding a guard).

A guard module declares ``GUARD`` (its name, switch, phase, typed config, builder); it imports
shared plumbing from ``plant_gateway.pipeline``, never another guard.
"""
