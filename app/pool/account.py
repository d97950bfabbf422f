"""One upstream account as the pool sees it: its spec, its state machine, what it has in flight.

States and the transitions allowed between them are explicit; anything else raises
``IllegalTransition``. ``disabled`` is the operator's; the others are the server's judgement.
"""

from __future__ import annotations

from enum import StrEnum

from app.accounts_config import AccountSpec
from app.capabilities import capabilities
from app.catalogue import Catalogue
from app.pool.limits import Learned, Limits


class State(StrEnum):
    ACTIVE = "active"
    COOLING_DOWN = "cooling_down"
    QUOTA_EXHAUSTED = "quota_exhausted"
    AUTH_DEAD = "auth_dead"
    DISABLED = "disabled"


_ALLOWED: dict[State, frozenset[State]] = {
    State.ACTIVE: frozenset({State.COOLING_DOWN, State.QUOTA_EXHAUSTED, State.AUTH_DEAD, State.DISABLED}),
    State.COOLING_DOWN: frozenset(
        {State.ACTIVE, State.COOLING_DOWN, State.QUOTA_EXHAUSTED, State.AUTH_DEAD, State.DISABLED}
    ),
    State.QUOTA_EXHAUSTED: frozenset({State.ACTIVE, State.QUOTA_EXHAUSTED, State.AUTH_DEAD, State.DISABLED}),
    State.AUTH_DEAD: frozenset({State.ACTIVE, State.DISABLED}),
    State.DISABLED: frozenset({State.ACTIVE}),
}


Runtime = tuple[str, float | None, str | None]
"""An account's runtime state as stored: (state, until, reason)."""


class IllegalTransition(RuntimeError):
    pass


class Account:
    """Mutable runtime view of an account. Only the pool changes it."""

    __slots__ = (
        "capabilities", "discovered", "in_flight", "kind", "limits", "limits_rev", "models", "name", "reason", "rev",
        "secret", "spec", "state", "stored", "streak", "until", "upstream_models", "weight",
    )

    def __init__(
        self,
        spec: AccountSpec,
        secret: str | None,
        *,
        rev: int = 1,
        state: State = State.ACTIVE,
        until: float | None = None,
        reason: str | None = None,
        catalogue: Catalogue | None = None,
        discovered: tuple[str, ...] | list[str] | None = None,
        learned: Learned | None = None,
        limits_rev: int = 0,
    ) -> None:
        """``discovered``: the models its upstream said it serves; ``learned``: the limits the server had
        learned of it (both as stored with the account); ``limits_rev``: bumped when an operator makes the
        server forget learned limits."""
        self.spec = spec
        self.secret = secret
        self.name = spec.name
        self.kind = spec.kind
        self.discovered = discovered
        self.upstream_models = (catalogue or Catalogue()).served_by(spec, discovered)
        """Every model name this account answers to (aliases included) → the upstream's id for it."""
        self.models = frozenset(self.upstream_models)
        self.capabilities = {name: capabilities(spec.kind, upstream)
                             for name, upstream in self.upstream_models.items()}
        """Model name → what this account can do when it serves it (``app.capabilities``)."""
        self.weight = spec.weight
        self.limits = Limits(spec, learned)
        self.limits_rev = limits_rev
        self.rev = rev
        self.state = state
        self.until = until
        self.reason = reason
        self.in_flight = 0
        self.streak = 0
        """Consecutive rate-limit answers; escalates cooldowns, reset by a success."""
        self.stored: int | None = None
        """The revision of the runtime state stored for this account (``state_rev``), as far as this
        server knows: read with the row, or written by this server since. A state write expects to
        find it there, so it never overwrites a state someone else (a probe, an operator) wrote since."""

    @property
    def runtime(self) -> Runtime:
        """The state as the database stores it."""
        return (self.state.value, self.until, self.reason)

    def __repr__(self) -> str:
        return f"<Account {self.name} {self.state} in_flight={self.in_flight}>"

    # --- reading -------------------------------------------------------------------------------

    def refresh(self, now: float) -> bool:
        """Return to service if a timed state has run out; True if the state changed."""
        if self.state in (State.COOLING_DOWN, State.QUOTA_EXHAUSTED) and self.until is not None and now >= self.until:
            self._move(State.ACTIVE, None, None)
            return True
        return False

    def can(self, model: str, needs: frozenset[str]) -> bool:
        """Whether it serves ``model`` with everything the request needs."""
        can = self.capabilities.get(model)
        return can is not None and needs <= can

    def has_room(self) -> bool:
        return self.limits.has_room(self.in_flight)

    def could_serve_later(self) -> bool:
        """Not dead, not disabled, not out of quota without an end: it may serve once time passes."""
        if self.state in (State.AUTH_DEAD, State.DISABLED):
            return False
        return not (self.state is State.QUOTA_EXHAUSTED and self.until is None)

    def free_at(self, now: float) -> float | None:
        """Earliest time this account could take a request, None if it cannot without an operator."""
        if not self.could_serve_later():
            return None
        if self.state is State.ACTIVE:
            return now
        return self.until

    # --- transitions ---------------------------------------------------------------------------

    def _move(self, state: State, until: float | None, reason: str | None) -> None:
        if state not in _ALLOWED[self.state]:
            raise IllegalTransition(f"account {self.name}: {self.state} -> {state} is not allowed")
        self.state = state
        self.until = until
        self.reason = reason

    def cool_down(self, until: float, reason: str) -> None:
        self._move(State.COOLING_DOWN, until, reason)

    def exhaust(self, until: float | None, reason: str) -> None:
        self._move(State.QUOTA_EXHAUSTED, until, reason)

    def kill(self, reason: str) -> None:
        self._move(State.AUTH_DEAD, None, reason)

    def disable(self, reason: str | None) -> None:
        self._move(State.DISABLED, None, reason)

    def enable(self) -> None:
        self._move(State.ACTIVE, None, None)
        self.streak = 0
