"""One model catalogue over every account kind. Pure logic; opens nothing.

Clients ask for a model by name. Each account serves the model ids its operator listed, else the ones
its upstream says it serves (``app.discovery``), else its kind's usual ones; and also every *alias* whose
target for that kind is one of them: the alias ``kimi-k2`` is served by a ``moonshot`` account as
``kimi-k2-0905-preview``, by a ``kimi-web`` account as ``kimi-k2`` (its K2 scenario) and by a
``kimi-ai-chat`` account as ``kimi-k2-instruct-0905``, so one pool mixing the three kinds serves it.

Built-in aliases ship with kimi-pool; operators add or override aliases in ``accounts.toml``
(``[aliases.NAME]``) or with ``kimi-pool models alias``. An alias with no targets hides a built-in.
A name an account serves natively is never shadowed by an alias on that account. An alias whose target
no account offers is flagged (``alias_warning``): ``models list`` shows it, ``models alias`` refuses it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from app.accounts_config import AccountSpec, AliasSpec

BUILTIN_ALIASES: Mapping[str, Mapping[str, str]] = {
    "kimi-k2": {
        "moonshot": "kimi-k2-0905-preview",
        "kimi-web": "kimi-k2",
        "kimi-ai-chat": "kimi-k2-instruct-0905",
    },
    "kimi-k2-thinking": {
        "moonshot": "kimi-k2-thinking",
        "kimi-web": "kimi-k2.5-thinking",
    },
}


@dataclass(frozen=True, slots=True)
class Catalogue:
    aliases: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: dict(BUILTIN_ALIASES))
    """alias → account kind → upstream model id."""

    @classmethod
    def with_overrides(cls, overrides: Iterable[AliasSpec]) -> Catalogue:
        """The built-in aliases, then the operator's: same name replaces, no targets removes."""
        aliases = {name: dict(targets) for name, targets in BUILTIN_ALIASES.items()}
        for alias in overrides:
            if alias.targets:
                aliases[alias.name] = dict(alias.targets)
            else:
                aliases.pop(alias.name, None)
        return cls(aliases)

    def served_by(self, spec: AccountSpec, discovered: tuple[str, ...] | list[str] | None = None) -> dict[str, str]:
        """Every model name ``spec``'s account answers to → the upstream id it sends for it. ``discovered``:
        what its upstream said it serves (``AccountSpec.effective_models``)."""
        native = spec.effective_models(discovered)
        served = {model: model for model in native}
        for name, targets in self.aliases.items():
            target = targets.get(spec.kind)
            if target is not None and target in native and name not in served:
                served[name] = target
        return served


def alias_served(targets: Mapping[str, str], offered: Mapping[str, Collection[str]]) -> bool:
    """Whether some account would serve an alias of ``targets`` (``offered``: as for ``alias_warning``)."""
    return any(target in offered.get(kind, ()) for kind, target in targets.items())


def alias_warning(targets: Mapping[str, str], offered: Mapping[str, Collection[str]]) -> str | None:
    """What is wrong with an alias, given ``offered`` (account kind → every model id its accounts serve, for the
    kinds the pool has): None if it is served and each target is offered by its kind's accounts; else which
    targets are not (an upstream retired the id, or there is no account of that kind)."""
    stale = [f"{kind} accounts do not offer {target}" for kind, target in targets.items()
             if kind in offered and target not in offered[kind]]
    if alias_served(targets, offered):
        return "; ".join(stale) or None
    absent = [kind for kind in targets if kind not in offered]
    return "no account serves it (" + "; ".join(stale + ([f"no {' or '.join(absent)} account"] if absent else [])) + ")"
