"""Unit tests of plant_gateway.counters, one module per module of the package."""
