"""Shared test fixtures: real Redis and PostgreSQL (local or started for the run)."""
