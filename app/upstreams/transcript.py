"""Turning OpenAI messages into the single text field of the web upstreams.

kimi-ai.chat takes one ``message`` string (PROTOCOLS.md §1.1) and a kimi.com chat turn one text
block (§3.3): a conversation that does not live upstream is replayed as a labelled transcript,
``System: …``, ``User: …``, ``Assistant: …``, one turn per paragraph. A lone user message is sent
as it is. Within a length limit the system prompt and the last turn are kept and the oldest of the
other turns are dropped first.
"""

from __future__ import annotations

from typing import Any

from app.errors import Unsuitable

LABELS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a part array."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
    return "\n".join(parts)


def _turn(message: dict[str, Any]) -> str:
    role = message.get("role")
    text = text_of(message.get("content")).strip()
    return f"{LABELS.get(str(role), str(role).capitalize())}: {text}"


def flatten(messages: list[dict[str, Any]], *, limit: int | None = None) -> str:
    """The conversation as one string of at most ``limit`` characters (oldest turns dropped first).

    Raises ``Unsuitable`` when even the system prompt and the last turn do not fit.
    """
    turns = [m for m in messages if isinstance(m, dict) and text_of(m.get("content")).strip()]
    if len(turns) == 1 and turns[0].get("role") == "user":
        text = text_of(turns[0].get("content"))
        if limit is not None and len(text) > limit:
            raise Unsuitable(f"The message is {len(text)} characters; this upstream takes at most {limit}.")
        return text
    system = [_turn(m) for m in turns if m.get("role") in ("system", "developer")]
    rest = [_turn(m) for m in turns if m.get("role") not in ("system", "developer")]
    if limit is None:
        return "\n\n".join(system + rest)
    kept: list[str] = []
    chars, pieces = sum(len(s) for s in system), len(system)
    for turn in reversed(rest):  # the newest first; the last turn is always kept
        if kept and chars + len(turn) + 2 * pieces > limit:  # its length once joined with "\n\n"
            break
        kept.append(turn)
        chars, pieces = chars + len(turn), pieces + 1
    text = "\n\n".join(system + kept[::-1])
    if len(text) > limit:
        raise Unsuitable(f"The conversation's system prompt and last message are {len(text)} characters; "
                         f"this upstream takes at most {limit}.")
    return text
