"""The Moonshot emulator as a coding agent's upstream: thinking, tool calls, JSON answers, Kimi's
rules about them, scripted answers, ``$web_search``, cached tokens and prefix mode.

Driven over HTTP with the ``openai`` SDK (and raw httpx where the wire shape itself is the point),
against the emulator under real uvicorn; time stays on a manual clock.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import openai
import orjson
import pytest
from pydantic import BaseModel, Field

from app.emulator.moonshot import MoonshotEmulatorConfig
from tests.emulator.test_moonshot import HELLO, HELLO_TOKENS, KEY, OTHER, REASONING, REPLY, chunks, error, running

THINKER = "kimi-k2.5"
PLAIN = "kimi-k2-turbo-preview"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
                "detailed": {"type": "boolean"},
            },
            "required": ["city", "unit", "days"],
        },
    },
}
WEATHER_ARGS = {"city": "city", "unit": "celsius", "days": 1}
WEB_SEARCH = {"type": "builtin_function", "function": {"name": "$web_search"}}
NO_THINKING = {"thinking": {"type": "disabled"}}


def extra(model: Any, name: str) -> Any:
    """A field the OpenAI types do not declare (``reasoning_content``, ``cached_tokens``)."""
    return (model.model_extra or {}).get(name)


async def refused(call: Any) -> tuple[int, str, str]:
    """The status, type and message of the 4xx the SDK raised."""
    with pytest.raises(openai.APIStatusError) as caught:
        await call
    body = caught.value.response.json()
    return caught.value.status_code, body["error"]["type"], body["error"]["message"]


# --- thinking --------------------------------------------------------------------------------------------


async def test_models_think_by_their_trait_and_the_request_switches_it() -> None:
    async with running() as run:
        client = run.sdk()
        on = await client.chat.completions.create(model=THINKER, messages=HELLO)
        assert extra(on.choices[0].message, "reasoning_content") == REASONING
        assert on.choices[0].message.content == REPLY
        assert on.usage is not None and on.usage.completion_tokens == 8 + 12, "reasoning tokens are billed"

        off = await client.chat.completions.create(model=THINKER, messages=HELLO, extra_body=NO_THINKING)
        assert extra(off.choices[0].message, "reasoning_content") is None
        assert off.usage is not None and off.usage.completion_tokens == 12

        never = await client.chat.completions.create(model="moonshot-v1-8k", messages=HELLO)
        assert extra(never.choices[0].message, "reasoning_content") is None
        always = await client.chat.completions.create(model="kimi-k2-thinking-turbo", messages=HELLO)
        assert extra(always.choices[0].message, "reasoning_content") == REASONING
        enabled = await client.chat.completions.create(model="kimi-k2.6", messages=HELLO,
                                                       extra_body={"thinking": {"type": "enabled"}})
        assert extra(enabled.choices[0].message, "reasoning_content") == REASONING


async def test_reasoning_effort_sets_the_k3_levels_and_is_ignored_by_models_without_levels() -> None:
    async with running() as run:
        client = run.sdk()
        lengths = {}
        for effort in ("low", "high", "max"):
            reply = await client.chat.completions.create(model="kimi-k3", messages=HELLO, reasoning_effort=effort)
            lengths[effort] = len(extra(reply.choices[0].message, "reasoning_content").split())
        assert lengths == {"low": 4, "high": 8, "max": 16}
        with pytest.raises(openai.BadRequestError, match="reasoning_effort must be one of low, high, max"):
            await client.chat.completions.create(model="kimi-k3", messages=HELLO, reasoning_effort="medium")
        # K2.x has no levels: Moonshot ignores the field, and the model thinks as it would anyway
        reply = await client.chat.completions.create(model=THINKER, messages=HELLO, reasoning_effort="low")
        assert len(extra(reply.choices[0].message, "reasoning_content").split()) == 8
        reply = await client.chat.completions.create(model="kimi-k2-0905-preview", messages=HELLO,
                                                     reasoning_effort="high")
        assert extra(reply.choices[0].message, "reasoning_content") is None


async def test_a_thinking_stream_sends_reasoning_before_the_content() -> None:
    async with running() as run:
        stream = await run.sdk().chat.completions.create(model=THINKER, messages=HELLO, stream=True)
        kinds = []
        async for chunk in stream:
            delta = chunk.choices[0].delta
            if extra(delta, "reasoning_content"):
                kinds.append("reasoning")
            elif delta.content:
                kinds.append("content")
        assert kinds == ["reasoning"] * 8 + ["content"] * 12


@pytest.mark.parametrize(("model", "body", "message"), [
    (THINKER, {"thinking": {"type": "enabled"}, "reasoning_effort": "high"},
     "Invalid request: thinking and reasoning_effort cannot be set together; send one of them"),
    (THINKER, {"thinking": {"type": "auto"}},
     'Invalid request: thinking must be {"type": "enabled"} or {"type": "disabled"}'),
    (THINKER, {"thinking": True}, 'Invalid request: thinking must be {"type": "enabled"} or {"type": "disabled"}'),
    ("kimi-k3", {"reasoning_effort": "medium"}, "Invalid request: reasoning_effort must be one of low, high, max"),
    ("kimi-k3", NO_THINKING, "Invalid request: thinking cannot be disabled for model kimi-k3"),
    ("kimi-k2.7-code", NO_THINKING, "Invalid request: thinking cannot be disabled for model kimi-k2.7-code"),
    ("moonshot-v1-8k", {"thinking": {"type": "enabled"}},
     "Invalid request: thinking is not supported by model moonshot-v1-8k"),
    ("kimi-k2-0905-preview", {"thinking": {"type": "enabled"}},
     "Invalid request: thinking is not supported by model kimi-k2-0905-preview"),
    ("kimi-k2-thinking", NO_THINKING, "Invalid request: thinking cannot be disabled for model kimi-k2-thinking"),
    (PLAIN, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "Invalid request: model kimi-k2-turbo-preview does not support image input"),
])
async def test_thinking_switches_and_images_the_model_cannot_take_are_refused(
        model: str, body: dict[str, Any], message: str) -> None:
    async with running() as run:
        messages = body.pop("messages", HELLO)
        got = await refused(run.sdk().chat.completions.create(model=model, messages=messages, extra_body=body))
        assert got == (400, "invalid_request_error", message)
        assert run.emulator.stats.totals.by_status == {"400": 1}
        assert run.emulator.stats.totals.tokens_charged == 0, "a refused request is not charged"


# --- Kimi's tool rules -----------------------------------------------------------------------------------


async def test_a_forced_tool_choice_needs_thinking_off_except_on_k3() -> None:
    async with running() as run:
        client = run.sdk()
        required = client.chat.completions.create(model=THINKER, messages=HELLO, tools=[WEATHER],
                                                  tool_choice="required")
        assert await refused(required) == (400, "invalid_request_error",
                                           "tool_choice 'required' is incompatible with thinking enabled")
        named = client.chat.completions.create(
            model="kimi-k2-thinking", messages=HELLO, tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert await refused(named) == (400, "invalid_request_error",
                                        "tool_choice specified is incompatible with thinking enabled")

        forced = await client.chat.completions.create(model=THINKER, messages=HELLO, tools=[WEATHER],
                                                      tool_choice="required", extra_body=NO_THINKING)
        assert forced.choices[0].finish_reason == "tool_calls"
        k3 = await client.chat.completions.create(model="kimi-k3", messages=HELLO, tools=[WEATHER],
                                                  tool_choice="required")
        assert extra(k3.choices[0].message, "reasoning_content") == REASONING
        calls = k3.choices[0].message.tool_calls
        assert calls is not None and calls[0].function.name == "get_weather"


async def test_a_thinking_request_must_carry_the_reasoning_of_earlier_tool_calls() -> None:
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": orjson.dumps(WEATHER_ARGS).decode()}}
    history: list[dict[str, Any]] = [
        *HELLO, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    async with running() as run:
        client = run.sdk()
        missing = client.chat.completions.create(model=THINKER, messages=history, tools=[WEATHER])
        assert await refused(missing) == (
            400, "invalid_request_error",
            "thinking is enabled but reasoning_content is missing in assistant tool call message at index 2")
        off = await client.chat.completions.create(model=THINKER, messages=history, tools=[WEATHER],
                                                   extra_body=NO_THINKING)
        assert off.choices[0].message.content == REPLY
        history[2]["reasoning_content"] = "I should look it up."
        carried = await client.chat.completions.create(model=THINKER, messages=history, tools=[WEATHER])
        assert carried.choices[0].message.content == REPLY and carried.choices[0].finish_reason == "stop"


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(("tools", "choice", "message"), [
    ([_tool(f"tool_{i}") for i in range(129)], None, "too many tools: 129, at most 128 are allowed"),
    ({"type": "function"}, None, "tools must be an array"),
    ([{"type": "function", "function": {"description": "no name"}}], None,
     'tools[0] must be {"type": "function", "function": {"name": …}}'),
    ([_tool("ok"), {"type": "retrieval", "function": {"name": "x"}}], None,
     "tools[1].type must be function or builtin_function"),
    ([{"type": "function", "function": {"name": "1st tool"}}], None,
     "tools[0].function.name must be 1-64 letters, digits, _ or -, not starting with a digit"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], None,
     "tools[0].function.parameters must be a JSON Schema object"),
    ([{"type": "builtin_function", "function": {"name": "$code_runner"}}], None,
     "tools[0]: unknown builtin function '$code_runner'; the builtin is $web_search"),
    ([_tool("ok")], "always", 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                              '"function": {"name": …}}'),
    ([_tool("ok")], {"type": "function", "function": {"name": "other"}},
     "tool_choice names function 'other', which is not among the tools"),
])
async def test_malformed_tools_and_tool_choices_are_refused(tools: Any, choice: Any, message: str) -> None:
    async with running() as run:
        body: dict[str, Any] = {"tools": tools, **({"tool_choice": choice} if choice is not None else {})}
        got = error(await run.chat(**body))
        assert got == (400, "invalid_request_error", f"Invalid request: {message}")


async def test_128_tools_and_the_builtin_are_accepted() -> None:
    async with running() as run:
        response = await run.chat(tools=[_tool(f"tool_{i}") for i in range(127)] + [WEB_SEARCH])
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "tool_0"


# --- tool calls ------------------------------------------------------------------------------------------


class Weather(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1)
    detailed: bool | None = None


async def test_a_tool_call_answers_with_arguments_from_the_schema_then_text_after_the_result() -> None:
    async with running() as run:
        client = run.sdk()
        first = await client.chat.completions.create(model=PLAIN, messages=HELLO, tools=[WEATHER])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == ""
        assert choice.message.tool_calls is not None
        call = choice.message.tool_calls[0]
        assert (call.id, call.type, call.function.name) == ("functions.get_weather:0", "function", "get_weather")
        arguments = orjson.loads(call.function.arguments)
        assert arguments == WEATHER_ARGS, "the required properties, each a valid value"
        Weather.model_validate(arguments)
        fragments = math.ceil(len(call.function.arguments) / 4)
        assert first.usage is not None and first.usage.completion_tokens == 1 + fragments

        history: list[Any] = [*HELLO, choice.message.model_dump(exclude_none=True),
                              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
        second = await client.chat.completions.create(model=PLAIN, messages=history, tools=[WEATHER])
        assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content == REPLY

        history += [{"role": "assistant", "content": REPLY}, {"role": "user", "content": "And tomorrow?"}]
        third = await client.chat.completions.create(model=PLAIN, messages=history, tools=[WEATHER])
        calls = third.choices[0].message.tool_calls
        assert calls is not None and calls[0].id == "functions.get_weather:1", "IDX counts the conversation's calls"
        none = await client.chat.completions.create(model=PLAIN, messages=HELLO, tools=[WEATHER],
                                                    tool_choice="none")
        assert none.choices[0].message.content == REPLY and none.choices[0].message.tool_calls is None
        assert run.emulator.stats.totals.tool_calls == 2


async def test_a_streamed_tool_call_comes_as_openai_chunks_after_the_reasoning() -> None:
    async with running() as run:
        response = await run.chat(model=THINKER, tools=[WEATHER], stream=True)
        parsed = chunks(response.text)
        deltas = [c["choices"][0]["delta"] for c in parsed[1:-1]]
        reasoning = [d for d in deltas if "reasoning_content" in d]
        calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert deltas[: len(reasoning)] == reasoning and len(reasoning) == 8
        assert calls[0] == {"index": 0, "id": "functions.get_weather:0", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}
        assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
        assert orjson.loads("".join(c["function"]["arguments"] for c in calls[1:])) == WEATHER_ARGS
        final = parsed[-1]["choices"][0]
        assert final["finish_reason"] == "tool_calls"
        assert final["usage"]["completion_tokens"] == 8 + len(calls)

        # The SDK accumulates the same stream into one call.
        stream = await run.sdk().chat.completions.create(model=THINKER, messages=HELLO, tools=[WEATHER],
                                                         stream=True)
        arguments, names = "", []
        async for chunk in stream:
            for delta in chunk.choices[0].delta.tool_calls or []:
                names += [delta.function.name] if delta.function and delta.function.name else []
                arguments += delta.function.arguments or "" if delta.function else ""
        assert names == ["get_weather"] and orjson.loads(arguments) == WEATHER_ARGS


async def test_max_tokens_cuts_a_tool_call_short_with_length() -> None:
    async with running() as run:
        whole = (await run.chat(tools=[WEATHER], max_tokens=3)).json()["choices"][0]
        assert whole["finish_reason"] == "length"
        assert whole["message"]["tool_calls"][0]["function"]["arguments"] == '{"city":'[:8]


# --- scripted answers -----------------------------------------------------------------------------------


async def test_scripted_answers_play_per_key_then_from_the_any_key_queue() -> None:
    async with running() as run:
        assert run.emulator.script_answers(KEY, [{"content": "first for one"}, {"content": "second for one"}]) == 2
        queued = await run.http.post("/__fake/answers", json={"key": "*", "answers": [{"content": "for anyone"}]})
        assert queued.json() == {"queued": 1}
        assert (await run.http.get("/__fake/state")).json()["answers"] == {KEY: 2, "*": 1}

        async def said(key: str) -> str | None:
            reply = await run.sdk(key).chat.completions.create(model=PLAIN, messages=HELLO)
            return reply.choices[0].message.content

        assert await said(OTHER) == "for anyone"
        assert [await said(KEY), await said(KEY), await said(KEY)] == ["first for one", "second for one", REPLY]


async def test_an_answer_waits_for_a_request_that_is_admitted() -> None:
    async with running() as run:
        run.emulator.script(KEY, [{"kind": "rate_limit", "bucket": "rpm", "wait": 2}])
        run.emulator.script_answers(KEY, [{"content": "worth the wait"}])
        assert (await run.chat()).status_code == 429
        assert (await run.chat(model="gpt-4")).status_code == 404
        assert (await run.chat(thinking={"type": "maybe"})).status_code == 400
        assert (await run.chat()).json()["choices"][0]["message"]["content"] == "worth the wait"


async def test_a_scripted_answer_may_think_call_tools_and_send_json() -> None:
    async with running() as run:
        run.emulator.script_answers(None, [
            {"reasoning": "Two tools at once.", "content": "Checking.",
             "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}},
                            {"name": "get_time", "arguments": "{not json"}]},
            {"json": {"answer": 42}, "reasoning": "unused: this request does not think"},
        ])
        reply = await run.sdk().chat.completions.create(model=THINKER, messages=HELLO)
        message = reply.choices[0].message
        assert extra(message, "reasoning_content") == "Two tools at once." and message.content == "Checking."
        assert message.tool_calls is not None
        assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
            ("functions.get_weather:0", "get_weather", '{"city":"Paris"}'),
            ("functions.get_time:1", "get_time", "{not json")]
        assert reply.choices[0].finish_reason == "tool_calls"
        plain = await run.sdk().chat.completions.create(model=PLAIN, messages=HELLO)
        assert plain.choices[0].message.content == '{"answer":42}'
        assert extra(plain.choices[0].message, "reasoning_content") is None


@pytest.mark.parametrize(("answers", "message"), [
    ([{"text": "hi"}], "an answer takes no text; fields: content, reasoning, tool_calls, json, web_search"),
    ([{"content": "a", "json": {}}], "an answer has content or json, not both"),
    ([{"json": [1, 2]}], "answer json must be an object"),
    ([{"tool_calls": [{"name": "", "arguments": {}}]}], "tool_calls[0].name must be a non-empty string"),
    ([{"tool_calls": [{"name": "f", "arguments": 3}]}], "tool_calls[0].arguments must be an object or a string"),
    ([{"web_search": "q", "content": "x"}], "web_search is a non-empty query, alone (no content, json or tool_calls)"),
    ([{"content": "fine"}, "not an answer"], "an answer is an object with some of content, reasoning, tool_calls, "
                                             "json, web_search, got 'not an answer'"),
    ({"content": "x"}, "answers must be a list"),
])
async def test_bad_answers_are_refused_when_queued(answers: Any, message: str) -> None:
    async with running() as run:
        response = await run.http.post("/__fake/answers", json={"key": KEY, "answers": answers})
        assert error(response) == (400, "invalid_request_error", message)
        assert run.emulator.snapshot()["answers"] == {}, "nothing of a refused batch is queued"


# --- JSON answers -----------------------------------------------------------------------------------------


class Step(BaseModel):
    title: str = Field(min_length=8)
    minutes: int = Field(ge=5, le=90)
    tags: list[str] = Field(min_length=2)


class Plan(BaseModel):
    kind: Literal["plan"]
    steps: list[Step] = Field(min_length=1)
    owner: Step | None
    ratio: float = Field(gt=0.25)


async def test_json_answers_are_valid_for_their_schema() -> None:
    async with running() as run:
        client = run.sdk()
        parsed = await client.chat.completions.parse(model=PLAIN, messages=HELLO, response_format=Plan)
        plan = parsed.choices[0].message.parsed
        assert isinstance(plan, Plan), "the SDK validated the answer against the schema it sent"
        assert plan.steps[0].minutes == 5 and len(plan.steps[0].tags) == 2 and plan.ratio > 0.25

        thinking = await client.chat.completions.parse(model=THINKER, messages=HELLO, response_format=Weather)
        assert isinstance(thinking.choices[0].message.parsed, Weather)
        assert extra(thinking.choices[0].message, "reasoning_content") == REASONING

        loose = await client.chat.completions.create(model=PLAIN, messages=HELLO,
                                                     response_format={"type": "json_object"})
        assert orjson.loads(loose.choices[0].message.content or "") == {"reply": REPLY}
        run.emulator.script_answers(KEY, [{"json": {"verdict": "ok", "score": 0.9}}])
        streamed = chunks((await run.chat(stream=True)).text)
        pieces = [c["choices"][0]["delta"]["content"] for c in streamed[1:-1]]
        assert len(pieces) > 1 and orjson.loads("".join(pieces)) == {"verdict": "ok", "score": 0.9}
        bad = error(await run.chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}))
        assert bad[0] == 400 and "json_schema needs" in bad[2]


# --- $web_search --------------------------------------------------------------------------------------------


async def test_a_web_search_round_trip() -> None:
    async with running() as run:
        run.emulator.script_answers(KEY, [{"web_search": "kimi-pool release notes"}])
        asked = [{"role": "user", "content": "What is new in kimi-pool?"}]
        first = (await run.chat(messages=asked, tools=[WEB_SEARCH])).json()
        choice = first["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        call = choice["message"]["tool_calls"][0]
        assert call["type"] == "builtin_function" and call["function"]["name"] == "$web_search"
        arguments = orjson.loads(call["function"]["arguments"])
        assert set(arguments) == {"search_result", "usage"} and arguments["usage"] == {"total_tokens": 1000}
        assert run.emulator.stats.totals.web_searches == 1

        echo = [*asked, choice["message"],
                {"role": "tool", "tool_call_id": call["id"], "name": "$web_search",
                 "content": call["function"]["arguments"]}]
        answer = await run.sdk().chat.completions.create(model=PLAIN, messages=echo, tools=[WEB_SEARCH])
        assert answer.choices[0].finish_reason == "stop"
        assert answer.choices[0].message.content == f'Searched the web for "kimi-pool release notes". {REPLY}'
        assert answer.usage is not None and answer.usage.prompt_tokens > 1000, "the results are billed as prompt"

        run.emulator.script_answers(KEY, [{"web_search": "anything"}])
        unoffered = (await run.chat(messages=asked)).json()["choices"][0]
        assert unoffered["message"]["content"] == REPLY and unoffered["finish_reason"] == "stop"
        assert run.emulator.stats.totals.web_searches == 1


# --- cached tokens, prefix mode, records, models -----------------------------------------------------------------


async def test_the_second_turn_reports_the_repeated_prefix_as_cached() -> None:
    async with running() as run:
        client = run.sdk()
        first = await client.chat.completions.create(model=PLAIN, messages=HELLO)
        assert first.usage is not None and first.usage.prompt_tokens_details is None
        turn = [*HELLO, {"role": "assistant", "content": REPLY}, {"role": "user", "content": "Tell me more."}]
        second = await client.chat.completions.create(model=PLAIN, messages=turn)
        assert second.usage is not None and second.usage.prompt_tokens_details is not None
        assert second.usage.prompt_tokens_details.cached_tokens == HELLO_TOKENS
        assert extra(second.usage, "cached_tokens") == HELLO_TOKENS, "Kimi also puts it at the top of usage"
        assert second.usage.prompt_tokens > HELLO_TOKENS

        other_org = await run.sdk(OTHER).chat.completions.create(model=PLAIN, messages=turn)
        assert other_org.usage is not None and other_org.usage.prompt_tokens_details is None, "per organization"
        other_model = await client.chat.completions.create(model="moonshot-v1-8k", messages=HELLO)
        assert other_model.usage is not None and other_model.usage.prompt_tokens_details is None, "per model"
        stream = (await run.chat(messages=turn, stream=True, stream_options={"include_usage": True})).text
        assert chunks(stream)[-1]["usage"]["cached_tokens"] > HELLO_TOKENS, "the whole second turn, seen before"
        assert run.emulator.stats.keys[KEY].cached_tokens == HELLO_TOKENS + chunks(stream)[-1]["usage"][
            "cached_tokens"]


async def test_prefix_mode_continues_the_partial_assistant_message() -> None:
    async with running() as run:
        client = run.sdk()
        prefix = {"role": "assistant", "content": "Hello from the", "partial": True}
        reply = await client.chat.completions.create(model=PLAIN, messages=[*HELLO, prefix])
        assert "Hello from the" + (reply.choices[0].message.content or "") == REPLY
        stream = (await run.chat(messages=[*HELLO, prefix], stream=True)).text
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks(stream)) == \
            " Moonshot emulator, a deterministic reply for testing the gateway."
        other = {"role": "assistant", "content": "Dear user,", "partial": True}
        continued = await client.chat.completions.create(model=PLAIN, messages=[*HELLO, other])
        assert continued.choices[0].message.content == " " + REPLY


async def test_the_last_request_bodies_are_recorded_per_key() -> None:
    async with running(MoonshotEmulatorConfig.simple(2, recorded_requests=2)) as run:
        for effort in ("low", "high"):
            await run.chat(model=THINKER, reasoning_effort=effort)
        await run.chat(model=THINKER, thinking={"type": "disabled"}, tools=[WEATHER])
        recorded = run.emulator.recent_requests(KEY)
        assert [body.get("reasoning_effort") for body in recorded] == ["high", None]
        assert recorded[-1]["thinking"] == {"type": "disabled"} and recorded[-1]["tools"] == [WEATHER]
        state = (await run.http.get("/__fake/state")).json()
        assert state["keys"][KEY]["recent_requests"] == recorded and state["keys"][OTHER]["recent_requests"] == []
        await run.http.post("/__fake/reset")
        assert run.emulator.recent_requests(KEY) == []


async def test_models_carry_their_traits() -> None:
    async with running() as run:
        raw = (await run.http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).json()["data"]
        traits = {m["id"]: (m["context_length"], m["supports_reasoning"], m["thinking"], m["supports_image_in"],
                            m["forced_tool_choice_with_thinking"]) for m in raw}
        assert traits["kimi-k3"] == (524_288, True, "always", True, True)
        assert traits["kimi-k2.5"] == (262_144, True, "default_on", True, False)
        assert traits["kimi-k2-thinking"] == (262_144, True, "always", False, False)
        assert traits["moonshot-v1-8k"] == (8_192, False, "none", False, False)
