"""The ``kimi-pool`` command line.

Commands are thin: parse, open the database (migrating it first), call a repository inside one
transaction, print. ``run(argv)`` is the whole program: every failure becomes one line on stderr
and a non-zero exit status, never a traceback. Secrets are printed masked, and never logged.
"""

import sys
from typing import Annotated

import typer

from app.cli.accounts import accounts_app
from app.cli.batch import batch_app
from app.cli.db import db_app
from app.cli.keys import keys_app
from app.cli.models import models_app
from app.cli.servers import emulate_app, serve
from app.cli.sessions import sessions_app
from app.cli.support import PROG, CliState
from app.cli.usage import usage
from app.clock import SystemClock
from app.config import DEFAULT_DB_URL
from app.errors import KimiPoolError

app = typer.Typer(name=PROG, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(accounts_app)
app.add_typer(keys_app)
app.add_typer(db_app)
app.add_typer(sessions_app)
app.add_typer(models_app)
app.add_typer(emulate_app)
app.add_typer(batch_app)
app.command("serve")(serve)
app.command("usage")(usage)


@app.callback()
def _global_options(
    ctx: typer.Context,
    db_url: Annotated[str, typer.Option(
        "--db", envvar="KIMI_POOL_DB", metavar="URL", show_default=False,
        help=f"Database URL. Default: $KIMI_POOL_DB, else {DEFAULT_DB_URL}",
    )] = DEFAULT_DB_URL,
) -> None:
    """kimi-pool: one OpenAI-compatible endpoint in front of a pool of Kimi accounts."""
    ctx.obj = CliState(db_url=db_url, clock=SystemClock())


# --- plumbing -------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> int:
    lines = str(message).strip().splitlines() or [""]
    print(f"{PROG}: error: {' '.join(line.strip() for line in lines)}", file=sys.stderr)
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=PROG, standalone_mode=False)
    except KimiPoolError as exc:
        return _fail(exc.message, 1)
    except (typer.Abort, KeyboardInterrupt):
        print(f"{PROG}: aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # click's errors, as vendored by typer
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed (rich) or is the message
            if help_text := exc.format_message().strip():
                print(help_text, file=sys.stderr)
            return 2
        if ctx is None:
            return _fail(exc.format_message(), exc.exit_code or 1)
        return _fail(f"{exc.format_message()} (see '{ctx.command_path} --help')", exc.exit_code or 2)
    except Exception as exc:  # a bug: still one line (no traceback, no bound SQL parameters)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return _fail(f"unexpected {type(exc).__name__}: {first_line}", 1)
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run())
