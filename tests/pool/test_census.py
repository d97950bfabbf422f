"""A request that nothing in the pool can serve is told why and what fixes it, through the SDK: the pool has
no account (add one), none is enabled (enable one), only disabled accounts serve the model, or no account
does (these models are served). What a client reads names no account."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from app.cli import run
from app.clock import ManualClock
from app.errors import SEE_MODELS
from tests.conftest import Gateway, reload, run_gateway

HELLO: Any = [{"role": "user", "content": "hello"}]
NOWHERE = "http://127.0.0.1:9/v1"  # never asked: these requests are refused before any upstream


def account(name: str, kind: str = "moonshot", *, enabled: bool = True) -> str:
    secret = 'api_key = "sk-test-0123456789abcdef"\n' if kind == "moonshot" else ""
    return (f'[[accounts]]\nname = "{name}"\nkind = "{kind}"\n{secret}base_url = "{NOWHERE}"\n'
            f"enabled = {str(enabled).lower()}\n\n")


async def refused(gateway: Gateway, model: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(model=model, messages=HELLO)
    error = caught.value
    error.message = error.body["message"]  # type: ignore[index]  # without the SDK's "Error code: …" prefix
    return error


async def test_a_pool_without_accounts_says_to_add_one_until_one_is_added(tmp_path: Path) -> None:
    async with run_gateway(tmp_path, "", clock=ManualClock()) as gateway:
        error = await refused(gateway, "kimi-k2")
        assert (error.status_code, error.code, error.type) == (503, "no_accounts", "service_unavailable")
        assert "has no accounts yet" in error.message and "kimi-pool accounts add" in error.message
        assert "kimi-pool accounts import" in error.message
        assert "retry-after" not in error.response.headers, "an operator fixes this, not a retry"

        assert await asyncio.to_thread(run, ["--db", gateway.db_url, "accounts", "add", "m", "--kind", "kimi-ai-chat",
                                             "--base-url", NOWHERE.removesuffix("/v1")]) == 0
        await reload(gateway)
        error = await refused(gateway, "gpt-4o")
        assert (error.status_code, error.code) == (404, "model_not_found")


async def test_a_pool_whose_accounts_are_all_disabled_says_to_enable_one(tmp_path: Path) -> None:
    async with run_gateway(tmp_path, account("a", enabled=False) + account("b", enabled=False),
                           clock=ManualClock()) as gateway:
        error = await refused(gateway, "kimi-k2")
        assert (error.status_code, error.code) == (503, "no_enabled_account")
        assert "Every account of this kimi-pool (2) is disabled" in error.message
        assert "kimi-pool accounts enable NAME" in error.message
        assert "'a'" not in error.message and " b " not in error.message, "no account is named to a client"


async def test_a_model_is_refused_with_the_models_served_or_the_fix_when_only_disabled_accounts_serve_it(
        tmp_path: Path) -> None:
    async with run_gateway(tmp_path, account("m") + account("chat", "kimi-ai-chat", enabled=False),
                           clock=ManualClock()) as gateway:
        served = sorted(gateway.gateway.pool.models())
        assert "kimi-k2-0905-preview" in served and "kimi-k2-instruct" not in served

        error = await refused(gateway, "gpt-4o")
        assert (error.status_code, error.code, error.param) == (404, "model_not_found", "model")
        assert error.message == (f"The model 'gpt-4o' is not served by this kimi-pool. "
                                 f"The models served are: {', '.join(served)}. {SEE_MODELS}")

        error = await refused(gateway, "kimi-k2-instruct")
        assert (error.status_code, error.code) == (404, "model_not_found")
        assert error.message.startswith("The model 'kimi-k2-instruct' is served only by disabled accounts; the "
                                        "operator enables one with 'kimi-pool accounts enable NAME'.")

        with pytest.raises(openai.NotFoundError) as single:
            await gateway.client().models.retrieve("gpt-4o")
        assert "The models served are: " in single.value.message
