"""``kimi-pool db``: database maintenance."""

import asyncio

import typer

from app.cli.support import cli_state as _state
from app.store.db import Database

db_app = typer.Typer(name="db", no_args_is_help=True, help="Database maintenance.")


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the database schema to the latest revision (safe to repeat)."""

    async def upgrade() -> tuple[str, str | None]:
        database = Database(_state(ctx).db_url)
        try:
            return database.display_url, await database.upgrade()
        finally:
            await database.dispose()

    url, revision = asyncio.run(upgrade())
    typer.echo(f"{url}: schema at revision {revision}")
