"""Benchmark harness: the gateway next to its baselines (backend, nginx, Envoy, Traefik).

Run with ``python -m bench [--quick] [--mix ...]``; the table lands in bench/results/latest.md.
"""
