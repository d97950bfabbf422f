"""The log's account of the pool: a WARNING when an account stops serving, an INFO when it is back.

A state listener of the pool (``Pool.on_state_change``): an account that is found dead (its key
or token refused), out of quota, or cooling down for more than a minute gets one WARNING line with
the upstream's reason (redacted: it may quote what it was sent); when it serves again, one INFO
line. The same state again (a cooldown extended, a second 429 while out of quota) says nothing new,
and a short cooldown (a 429 that a minute fixes) is routine, not news: the access and upstream lines
have it. The pool calls this on its own judgements; a change made with the CLI or the admin API
reaches the log as the sync's "account … loaded" line.
"""

from __future__ import annotations

import logging

from app.clock import Clock
from app.pool.account import Account, State
from app.redact import redact
from app.when import span, utc

LONG_COOLDOWN = 60.0
"""A cooldown longer than this many seconds is worth a warning."""


class AccountLog:
    def __init__(self, clock: Clock, logger: logging.Logger | None = None) -> None:
        self._clock = clock
        self._log = logger or logging.getLogger("kimi_pool.accounts")
        self._said: dict[str, tuple[int, State]] = {}
        """Account → the config revision and the state last said of it (a new revision, loaded from the
        database, starts afresh)."""

    def __call__(self, account: Account) -> None:
        said = self._said.get(account.name)
        if said is not None and said[0] != account.rev:
            said = None
        state = account.state
        if said is not None and said[1] is state:
            return
        if state is State.ACTIVE:
            if said is not None:
                self._log.info("account %s is back in service (it was %s)", account.name, said[1].value)
                del self._said[account.name]
            return
        line = self._line(account)
        if line is None:
            return
        self._said[account.name] = (account.rev, state)
        self._log.log(logging.INFO if state is State.DISABLED else logging.WARNING, "account %s %s", account.name,
                      line)

    def _line(self, account: Account) -> str | None:
        now = self._clock.time()
        reason = redact(account.reason) if account.reason else "no reason given"
        if account.state is State.AUTH_DEAD:
            return (f"is out of service: its credential was refused ({reason}); fix it and enable it again "
                    "(kimi-pool accounts enable)")
        if account.state is State.QUOTA_EXHAUSTED:
            until = ("until an operator enables it again" if account.until is None
                     else f"until {utc(account.until)} (in {span(account.until - now)})")
            return f"is out of quota {until}: {reason}"
        if account.state is State.COOLING_DOWN:
            if account.until is None or account.until - now <= LONG_COOLDOWN:
                return None
            return f"is cooling down for {span(account.until - now)} (until {utc(account.until)}): {reason}"
        if account.state is State.DISABLED:
            return f"is disabled: {reason}"
        return None
