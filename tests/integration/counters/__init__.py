"""Integration tests of plant_gateway.counters on a real Redis (standalone and Cluster)."""
