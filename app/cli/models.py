"""``kimi-pool models``: the model catalogue — which names clients may ask for, and who serves them."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts_config import ACCOUNT_KINDS, make_alias
from app.catalogue import BUILTIN_ALIASES
from app.cli.support import console as _console
from app.cli.support import in_db as _in_db
from app.cli.support import warn
from app.errors import ConfigError
from app.store.repository import AliasRepository, UpsertResult
from app.views import catalogue_view, unserved_alias

models_app = typer.Typer(name="models", no_args_is_help=True,
                         help="The model catalogue: aliases served by accounts of every kind.")


@models_app.command("list")
def models_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every model name clients may ask for, with the accounts that serve it and under which upstream id. An
    alias that no account serves, or whose target an account kind no longer offers (its upstream retired the
    id), is flagged in the last column."""

    views = _in_db(ctx, lambda session, _now: catalogue_view(session))
    if as_json:
        typer.echo(json.dumps(views, indent=2, ensure_ascii=False))
        return
    table = Table("model", "alias of", "served by", "warning")
    for view in views:
        alias = view["alias"]
        targets = ", ".join(f"{kind}: {model}" for kind, model in alias.items()) if alias else "-"
        table.add_row(view["model"], targets, ", ".join(view["accounts"]) or "no account yet", view["warning"] or "")
    _console().print(table)


@models_app.command("alias")
def models_alias(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The model name clients will ask for.", show_default=False)],
    moonshot: Annotated[str | None, typer.Option(metavar="ID", help="Served by moonshot accounts as ID.")] = None,
    kimi_web: Annotated[str | None, typer.Option(
        metavar="ID", help="Served by kimi-web accounts as ID (kimi-k2, kimi-k2.5[-thinking], kimi-k2.6[-thinking]).")]
    = None,
    kimi_ai_chat: Annotated[str | None, typer.Option(
        metavar="ID", help="Served by kimi-ai-chat accounts as ID (kimi-k2-instruct-0905, kimi-k2-instruct).")]
    = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Keep it even if no account serves it (yet): it is served once one does.")] = False,
) -> None:
    """Create or replace an alias. One that no account would serve (a target no account offers: see
    'models list') is refused unless --force. A running server serves it at once."""
    targets = {kind: model for kind, model in zip(ACCOUNT_KINDS, (moonshot, kimi_web, kimi_ai_chat), strict=True)
               if model is not None}
    if not targets:
        raise ConfigError("give at least one of --moonshot, --kimi-web, --kimi-ai-chat")
    alias = make_alias(name, targets)

    async def put(session: AsyncSession, now: float) -> tuple[UpsertResult, str | None]:
        warning = await unserved_alias(session, alias, force=force, flag="--force")
        return await AliasRepository(session).put(alias, now), warning

    result, warning = _in_db(ctx, put, change=True)
    typer.echo(f"alias {name} {result}: " + ", ".join(f"{kind} as {model}" for kind, model in alias.targets.items()))
    if warning:
        warn(f"alias {name}: {warning}")


@models_app.command("unalias")
def models_unalias(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The alias to remove.", show_default=False)],
) -> None:
    """Remove an alias (a built-in one is hidden)."""

    async def remove(session: AsyncSession, now: float) -> bool:
        repo = AliasRepository(session)
        if name in BUILTIN_ALIASES:
            await repo.put(make_alias(name, {}), now)
            return True
        return await repo.remove(name)

    if not _in_db(ctx, remove, change=True):
        raise ConfigError(f"no alias named {name}")
    typer.echo(f"removed alias {name}")
