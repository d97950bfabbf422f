"""``kimi-pool keys``: the API keys clients use to call kimi-pool."""

import json
from typing import Annotated

import typer
from rich.table import Table

from app.cli.support import cli_state as _state
from app.cli.support import console as _console
from app.cli.support import human_time as _human_time
from app.cli.support import in_db as _in_db
from app.store.repository import ClientKeyRepository
from app.views import key_view

keys_app = typer.Typer(name="keys", no_args_is_help=True,
                       help="Manage the API keys clients use to call kimi-pool.")


@keys_app.command("create")
def keys_create(ctx: typer.Context, name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Create a client API key and print it. Only its hash is stored: it is shown this once."""
    key = _in_db(ctx, lambda session, now: ClientKeyRepository(session).create(name, now), change=True)
    typer.echo(key)
    typer.echo(f"key {name} created; it will not be shown again, so store it now", err=True)


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List client API keys (by prefix; the keys themselves are not stored)."""
    rows = _in_db(ctx, lambda session, _now: ClientKeyRepository(session).list())
    now = _state(ctx).clock.time()
    views = [key_view(row) for row in rows]
    if as_json:
        typer.echo(json.dumps(views, indent=2))
        return
    if not views:
        typer.echo("no keys yet: create one with 'kimi-pool keys create NAME'")
        return
    table = Table("name", "key", "created", "status")
    for view in views:
        status = "active" if view["revoked_at"] is None else f"revoked {_human_time(view['revoked_at'], now)}"
        table.add_row(view["name"], f"{view['prefix']}…", _human_time(view["created_at"], now), status)
    _console().print(table)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Revoke a client API key; requests with it are refused from then on."""
    revoked = _in_db(ctx, lambda session, now: ClientKeyRepository(session).revoke(name, now), change=True)
    typer.echo(f"revoked key {name}" if revoked else f"key {name} was already revoked")
