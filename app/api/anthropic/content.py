"""Anthropic ``system`` and ``messages`` → the neutral (OpenAI-shaped) messages, block by block.

* user turns: ``text``, ``image`` (base64 → a data URL, or a URL), ``document`` with plain text or text
  blocks, ``search_result`` as text; each ``tool_result`` becomes a ``tool`` message *before* the turn's
  other content (OpenAI's order: tool answers follow the assistant's calls at once), its images going with
  that content; ``is_error`` is said in the text, since Kimi has no flag for it;
* assistant turns: ``text`` → ``content``, ``thinking`` → ``reasoning_content`` once its ``signature`` is
  the one kimi-pool issued (``THINKING``: an HMAC of the Sealer over the text), ``tool_use`` → ``tool_calls``;
  ``redacted_thinking`` is dropped (kimi-pool never issues it: it holds another provider's encrypted
  thinking, which no Kimi model can read). A last assistant turn is a prefill: Kimi's ``partial`` mode;
* a ``system`` role message inside ``messages`` (Claude Code's mid-conversation system beta) and a
  ``mid_conv_system`` block stay system messages where they are; ``system`` comes first.

Tool-use ids carry Kimi's call id (``functions.Bash:0``, which Anthropic's id pattern refuses) in
base64url, so it goes back upstream exactly as Kimi made it (``tool_use_id`` / ``call_id``).
``cache_control`` and ``citations`` are accepted everywhere and dropped.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import orjson

from app.errors import InvalidRequest, Unsupported

THINKING = "anthropic-thinking"
"""The Sealer purpose of thinking signatures."""
TOOL_ID_PREFIX = "toolu_"
ROLES = ("user", "assistant", "system")
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
Verify = Callable[[str, str], bool]
"""``(thinking text, signature)`` → whether kimi-pool issued that signature for that text."""


def tool_use_id(call_id: str) -> str:
    """Anthropic's id for the upstream's tool call ``call_id`` (reversible: ``call_id_of``)."""
    return TOOL_ID_PREFIX + base64.urlsafe_b64encode(call_id.encode()).rstrip(b"=").decode()


def call_id_of(tool_id: str) -> str:
    """The upstream's call id inside a ``tool_use_id`` kimi-pool issued; any other id as it is."""
    if not tool_id.startswith(TOOL_ID_PREFIX):
        return tool_id
    tail = tool_id[len(TOOL_ID_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4))
    except (binascii.Error, ValueError):
        return tool_id
    if not raw or not raw.isascii() or not all(32 < b < 127 for b in raw) or tool_use_id(raw.decode()) != tool_id:
        return tool_id
    return raw.decode()


def _block_type(where: str, block: Any) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise InvalidRequest(f"{where}: a content block must be an object with a 'type'.")
    return kind


def _string(where: str, block: dict[str, Any], key: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{key}: Field required (a string).")
    return value


def _texts(where: str, blocks: Any) -> str:
    """The text of a string or a list of text blocks (``system``, a system message, a document's content)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise InvalidRequest(f"{where}: Input should be a string or a list of text blocks.")
    texts = []
    for j, block in enumerate(blocks):
        if _block_type(f"{where}[{j}]", block) != "text":
            raise InvalidRequest(f"{where}[{j}]: only text blocks are allowed here.")
        texts.append(_string(f"{where}[{j}]", block, "text"))
    return "\n".join(texts)


def _image(where: str, block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")  # type: ignore[union-attr]
        if not isinstance(media, str) or media not in IMAGE_TYPES or not isinstance(data, str):
            raise InvalidRequest(f"{where}.source: a base64 image needs 'media_type' (one of "
                                 f"{', '.join(sorted(IMAGE_TYPES))}) and 'data'.")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url" and isinstance(source.get("url"), str):  # type: ignore[union-attr]
        return {"type": "image_url", "image_url": {"url": source["url"]}}  # type: ignore[index]
    if kind == "file":
        raise Unsupported(f"{where}.source: images by file id are not supported (kimi-pool has no Files API "
                          "for Anthropic): send them as base64 or a URL.")
    raise InvalidRequest(f"{where}.source: expected {{type: 'base64', media_type, data}} or {{type: 'url', url}}.")


def _document(where: str, block: dict[str, Any]) -> str:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "text" and isinstance(source.get("data"), str):  # type: ignore[union-attr]
        text: str = source["data"]  # type: ignore[index]
    elif kind == "content":
        content = source.get("content")  # type: ignore[union-attr]
        text = content if isinstance(content, str) else _texts(f"{where}.source.content", content)
    elif kind in ("base64", "url", "file"):
        raise Unsupported(f"{where}: PDF documents are not supported by the Kimi upstreams; send the text "
                          "(a document with a 'text' source) instead.")
    else:
        raise InvalidRequest(f"{where}.source: expected a 'text' or 'content' source.")
    title = block.get("title")
    return f"{title}\n\n{text}" if isinstance(title, str) and title else text


def _search_result(where: str, block: dict[str, Any]) -> str:
    texts = _texts(f"{where}.content", block.get("content"))
    head = " ".join(str(block[k]) for k in ("title", "source") if isinstance(block.get(k), str))
    return f"{head}\n{texts}" if head else texts


def _part(where: str, kind: str, block: dict[str, Any]) -> dict[str, Any] | None:
    """A user content part (None: not a part this converter makes on its own)."""
    if kind == "text":
        return {"type": "text", "text": _string(where, block, "text")}
    if kind == "image":
        return _image(where, block)
    if kind == "document":
        return {"type": "text", "text": _document(where, block)}
    if kind == "search_result":
        return {"type": "text", "text": _search_result(where, block)}
    return None


def _tool_result(where: str, block: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``tool`` message of a ``tool_result``; its images are appended to ``parts`` (the turn's content)."""
    tool_id = block.get("tool_use_id")
    if not isinstance(tool_id, str) or not tool_id:
        raise InvalidRequest(f"{where}.tool_use_id: Field required.")
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for k, inner in enumerate(content):
            inner_where = f"{where}.content[{k}]"
            kind = _block_type(inner_where, inner)
            part = _part(inner_where, kind, inner) if kind != "tool_reference" else None
            if part is None:
                raise Unsupported(f"{inner_where}: '{kind}' blocks are not supported in a tool result.")
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                parts.append(part)
        text = "\n".join(texts)
    elif content is None:
        text = ""
    else:
        raise InvalidRequest(f"{where}.content: Input should be a string or a list of blocks.")
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": call_id_of(tool_id), "content": text}


def _flush(out: list[dict[str, Any]], tools: list[dict[str, Any]], parts: list[dict[str, Any]]) -> None:
    out.extend(tools)
    tools.clear()
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text":
            out.append({"role": "user", "content": parts[0]["text"]})
        else:
            out.append({"role": "user", "content": list(parts)})
        parts.clear()


def _user(where: str, content: list[Any], out: list[dict[str, Any]]) -> None:
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        block_where = f"{where}.content[{j}]"
        kind = _block_type(block_where, block)
        part = _part(block_where, kind, block)
        if part is not None:
            parts.append(part)
        elif kind == "tool_result":
            tools.append(_tool_result(block_where, block, parts))
        elif kind == "mid_conv_system":
            _flush(out, tools, parts)
            out.append({"role": "system", "content": _texts(f"{block_where}.content", block.get("content"))})
        elif kind in ("thinking", "redacted_thinking", "tool_use"):
            raise InvalidRequest(f"{block_where}: '{kind}' blocks belong to assistant turns.")
        else:
            raise Unsupported(f"{block_where}: '{kind}' blocks are not supported by kimi-pool.")
    _flush(out, tools, parts)


def _assistant(where: str, content: list[Any], verify: Verify) -> dict[str, Any]:
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        block_where = f"{where}.content[{j}]"
        kind = _block_type(block_where, block)
        if kind == "text":
            texts.append(_string(block_where, block, "text"))
        elif kind == "thinking":
            thought = _string(block_where, block, "thinking")
            signature = block.get("signature")
            if not isinstance(signature, str) or not verify(thought, signature):
                raise InvalidRequest(f"{block_where}.signature: invalid signature: a thinking block must come back "
                                     "exactly as kimi-pool issued it (text and signature unchanged).")
            thoughts.append(thought)
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            calls.append(_call(block_where, block))
        else:
            raise Unsupported(f"{block_where}: '{kind}' blocks are not supported in assistant turns by kimi-pool.")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thoughts:
        message["reasoning_content"] = "\n".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def _call(where: str, block: dict[str, Any]) -> dict[str, Any]:
    tool_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(tool_id, str) or not tool_id or not isinstance(name, str) or not name \
            or not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}: a tool_use block needs 'id', 'name' and 'input' (an object).")
    return {"id": call_id_of(tool_id), "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(arguments).decode()}}


def convert(system: Any, messages: Any, verify: Verify) -> list[dict[str, Any]]:
    """The neutral messages of ``system`` and ``messages`` (both already present; ``messages`` non-empty)."""
    out: list[dict[str, Any]] = []
    if system is not None:
        text = _texts("system", system)
        if text:
            out.append({"role": "system", "content": text})
    last = len(messages) - 1
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role: Input should be 'user', 'assistant' or 'system'.")
        content = message.get("content")
        if role == "system":
            out.append({"role": "system", "content": _texts(f"{where}.content", content)})
        elif isinstance(content, str):
            out.append({"role": role, "content": content})
        elif not isinstance(content, list):
            raise InvalidRequest(f"{where}.content: Input should be a string or a list of content blocks.")
        elif role == "user":
            _user(where, content, out)
        else:
            out.append(_assistant(where, content, verify))
        if i == last and role == "assistant" and out[-1]["content"] and not out[-1].get("tool_calls"):
            out[-1]["partial"] = True  # a prefill: the answer continues it
    return out
