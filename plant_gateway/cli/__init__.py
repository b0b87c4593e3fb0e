"""The ``plant-gateway`` command line: one Typer app, one module per command group.

Each module in this package exposes ``register(app)`` and adds its commands or sub-apps.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="plant-gateway",
    help="Plant Gateway: policy-enforcing API gateway.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Plant Gateway: policy-enforcing API gateway (a group even with one sub-command)."""


# One entry per command module; each owns its commands.
COMMAND_MODULES = ("serve", "token", "demo", "policy", "db", "audit", "verify")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"plant_gateway.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"plant_gateway.cli.{name}":
                continue  # command group not built yet
            raise
        module.register(app)


_register_all()


def main() -> None:
    app()
