"""The Anthropic Messages operations (``messages_post``, ``messages_count_tokens_post``, ``models_list``,
``models_get``) fuzzed against Anthropic's own OpenAPI description (``llm-comply``'s ``anthropic.json``) with
schemathesis: a real gateway on loopback, in front of the Moonshot emulator, must never answer a 500, must reject
what the spec says is invalid, and must answer what it serves in the spec's shape. Seeded and bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import orjson
import pytest

from app.clock import ManualClock
from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import MASTER_KEY, run_gateway, serve

pytestmark = pytest.mark.conformance

SEED = 20261204
EXAMPLES = 60
OPERATIONS = ("messages_post", "messages_count_tokens_post", "models_list", "models_get")
CHECKS = ("not_a_server_error", "response_schema_conformance", "content_type_conformance",
          "negative_data_rejection", "missing_required_header", "unsupported_method")
HOOKS = '''
import schemathesis


@schemathesis.hook
def map_body(context, body):
    """Whole answers only: the spec describes the JSON message, not the event stream."""
    if isinstance(body, dict) and body.get("stream") is True:
        body["stream"] = False
    return body
'''


def spec() -> Path:
    llm_comply = pytest.importorskip("llm_comply")
    return Path(llm_comply.__file__).parent / "specs" / "anthropic.json"


def aliases(path: Path) -> str:
    """Every Claude model name the spec enumerates, as an alias of an emulated Kimi model: generated requests then
    reach the upstream and come back as answers whose shape is checked, not only as 404s."""
    model = orjson.loads(path.read_bytes())["components"]["schemas"]["Model"]
    names = {branch["const"] for branch in model["anyOf"] if "const" in branch}
    return "".join(f'[aliases."{name}"]\nmoonshot = "kimi-k2-0905-preview"\n\n' for name in sorted(names))


async def test_the_messages_operations_conform_to_anthropics_spec(tmp_path: Path) -> None:
    path = spec()
    clock = ManualClock()
    emulator = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=2), clock=clock)
    (tmp_path / "kp_hooks.py").write_text(HOOKS)
    async with contextlib.AsyncExitStack() as stack:
        emulator_url = await stack.enter_async_context(serve(emulator))
        accounts = "".join(f'[[accounts]]\nname = "acct-{i}"\nkind = "moonshot"\napi_key = "{key}"\n'
                           f'base_url = "{emulator_url}/v1"\n\n'
                           for i, key in enumerate(sorted(emulator.state.emulator.config.keys), start=1))
        gateway = await stack.enter_async_context(run_gateway(tmp_path, accounts + aliases(path), clock=clock))
        command = [sys.executable, "-m", "schemathesis.cli", "run", str(path), "--url", gateway.url,
                   "--header", f"x-api-key: {MASTER_KEY}", "--header", "anthropic-version: 2023-06-01",
                   "--checks", ",".join(CHECKS), "--max-examples", str(EXAMPLES), "--seed", str(SEED),
                   "--generation-deterministic", "--workers", "1", "--no-color",
                   "--phases", "examples,coverage,fuzzing"]
        for operation in OPERATIONS:
            command += ["--include-operation-id", operation]
        process = await asyncio.create_subprocess_exec(
            *command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "SCHEMATHESIS_HOOKS": "kp_hooks", "PYTHONPATH": str(tmp_path)})
        output, _ = await process.communicate()
        report = output.decode(errors="replace")
        assert process.returncode == 0, report
        assert " passed" in report and "failed" not in report, report
        served = emulator.state.emulator.snapshot()["totals"]
        assert served["by_status"].get("200", 0) > 0, "some generated requests were answered, not only refused"
        assert gateway.gateway.pool.accounts["acct-1"].in_flight == 0
