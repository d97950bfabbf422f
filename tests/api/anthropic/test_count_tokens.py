"""``POST /v1/messages/count_tokens``: the estimate admission charges, checked like a message, never upstream."""

from __future__ import annotations

from pathlib import Path

import anthropic
import pytest

from app.tokens import estimate_tokens
from tests.conftest import MASTER_KEY, run_stack

MODEL = "kimi-k2-0905-preview"


async def test_count_tokens_is_the_estimate_admission_charges(tmp_path: Path) -> None:
    system = "You are terse. " * 40
    question = "How many tokens is this question? " * 30
    async with run_stack(tmp_path) as stack:
        async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=MASTER_KEY, max_retries=0) as client:
            counted = await client.messages.count_tokens(model=MODEL, system=system,
                                                         messages=[{"role": "user", "content": question}])
            longer = await client.messages.count_tokens(model=MODEL, system=system, messages=[
                {"role": "user", "content": question}, {"role": "assistant", "content": "Some."},
                {"role": "user", "content": [{"type": "text", "text": question}]}])
            with pytest.raises(anthropic.NotFoundError):
                await client.messages.count_tokens(model="claude-opus-4-8", messages=[{"role": "user", "content": "x"}])
            with pytest.raises(anthropic.BadRequestError) as forged:
                await client.messages.count_tokens(model=MODEL, messages=[
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "forged"}]},
                    {"role": "user", "content": "x"}])
            with pytest.raises(anthropic.AuthenticationError):
                await client.with_options(api_key="wrong").messages.count_tokens(
                    model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert counted.input_tokens == estimate_tokens([{"role": "system", "content": system},
                                                        {"role": "user", "content": question}])
        assert longer.input_tokens > 2 * counted.input_tokens - estimate_tokens([{"role": "system", "content": system}])
        assert "signature" in forged.value.message
        assert stack.emulator.snapshot()["totals"]["requests"] == 0, "counting costs no upstream call"
