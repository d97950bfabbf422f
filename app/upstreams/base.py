"""The upstream interface and the neutral events every adapter speaks.

An adapter turns a ``ChatRequest`` into the upstream's wire format, and the upstream's answer into
neutral events (``Delta``, ``Finish``, ``Usage``) or one ``Completion``. It classifies every failure
once, into the ``UpstreamError`` subclasses of ``app.errors``. The dispatcher never knows which kind
of upstream it is talking to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.pool.account import Account


@dataclass(slots=True)
class ChatRequest:
    """A validated OpenAI chat request, neutral of any upstream."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    """Other OpenAI fields the client set (temperature, tools, stop, …), passed on where understood."""
    needs: frozenset[str] = frozenset()
    """What the serving account must be able to do (``app.capabilities``), derived when parsed."""
    thinking: bool | None = None
    """Thinking asked on or off; None: the upstream model's default."""
    effort: str | None = None
    """How hard to think, when asked: ``low``, ``medium``, ``high`` or ``max``."""
    session_hint: str | None = None
    """A conversation key the protocol carries (``prompt_cache_key`` …), for the session binding."""


@dataclass(slots=True)
class Thread:
    """The upstream conversation a request continues or starts, for upstreams that keep chats
    (kimi-web, PROTOCOLS.md §3.3). Adapters of stateless upstreams ignore it.

    The dispatcher fills it from the session's binding when the request is served by the account
    that holds the chat; the adapter continues that chat when the request's messages extend what
    it holds (``turns``), else it starts a new chat and replays the conversation into it. On
    success the adapter leaves the chat's id, its last message id and the new ``turns`` here, and
    the dispatcher stores them in the binding.
    """

    chat_id: str | None = None
    parent_id: str | None = None
    """The upstream id of the chat's last message (the assistant's answer)."""
    turns: int = 0
    """How many of the conversation's messages the chat holds (the answer included)."""
    keep: bool = False
    """The conversation belongs to a session: keep its chat. Otherwise it is one-off and its chat may
    be deleted once answered."""


@dataclass(slots=True)
class Delta:
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class Finish:
    reason: str


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        body["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens or 0}  # as OpenAI: always there
        return body


Event = Delta | Finish | Usage
Batch = list[Event]
"""The events that arrived together in one network read: rendered and written to the client as one
piece, so a burst of upstream chunks costs one socket write, not one per chunk."""


@dataclass(slots=True)
class Completion:
    """One whole answer, for ``stream: false``."""

    content: str | None
    finish_reason: str
    usage: Usage | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Upstream(Protocol):
    """One adapter per upstream kind; one instance serves every account of that kind."""

    kind: str

    def stream(self, account: Account, request: ChatRequest, model: str,
               thread: Thread | None = None) -> AsyncIterator[Batch]:
        """Yield the answer as non-empty batches of neutral events; ``model`` is the upstream's id.

        The iterator ends normally only after the protocol's end marker was seen; a ``Finish``
        comes exactly once. Any failure raises an ``UpstreamError`` subclass.
        """
        ...

    async def complete(self, account: Account, request: ChatRequest, model: str,
                       thread: Thread | None = None) -> Completion: ...

    async def probe(self, account: Account) -> None:
        """Check, with one request that spends nothing, that the credential works and the account
        can take requests. Returns if so; otherwise raises the classified ``UpstreamError``
        (``AuthDead``, ``QuotaExhausted``, ``RateLimited``, ``Transient``, …)."""
        ...

    async def models(self, account: Account) -> tuple[str, ...] | None:
        """The model ids the upstream says this account serves, asked with one request that spends nothing;
        None when the upstream does not say (the account then serves its configured or default list). Failures
        raise the classified ``UpstreamError``."""
        ...

    async def close(self) -> None: ...
