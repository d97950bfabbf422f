"""``GET /metrics`` end to end: traffic through the real stack, the Prometheus text parsed back."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MASTER_KEY, Stack, create_client_key, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "hello"}]
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}

Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(stack: Stack) -> Samples:
    """Every sample of ``/metrics``, by sample name (``…_total``, ``…_bucket``, ``…_count``)."""
    async with stack.http() as http:
        response = await http.get("/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def by(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples of ``name`` summed by the given labels (a label-less total under ``()``)."""
    out: Counter[tuple[str, ...]] = Counter()
    for sample_labels, value in samples.get(name, []):
        out[tuple(sample_labels[label] for label in labels)] += value  # type: ignore[assignment]
    return dict(out)


async def test_metrics_match_the_traffic_clients_saw(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack:
        stack.emulator.script("sk-emu-0001", [{"kind": "rate_limit", "wait": 30}])  # acct-1's first answer: 429
        client = stack.client()
        requests: Counter[tuple[str, str]] = Counter()
        prompt: Counter[str] = Counter()
        completion: Counter[str] = Counter()
        for _ in range(4):
            raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
            usage = raw.parse().usage
            assert usage is not None
            account = raw.headers["x-kimi-pool-account"]
            requests[(account, "ok")] += 1
            prompt[account] += usage.prompt_tokens
            completion[account] += usage.completion_tokens
        for _ in range(2):
            raw_stream = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True})
            chunks = [chunk async for chunk in raw_stream.parse()]
            usage = chunks[-1].usage
            assert usage is not None
            account = raw_stream.headers["x-kimi-pool-account"]
            requests[(account, "ok")] += 1
            prompt[account] += usage.prompt_tokens
            completion[account] += usage.completion_tokens
        with pytest.raises(openai.AuthenticationError):  # turned away at the door: counted, not timed
            await stack.client("not-a-key").chat.completions.create(model=MODEL, messages=HELLO)
        requests[("", "invalid_api_key")] += 1
        with pytest.raises(openai.NotFoundError):  # a model nobody serves is not a label
            await client.chat.completions.create(model="no-such-model-7f3a", messages=HELLO)
        requests[("", "model_not_found")] += 1
        assert stack.emulator.snapshot()["totals"]["by_status"] == {"200": 6, "429": 1}
        assert ("acct-1", "ok") not in requests, "acct-1 failed over and is cooling down"

        samples = await scrape(stack)
        assert by(samples, "kimi_pool_requests_total", "account", "outcome") == requests
        assert by(samples, "kimi_pool_requests_total", "client_key") == {("master",): 7, ("",): 1}
        assert by(samples, "kimi_pool_requests_total", "model") == {(MODEL,): 6, ("",): 2}
        assert by(samples, "kimi_pool_prompt_tokens_total", "account") == {(a,): n for a, n in prompt.items()}
        assert by(samples, "kimi_pool_completion_tokens_total", "account") == {(a,): n for a, n in completion.items()}
        assert by(samples, "kimi_pool_upstream_errors_total", "account", "error") == {("acct-1", "RateLimited"): 1}

        assert by(samples, "kimi_pool_request_duration_seconds_count", "model", "stream") == {
            (MODEL, "false"): 4, (MODEL, "true"): 2}
        assert by(samples, "kimi_pool_time_to_first_token_seconds_count", "model") == {(MODEL,): 2}
        assert by(samples, "kimi_pool_queue_wait_seconds_count") == {(): 6}
        assert by(samples, "kimi_pool_queue_wait_seconds_sum") == {(): 0.0}, "nobody waited on the manual clock"
        assert not any(name.endswith("_created") for name in samples)

        states = {labels["account"]: labels["state"] for labels, value in samples["kimi_pool_account_state"]
                  if value == 1}
        assert states == {"acct-1": "cooling_down", "acct-2": "active", "acct-3": "active"}
        assert len(samples["kimi_pool_account_state"]) == 3 * 5, "every state of every account, 0 or 1"
        assert by(samples, "kimi_pool_account_in_flight", "account") == {("acct-1",): 0, ("acct-2",): 0,
                                                                          ("acct-3",): 0}
        assert by(samples, "kimi_pool_queue_depth") == {(): 0}

        stack.clock.advance(31)  # the cooldown is over: the gauge says so, and counters are not counted twice
        again = await scrape(stack)
        assert ("acct-1", "active") in {(labels["account"], labels["state"])
                                        for labels, value in again["kimi_pool_account_state"] if value == 1}
        assert by(again, "kimi_pool_requests_total", "account", "outcome") == requests


async def test_queue_depth_in_flight_and_wait_time(tmp_path: Path) -> None:
    async with run_stack(tmp_path, account_extra={"concurrency": 1}) as stack:
        stack.emulator.script(None, [{"kind": "hold_after", "chunks": 0}] * 3)
        client = stack.client()
        held = [asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO)) for _ in range(3)]
        await stack.emulator.wait_for(lambda e: e.held == 3)
        queued = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO))
        await stack.gateway.admission.wait_depth(1)
        stack.clock.advance(5)

        busy = await scrape(stack)
        assert by(busy, "kimi_pool_queue_depth") == {(): 1}
        assert by(busy, "kimi_pool_account_in_flight", "account") == {("acct-1",): 1, ("acct-2",): 1,
                                                                       ("acct-3",): 1}
        assert "kimi_pool_requests_total" not in busy, "nothing has finished yet"

        stack.emulator.release()
        await asyncio.gather(*held, queued)
        done = await scrape(stack)
        assert by(done, "kimi_pool_queue_depth") == {(): 0}
        assert set(by(done, "kimi_pool_account_in_flight", "account").values()) == {0}
        waits = by(done, "kimi_pool_queue_wait_seconds_bucket", "le")
        assert (waits[("0.001",)], waits[("2.5",)], waits[("5.0",)], waits[("+Inf",)]) == (3, 3, 4, 4)
        assert by(done, "kimi_pool_queue_wait_seconds_sum") == {(): 5.0}
        assert by(done, "kimi_pool_requests_total", "outcome") == {("ok",): 4}


async def test_metrics_need_the_master_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        alice = await create_client_key(stack, "alice", capsys)
        assert (await stack.client(alice).chat.completions.create(model=MODEL, messages=HELLO)).choices

        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = await http.get("/metrics", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {alice}"})
        assert response.status_code == 403 and "master key" in response.json()["error"]["message"]
        assert (await http.get("/metrics", headers=AUTH)).status_code == 200


async def test_an_open_gateway_serves_metrics_without_a_key(tmp_path: Path) -> None:
    async with run_stack(tmp_path, settings={"master_key": None}) as stack, stack.http() as http:
        response = await http.get("/metrics")
        assert response.status_code == 200
        assert "kimi_pool_queue_depth 0.0" in response.text
