"""What every ``plant-gateway`` command shares: one-line failures, exit codes, plain help.

Exit codes: 0 success, 1 a runtime failure (a database or Redis that does not answer, a failed
check), 2 a usage or configuration error. Every failure is one line on stderr naming the
setting or the cause; ``PLANT_TRACEBACK=1`` adds the traceback of an unexpected error.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import typer

RUNTIME_FAILURE = 1
USAGE_ERROR = 2
INTERRUPTED = 130


def sub_app(help_text: str) -> typer.Typer:
    """A command group with plain help (typer's rich help printed ``<bool>`` after flags)."""
    return typer.Typer(
        help=help_text, no_args_is_help=True, rich_markup_mode=None,
        pretty_exceptions_enable=False,
    )


def fail(message: str, code: int = RUNTIME_FAILURE) -> NoReturn:
    """Print ``error: message`` as one line on stderr and end the command with ``code``."""
    _stop(f"error: {message}", code)


def usage_fail(message: str) -> NoReturn:
    """A usage error (bad or missing option): ``error: ...`` and exit code 2."""
    fail(message, USAGE_ERROR)


def config_fail(message: str) -> NoReturn:
    """A configuration error: ``config error: SETTING: what is wrong`` and exit code 2."""
    _stop(f"config error: {message}", USAGE_ERROR)


def _stop(line: str, code: int) -> NoReturn:
    typer.echo(one_line(line), err=True)
    raise typer.Exit(code)


def one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


def run(app: typer.Typer, args: list[str] | None = None) -> int:
    """Run ``app`` and turn every way it can end into an exit code and at most one line."""
    try:
        result = app(args=args, prog_name="plant-gateway", standalone_mode=False)
    except typer.TyperException as exc:  # typer's (vendored) click errors: usage and others
        return _usage_error(exc)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return RUNTIME_FAILURE
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug, still one line
        if os.environ.get("PLANT_TRACEBACK"):
            raise
        typer.echo(
            f"error: unexpected {type(exc).__name__}: {one_line(str(exc))} "
            "(PLANT_TRACEBACK=1 shows where)", err=True,
        )
        return RUNTIME_FAILURE
    return _exit_code(result)


def _usage_error(exc: typer.TyperException) -> int:
    code = int(getattr(exc, "exit_code", RUNTIME_FAILURE))
    if type(exc).__name__ == "NoArgsIsHelpError":  # a group without its command: its help
        typer.echo(exc.format_message(), err=True)
        return code
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None and code == USAGE_ERROR else ""
    message = one_line(exc.format_message()).replace("Value error, ", "")
    typer.echo(f"error: {message}{hint}", err=True)
    return code


def _exit_code(result: Any) -> int:
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main(app: typer.Typer) -> NoReturn:
    # A command names its own failure in one line; the outage lines a server logs (events:
    # "dependency down", ...) would be a second one through logging's last-resort handler.
    # ``serve`` still logs them: its root handler receives what this NullHandler lets pass.
    logging.getLogger("plant_gateway.events").addHandler(logging.NullHandler())
    sys.exit(run(app))
