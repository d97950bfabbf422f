"""Real Claude Code (the npm package, the version ``shared/AGENT-TRAFFIC.md`` describes) through a real
``kimi-pool serve`` in front of the Moonshot emulator, offline and with no login: the README's "Use with Claude
Code" block, run as written (plus ``--output-format json``), completes a Bash tool task with thinking on and off,
and a failure in the middle of a stream ends the run with the error, never with a silent empty success."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.emulator.moonshot import MoonshotEmulator, MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import MASTER_KEY, gateway_process, serve
from tests.e2e.agents import CLAUDE_CODE, ROOT, install

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
KEY = "sk-emu-0001"
WRITE = {"command": "echo hi > out.txt", "description": "Write out.txt"}
SCRIPT: Any = [{"reasoning": "The user wants a file; Bash can write it.", "tool_calls": [{"name": "Bash",
                                                                                          "arguments": WRITE}]},
               {"reasoning": "The command ran.", "content": "Created out.txt."}]


def readme_block() -> tuple[dict[str, str], list[str]]:
    """The environment and the command of the README's "Use with Claude Code" block."""
    section = (ROOT / "README.md").read_text().split("## Use with Claude Code", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    env: dict[str, str] = {}
    command: list[str] = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = value
        elif words and words[0] == "claude":
            command = words
    assert {"ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_MODEL"} <= env.keys() and command, block
    return env, command


@dataclass
class Run:
    code: int
    result: dict[str, Any]
    workdir: Path


@dataclass
class Pool:
    url: str
    emulator: MoonshotEmulator
    tmp_path: Path

    async def claude(self, **extra_env: str) -> Run:
        """The README's block on this pool, in a fresh HOME and working directory."""
        claude = await install(*CLAUDE_CODE)
        env, command = readme_block()
        env.update(ANTHROPIC_BASE_URL=self.url, ANTHROPIC_AUTH_TOKEN=MASTER_KEY)  # this pool, its key
        home, workdir = self.tmp_path / "home", self.tmp_path / "work"
        home.mkdir(exist_ok=True)
        workdir.mkdir(exist_ok=True)
        process = await asyncio.create_subprocess_exec(
            str(claude), *command[1:], "--output-format", "json", cwd=workdir,
            env={"PATH": os.environ["PATH"], "HOME": str(home), "DISABLE_AUTOUPDATER": "1",
                 "DISABLE_TELEMETRY": "1", **env, **extra_env},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 180)
        assert out.strip(), f"Claude Code printed nothing (exit {process.returncode}):\n{err.decode()}"
        return Run(process.returncode or 0, orjson.loads(out.splitlines()[-1]), workdir)

    def upstream(self) -> list[dict[str, Any]]:
        return self.emulator.recent_requests(KEY)


@contextlib.asynccontextmanager
async def pool(tmp_path: Path) -> AsyncIterator[Pool]:
    """``kimi-pool serve`` (a child process) with one Moonshot account on the emulator, serving the README's model."""
    model = readme_block()[0]["ANTHROPIC_MODEL"]
    emulator_app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1))
    async with serve(emulator_app) as emulator_url:
        accounts = (f'[[accounts]]\nname = "acct-1"\nkind = "moonshot"\napi_key = "{KEY}"\n'
                    f'base_url = "{emulator_url}/v1"\nmodels = ["{model}"]\n')
        async with gateway_process(tmp_path, emulator_url, accounts=accounts) as (_process, url, _log):
            yield Pool(url, emulator_app.state.emulator, tmp_path)


async def test_claude_code_runs_a_bash_tool_with_thinking_carried_back(tmp_path: Path) -> None:
    async with pool(tmp_path) as kimi:
        kimi.emulator.script_answers(KEY, SCRIPT)
        run = await kimi.claude()
        assert run.code == 0 and run.result["is_error"] is False, run.result
        assert run.result["result"] == "Created out.txt."
        assert (run.workdir / "out.txt").read_text() == "hi\n", "Claude Code ran the Bash call kimi-pool relayed"
        first, second = kimi.upstream()
        assert len(first["tools"]) >= 20 and all("$schema" not in t["function"]["parameters"] for t in first["tools"])
        assert "thinking" not in first, "adaptive thinking: K2.6 thinks by default"
        assistant = next(m for m in second["messages"] if m["role"] == "assistant")
        assert assistant["reasoning_content"] == SCRIPT[0]["reasoning"], "the thinking block came back as Kimi's own"
        assert assistant["tool_calls"][0]["id"] == "functions.Bash:0"
        assert second["messages"][-1]["role"] == "tool" and second["messages"][-1]["tool_call_id"] == "functions.Bash:0"


async def test_claude_code_with_thinking_off(tmp_path: Path) -> None:
    async with pool(tmp_path) as kimi:
        kimi.emulator.script_answers(KEY, SCRIPT)
        run = await kimi.claude(MAX_THINKING_TOKENS="0")
        assert run.code == 0 and run.result["result"] == "Created out.txt.", run.result
        assert (run.workdir / "out.txt").read_text() == "hi\n"
        first, second = kimi.upstream()
        assert first["thinking"] == second["thinking"] == {"type": "disabled"}
        assistant = next(m for m in second["messages"] if m["role"] == "assistant")
        assert "reasoning_content" not in assistant


async def test_a_failure_mid_stream_ends_claude_code_with_the_error(tmp_path: Path) -> None:
    async with pool(tmp_path) as kimi:
        # the stream breaks after three chunks; Claude Code asks again without streaming, and that breaks too
        kimi.emulator.script(KEY, [{"kind": "drop_after", "chunks": 3}] * 2)
        run = await kimi.claude(CLAUDE_CODE_MAX_RETRIES="0")
        assert run.code != 0 and run.result["is_error"] is True, run.result
        assert run.result["result"].startswith("API Error"), run.result
        assert not (run.workdir / "out.txt").exists()
        assert [body["stream"] for body in kimi.upstream()] == [True, False]


async def test_after_a_broken_stream_claude_codes_own_retry_recovers(tmp_path: Path) -> None:
    async with pool(tmp_path) as kimi:
        kimi.emulator.script(KEY, [{"kind": "drop_after", "chunks": 3}])
        kimi.emulator.script_answers(KEY, [{"content": "lost"}, *SCRIPT])
        run = await kimi.claude()
        assert run.code == 0 and run.result["result"] == "Created out.txt.", run.result
        assert (run.workdir / "out.txt").read_text() == "hi\n"
