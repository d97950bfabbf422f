"""What the Moonshot emulator answers an admitted request: a scripted answer if one is queued,
else a default that fits what the request asks for.

Defaults, first that applies:

* the last message echoes a ``$web_search`` result → text that names the searched query;
* function tools offered, ``tool_choice`` not ``none``, and the last message is not a tool result
  (or the choice is forced) → a call of the forced tool, else of the first one, with arguments
  generated from its JSON schema (``moonshot_schema``); ``finish_reason: "tool_calls"``;
* ``response_format`` ``json_object`` → ``{"reply": "<the text>"}``; ``json_schema`` → a minimal
  instance of the schema;
* prefix mode (a last assistant message with ``partial: true``) → the rest of the deterministic
  text when the prefix begins it, else the whole text after it;
* else the deterministic text.

Thinking requests get the reasoning first (``reasoning_effort`` scales it). Tool-call ids follow
Kimi's form ``functions.NAME:IDX``, IDX counting the calls in the conversation so far; a
``$web_search`` call is a ``builtin_function`` whose arguments are an opaque search id and usage,
which the client sends back as the tool result.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson

from app.emulator.moonshot_answers import ScriptedAnswer
from app.emulator.moonshot_asks import WEB_SEARCH, Asks
from app.emulator.moonshot_schema import instance
from app.emulator.moonshot_turn import Call, Reply, Turn, fragments, words

_KEEP_SEARCHES = 4096


class WebSearches:
    """The searches ``$web_search`` calls ran, by search id (the newest ``_KEEP_SEARCHES``)."""

    def __init__(self) -> None:
        self._queries: OrderedDict[str, str] = OrderedDict()

    def start(self, query: str) -> str:
        search_id = os.urandom(16).hex()
        self._queries[search_id] = query
        if len(self._queries) > _KEEP_SEARCHES:
            self._queries.popitem(last=False)
        return search_id

    def query(self, search_id: str | None) -> str | None:
        return self._queries.get(search_id) if search_id is not None else None

    def clear(self) -> None:
        self._queries.clear()


def prior_calls(messages: list[Any]) -> int:
    """Tool calls the conversation's assistant turns made so far (the next call's IDX)."""
    count = 0
    for message in messages:
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if isinstance(calls, list):
            count += len(calls)
    return count


class Composer:
    """Builds the ``Turn`` of an admitted request (see the module docstring)."""

    def __init__(self, reply: Reply, searches: WebSearches, search_tokens: int) -> None:
        self.reply = reply
        self.searches = searches
        self.search_tokens = search_tokens

    def _search_call(self, query: str) -> Call:
        search_id = self.searches.start(query)
        arguments = orjson.dumps({"search_result": {"search_id": search_id},
                                  "usage": {"total_tokens": self.search_tokens}}).decode()
        return Call(0, f"t-web_search-{int.from_bytes(os.urandom(5), 'big') % 10**12:012d}", "builtin_function",
                    WEB_SEARCH, arguments)

    def _scripted(self, asks: Asks, answer: ScriptedAnswer, messages: list[Any]) -> tuple[list[str], list[Call]]:
        if answer.web_search is not None:
            if asks.web_search:
                return [], [self._search_call(answer.web_search)]
            return list(self.reply.content), []  # the builtin is not offered: the model cannot search
        first = prior_calls(messages) if answer.tool_calls else 0
        calls = [Call(i, f"functions.{c.name}:{first + i}", "function", c.name, c.arguments)
                 for i, c in enumerate(answer.tool_calls)]
        content = answer.content or ""
        return (fragments(content) if answer.json else words(content)), calls

    def _default(self, asks: Asks, messages: list[Any], query: str | None) -> tuple[list[str], list[Call]]:
        reply = self.reply
        if query is not None:
            return words(f'Searched the web for "{query}". {reply.text}'), []
        forced = asks.choice in ("required", "function")
        if asks.functions and asks.choice != "none" and (forced or not asks.after_tool):
            tool = next((t for t in asks.functions if t.name == asks.forced), asks.functions[0])
            schema = tool.parameters if isinstance(tool.parameters, Mapping) else {"type": "object"}
            arguments = orjson.dumps(instance(schema)).decode()
            return [], [Call(0, f"functions.{tool.name}:{prior_calls(messages)}", "function", tool.name, arguments)]
        if asks.response == "json_object":
            return fragments(orjson.dumps({"reply": reply.text}).decode()), []
        if asks.response == "json_schema":
            return fragments(orjson.dumps(instance(asks.schema)).decode()), []
        if asks.partial is not None:
            prefix = asks.partial
            if prefix and reply.text.startswith(prefix):
                return words(reply.text[len(prefix):]), []
            gap = " " if prefix and not prefix[-1].isspace() else ""
            return words(gap + reply.text), []
        return list(reply.content), []

    def compose(self, asks: Asks, answer: ScriptedAnswer | None, messages: list[Any], query: str | None) -> Turn:
        """The answer; ``query``: the search a ``$web_search`` result in the last message echoes."""
        reasoning: list[str] = []
        if asks.thinking:
            scripted = answer.reasoning if answer is not None else None
            reasoning = words(scripted) if scripted is not None else self.reply.reasoning(asks.effort)
        if answer is not None and answer.says:
            content, calls = self._scripted(asks, answer, messages)
        else:
            content, calls = self._default(asks, messages, query)
        return Turn(reasoning, content, calls)
