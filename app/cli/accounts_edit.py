"""``kimi-pool accounts edit`` and ``accounts reset-limits``: change an account in place."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from app.account_changes import changed, differences
from app.accounts_config import AccountSpec
from app.cli.discovery import NoDiscover, discover_models, told, warn_unset
from app.cli.support import in_db as _in_db
from app.errors import ConfigError
from app.store.repository import AccountRepository, reaches_differently
from app.views import account_view, learned_text

UNSETTABLE = {"rpm": "rpm", "tpm": "tpm", "tpd": "tpd", "concurrency": "concurrency", "weight": "weight",
              "base-url": "base_url", "proxy": "proxy", "models": "models",
              "max-message-chars": "max_message_chars", "keep-chats": "keep_chats"}
"""What ``accounts edit --unset`` puts back to its default → the account field."""


def accounts_edit(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(show_default=False)],
    api_key: Annotated[str | None, typer.Option(metavar="KEY", help="A new API key, or env:VAR.")] = None,
    token: Annotated[str | None, typer.Option(metavar="JWT", help="A new kimi-auth token, or env:VAR.")] = None,
    base_url: Annotated[str | None, typer.Option(metavar="URL", help="Instead of the kind's.")] = None,
    model: Annotated[list[str] | None, typer.Option(
        metavar="ID", help="The models it serves, whatever its upstream lists (repeat; replaces the list).")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    tpd: Annotated[int | None, typer.Option(help="Tokens per day.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight at once.")] = None,
    weight: Annotated[float | None, typer.Option(help="Share of the traffic, relative to other accounts.")] = None,
    proxy: Annotated[str | None, typer.Option(metavar="URL", help="http(s) proxy for upstream traffic.")] = None,
    max_message_chars: Annotated[int | None, typer.Option(
        help="kimi-ai-chat: cut the flattened conversation to this length.")] = None,
    keep_chats: Annotated[bool | None, typer.Option(
        "--keep-chats/--delete-chats", help="kimi-web: keep the chats of one-off requests on kimi.com.",
        show_default=False)] = None,
    unset: Annotated[list[str] | None, typer.Option(
        metavar="FIELD", help=f"Put a field back to its default (repeat): {', '.join(UNSETTABLE)}.")] = None,
    no_discover: NoDiscover = False,
) -> None:
    """Change an account in place, checked as 'accounts add' checks a new one. A new key or token also clears
    a dead, cooling or exhausted state; with a new key, token or base URL the upstream is asked again which
    models it serves. A running server picks the change up within seconds."""
    if api_key is not None and token is not None:
        raise ConfigError("give only one of --api-key and --token")
    given: dict[str, Any] = {
        "api_key": api_key, "token": token, "base_url": base_url, "models": model, "rpm": rpm, "tpm": tpm,
        "tpd": tpd, "concurrency": concurrency, "weight": weight, "proxy": proxy,
        "max_message_chars": max_message_chars, "keep_chats": keep_chats}
    changes = {field: value for field, value in given.items() if value is not None}
    for flag in unset or []:
        field = UNSETTABLE.get(flag)
        if field is None:
            raise ConfigError(f"cannot unset {flag!r}: one of {', '.join(UNSETTABLE)}")
        if field in changes:
            raise ConfigError(f"give --{flag} or --unset {flag}, not both")
        changes[field] = None
    if not changes:
        raise ConfigError("nothing to change: give the options to change (see 'kimi-pool accounts edit --help')")

    async def edit(session: AsyncSession, now: float) -> tuple[AccountSpec, AccountSpec]:
        repo = AccountRepository(session)
        before = repo.to_spec(await repo.get(name))
        after = changed(before, changes, now)
        await repo.upsert(after, now)
        return before, after

    # a replaced key or proxy login must not linger in the database's files
    before, after = _in_db(ctx, edit, scrub=bool({"api_key", "token", "proxy"} & set(changes)), change=True)
    warn_unset(after)
    what = differences(before, after)
    if not what:
        typer.echo(f"account {name} unchanged")
        return
    said = ""
    if reaches_differently(before, after) and not no_discover:
        found = discover_models(ctx, after)
        if found.models is not None:
            _in_db(ctx, lambda session, now: AccountRepository(session).set_models(name, found.models or (), now),
                   change=True)
            said = told(found)
    typer.echo(f"changed account {name}: {'; '.join(what)}{said}")


def accounts_reset_limits(ctx: typer.Context, name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Forget the limits learned from the upstream's 429s (a "max RPM: 3" answer lowers an account's rpm until
    it recovers, a tenth every 5 minutes): its configured limits hold again. A running server forgets them
    within seconds, those it had not stored yet included."""

    async def reset(session: AsyncSession, now: float) -> dict[str, Any]:
        repo = AccountRepository(session)
        learned = account_view(await repo.get(name), now)["learned_limits"]
        await repo.reset_limits(name, now)
        return learned

    learned = _in_db(ctx, reset, change=True)
    if learned:
        typer.echo(f"forgot the limits learned for account {name} ({learned_text(learned)})")
    else:
        typer.echo(f"account {name} had no learned limits stored; a running server forgets any it holds")
