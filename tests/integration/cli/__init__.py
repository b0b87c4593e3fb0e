"""Integration tests of plant_gateway.cli commands against real Redis."""
