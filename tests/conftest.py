"""Shared test fixtures: real Redis and PostgreSQL (local or started for the run), processes."""

pytest_plugins = [
    "tests.fixtures.redis",
    "tests.fixtures.postgres",
    "tests.fixtures.processes",
    "tests.fixtures.otlp",
]
