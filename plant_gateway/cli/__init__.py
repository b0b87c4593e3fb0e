"""The ``plant-gateway`` command line: one Typer app, one module per command group.

Each module in this package exposes ``register(app)`` and adds its commands or sub-apps;
``common`` holds what they share (one-line failures, exit codes: see ``common.run``).
"""

from __future__ import annotations

import importlib

import typer

from plant_gateway.cli import common

app = typer.Typer(
    name="plant-gateway",
    help="Plant Gateway: policy-enforcing API gateway.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: the rich one printed <bool> after every flag
    pretty_exceptions_enable=False,
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
    """The console script: every failure ends as one line and an exit code (``common.run``)."""
    common.main(app)
