"""Parse and validate an Anthropic Messages request into the neutral ``ChatRequest`` and its needs.

Every field of ``POST /v1/messages`` is honoured, accepted as documented, or refused with a 400 naming it
(an unknown one as Anthropic answers it: "Extra inputs are not permitted"):

* ``thinking``: ``enabled`` (its ``budget_tokens`` below ``max_tokens``) turns the upstream's thinking on,
  ``disabled`` off (a model that always thinks cannot serve it), ``adaptive`` (what Claude Code sends) leaves
  it to the model; no ``thinking`` at all (Claude Code with thinking off) turns it off where the model allows
  it (K2.5/K2.6), while models that always think still do; ``display`` is accepted;
* ``output_config.effort`` → the effort (``xhigh`` runs as ``max``); ``output_config.format`` (JSON schema)
  → structured output;
* ``temperature`` → Moonshot's mapping for its own Anthropic endpoint: ``temperature * 0.6`` upstream, except
  1, which is left out (the model's default: Anthropic's current models take no other value, Moonshot's
  K2.5 and later refuse any other);
  ``top_p`` as it is; ``top_k`` accepted, not sent (Moonshot's chat API has no such field);
* ``tools``: custom tools become function tools (their schemas as sent: the adapter drops ``$schema``);
  Anthropic's server and built-in tools (web search, code execution, bash, text editor …) are refused;
* ``tool_choice``: ``auto``, ``any`` (a call is required), ``tool`` (that one), ``none``;
  ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``;
* ``metadata.user_id``: Claude Code's JSON string holding its ``session_id`` (or the older
  ``…_session_<uuid>`` form) names the conversation; any other value is the user, for the session binding;
* accepted, asking nothing of the upstream: ``context_management``, ``cache_control``, ``service_tier``,
  ``inference_geo``; refused: ``container``, ``mcp_servers``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from app.api.anthropic.content import Verify, convert
from app.api.openai.schema import check_depth
from app.capabilities import NO_THINKING, needs_of
from app.errors import InvalidRequest, Unsupported
from app.upstreams.base import ChatRequest

TEMPERATURE_SCALE = 0.6
"""Moonshot's Anthropic-compatible endpoint runs a request's temperature * 0.6 (Kimi-K2's model card)."""
MAX_TOKENS = 1 << 20
MAX_STOP_SEQUENCES = 16
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "max", "max": "max"}
TOOL_CHOICES = ("auto", "any", "tool", "none")
_SHARED = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config",
                     "cache_control", "context_management", "mcp_servers"})
KNOWN = _SHARED | {"max_tokens", "metadata", "stop_sequences", "stream", "temperature", "top_p", "top_k", "container",
                   "inference_geo", "service_tier"}
COUNT_KNOWN = _SHARED
"""The fields of ``POST /v1/messages/count_tokens``."""
NULLABLE = frozenset({"cache_control", "container", "inference_geo", "context_management"})
"""The fields Anthropic takes as ``null``; any other may be left out, not sent as ``null``."""
_TOOL_KEYS = frozenset({"type", "name", "description", "input_schema", "cache_control", "strict",
                        "eager_input_streaming", "allowed_callers", "defer_loading", "input_examples"})
_OLD_SESSION = re.compile(r"_session_([0-9A-Za-z-]{8,})$")


@dataclass(slots=True)
class MessagesRequest:
    chat: ChatRequest
    stop_sequences: tuple[str, ...] = ()
    user: str | None = None
    """``metadata.user_id`` when it names no session: the conversation key falls back to it."""


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidRequest(f"{name}: Input should be a number from {low:g} to {high:g}.")
    return float(value)


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer() \
            or not low <= value <= high:
        raise InvalidRequest(f"{name}: Input should be a whole number from {low} to {high}.")
    return int(value)


def _object(name: str, value: Any, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name}: Input should be an object.")
    extra = value.keys() - keys
    if extra:
        raise InvalidRequest(f"{name}.{sorted(extra)[0]}: Extra inputs are not permitted.")
    return value


def _thinking(value: Any, max_tokens: int | None) -> bool | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind is not None and value.get("display") not in (None, "summarized", "omitted"):
        raise InvalidRequest("thinking.display: Input should be 'summarized' or 'omitted'.")
    if kind == "enabled":
        _object("thinking", value, frozenset({"type", "budget_tokens", "display"}))
        budget = _whole("thinking.budget_tokens", value.get("budget_tokens"), 1024, MAX_TOKENS)
        if max_tokens is not None and budget >= max_tokens:
            raise InvalidRequest("max_tokens: must be greater than thinking.budget_tokens "
                                 f"({max_tokens} <= {budget}).")
        return True
    if kind == "adaptive":
        _object("thinking", value, frozenset({"type", "display"}))
        return None
    if kind == "disabled":
        _object("thinking", value, frozenset({"type"}))
        return False
    raise InvalidRequest("thinking.type: Input should be 'enabled', 'adaptive' or 'disabled'.")


def _output_config(value: Any, params: dict[str, Any]) -> str | None:
    """The effort level it asks for; a JSON schema format goes into ``params`` as ``response_format``."""
    if value is None:
        return None
    config = _object("output_config", value, frozenset({"effort", "format"}))
    effort = config.get("effort")
    if effort is not None and (not isinstance(effort, str) or effort not in EFFORTS):
        raise InvalidRequest(f"output_config.effort: Input should be one of {', '.join(EFFORTS)}.")
    form = config.get("format")
    if form is not None:
        form = _object("output_config.format", form, frozenset({"type", "schema"}))
        if form.get("type") != "json_schema" or not isinstance(form.get("schema"), dict):
            raise InvalidRequest("output_config.format: expected {type: 'json_schema', schema: {…}}.")
        check_depth("output_config.format", form)
        params["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": form["schema"]}}
    return EFFORTS[effort] if effort is not None else None


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidRequest("tools: Input should be a list.")
    tools = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or kind not in (None, "custom"):
            what = f"'{kind}'" if isinstance(kind, str) else "this tool"
            raise Unsupported(f"tools.{i}: Anthropic's server and built-in tools ({what}) are not supported by "
                              "kimi-pool: only custom tools (name, description, input_schema) reach Kimi.")
        _object(f"tools.{i}", tool, _TOOL_KEYS)
        name, schema, description = tool.get("name"), tool.get("input_schema"), tool.get("description")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"tools.{i}.name: Field required.")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise InvalidRequest(f"tools.{i}.input_schema: a JSON schema object with type 'object' is required.")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"tools.{i}.description: Input should be a string.")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if description:
            function["description"] = description
        tools.append({"type": "function", "function": function})
    check_depth("tools", value)
    return tools


def _tool_choice(value: Any, names: set[str], params: dict[str, Any]) -> None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in TOOL_CHOICES:
        raise InvalidRequest("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'.")
    _object("tool_choice", value, frozenset({"type", "name", "disable_parallel_tool_use"}) if kind != "none"
            else frozenset({"type"}))
    if kind in ("any", "tool") and not names:
        raise InvalidRequest(f"tool_choice: '{kind}' needs tools.")
    if kind == "tool":
        name = value.get("name")
        if not isinstance(name, str) or name not in names:
            raise InvalidRequest(f"tool_choice.name: no tool named {name!r} in tools.")
        params["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        params["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    parallel = value.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("tool_choice.disable_parallel_tool_use: Input should be a boolean.")
    if parallel and names:
        params["parallel_tool_calls"] = False


def _metadata(value: Any) -> tuple[str | None, str | None]:
    """(the session id it names, else the user it names)."""
    if value is None:
        return None, None
    user_id = _object("metadata", value, frozenset({"user_id"})).get("user_id")
    if user_id is None:
        return None, None
    if not isinstance(user_id, str) or len(user_id) > 512:
        raise InvalidRequest("metadata.user_id: Input should be a string of at most 512 characters.")
    if user_id.startswith("{"):
        try:
            session = orjson.loads(user_id).get("session_id")
        except (orjson.JSONDecodeError, AttributeError):
            session = None
        if isinstance(session, str) and session:
            return session, None
    match = _OLD_SESSION.search(user_id)
    if match:
        return match.group(1), None
    return None, user_id or None


def _inert(body: dict[str, Any]) -> None:
    if body.get("container") is not None:
        raise Unsupported("container: code-execution containers are not supported by kimi-pool.")
    if body.get("mcp_servers"):
        raise Unsupported("mcp_servers: remote MCP servers are not supported by kimi-pool; run them in the client.")
    if body.get("service_tier") not in (None, "auto", "standard_only"):
        raise InvalidRequest("service_tier: Input should be 'auto' or 'standard_only'.")
    for name in ("inference_geo",):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise InvalidRequest(f"{name}: Input should be a string.")
    for name in ("context_management", "cache_control"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise InvalidRequest(f"{name}: Input should be an object.")


def parse_messages_request(body: Any, verify: Verify, *, counting: bool = False) -> MessagesRequest:
    """A Messages request (``counting``: a ``count_tokens`` request, which has no ``max_tokens`` and no
    sampling fields) → the neutral request; ``verify`` checks thinking signatures."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    extra = body.keys() - (COUNT_KNOWN if counting else KNOWN)
    if extra:
        raise InvalidRequest(f"{sorted(extra)[0]}: Extra inputs are not permitted.")
    for name, value in body.items():
        if value is None and name not in NULLABLE:
            raise InvalidRequest(f"{name}: Input should not be null (leave it out instead).")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required (a non-empty string).")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: Field required (a non-empty list).")
    max_tokens = None if counting else _whole("max_tokens", body.get("max_tokens"), 1, MAX_TOKENS)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: Input should be a boolean.")
    _inert(body)
    params: dict[str, Any] = {}
    if body.get("temperature") is not None:
        temperature = _number("temperature", body["temperature"], 0.0, 1.0)
        if temperature != 1.0:  # 1 is the model's own default (the only value Anthropic's current models take)
            params["temperature"] = round(temperature * TEMPERATURE_SCALE, 6)
    if body.get("top_p") is not None:
        params["top_p"] = _number("top_p", body["top_p"], 0.0, 1.0)
    if body.get("top_k") is not None:
        _whole("top_k", body["top_k"], 0, 1 << 31)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES \
                or not all(isinstance(s, str) and s for s in stops):
            raise InvalidRequest(f"stop_sequences: Input should be a list of up to {MAX_STOP_SEQUENCES} non-empty "
                                 "strings.")
        if stops:
            params["stop"] = stops
    thinking = _thinking(body.get("thinking"), max_tokens)
    effort = _output_config(body.get("output_config"), params)
    names: set[str] = set()
    if body.get("tools") is not None:
        tools = _tools(body["tools"])
        names = {tool["function"]["name"] for tool in tools}
        if tools:
            params["tools"] = tools
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], names, params)
        if not names:
            params.pop("tool_choice")  # 'auto' or 'none' with no tools asks nothing
    session, user = _metadata(body.get("metadata"))
    converted = convert(body.get("system"), messages, verify)
    if body.get("thinking") is None:  # off where the model allows it, without refusing models that always think
        needs, thinking = needs_of(converted, params, None), False
    else:
        needs = needs_of(converted, params, thinking)
    chat = ChatRequest(model=model, messages=converted, stream=bool(stream), max_tokens=max_tokens, params=params,
                       needs=needs, thinking=thinking, effort=effort if NO_THINKING not in needs else None,
                       session_hint=session)
    return MessagesRequest(chat, tuple(stops or ()), user)
