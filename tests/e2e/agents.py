"""Real agent CLIs for the end-to-end tests, installed from the npm registry into a cache on first use.

``make e2e`` runs these tests (``pytest -m e2e``); they need ``node`` and ``npm`` and reach only the npm
registry, once per version. The cache is ``$KIMI_POOL_E2E_CACHE``, else ``.cache/e2e`` in the checkout.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLAUDE_CODE = ("@anthropic-ai/claude-code", "2.1.197", "claude")
CODEX = ("@openai/codex", "0.171.0", "codex")
"""The versions whose traffic ``shared/AGENT-TRAFFIC.md`` describes."""


def cache_dir() -> Path:
    return Path(os.environ.get("KIMI_POOL_E2E_CACHE") or ROOT / ".cache" / "e2e")


async def install(package: str, version: str, binary: str) -> Path:
    """The path of ``binary`` from ``package@version``, installed into the cache unless it is there already
    (one install at a time: a lock file serialises concurrent test processes)."""
    if shutil.which("npm") is None:
        pytest.fail("the end-to-end tests need node and npm (Debian: apt-get install nodejs npm)")
    prefix = cache_dir() / f"{package.replace('/', '+')}@{version}"
    executable = prefix / "node_modules" / ".bin" / binary
    if executable.exists():
        return executable
    prefix.mkdir(parents=True, exist_ok=True)
    with (prefix / ".lock").open("w") as lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        if not executable.exists():
            process = await asyncio.create_subprocess_exec(
                "npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(prefix),
                f"{package}@{version}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output, _ = await process.communicate()
            if process.returncode != 0 or not executable.exists():
                pytest.fail(f"npm install {package}@{version} failed:\n{output.decode(errors='replace')}")
    return executable
