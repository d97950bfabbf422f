"""``python -m bench.workers``: what more worker processes buy, kimi-pool beside the minimal passthrough.

The same emulator and load generators as ``bench/run.py``, but nothing is pinned to a CPU: a second
worker needs the second core, which the emulator and wrk then share with it. In one run, one at a
time: the passthrough with 1 and with N uvicorn workers (each worker its own key ring: nothing
shared), kimi-pool with 1 worker and with ``serve --workers N`` (one pool for all). Figures:
non-streaming req/s and latency at 32 and 128 connections, CPU per request and RSS of the whole
process tree, 500 concurrent slow streams.

    python -m bench.workers [--workers 2] [--duration 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.run import (
    BIN,
    BODY,
    KEYS,
    PORTS,
    cpu_seconds,
    emulator_config,
    memory_mb,
    post,
    save,
    started,
    streams,
    url_of,
    versions,
    wait_ready,
    wrk,
)
from bench.run import target_command as single_target

ALL_CPUS = f"0-{(os.cpu_count() or 1) - 1}"


def target(name: str, workers: int, work: Path) -> tuple[list[str], dict[str, str], str]:
    cmd, env, key = single_target(name, work)
    if workers > 1:
        cmd += ["--workers", str(workers)]
    return cmd, env, key


def measure(name: str, pid: int, key: str, duration: int, slow: bool) -> dict[str, object]:
    url = url_of(name)
    result: dict[str, object] = {"idle": memory_mb(pid)}
    for connections in (32, 128):
        before = cpu_seconds(pid)
        figures = wrk(url, BODY, key, connections, duration)
        figures["cpu_ms_per_req"] = round((cpu_seconds(pid) - before) * 1000 / max(1, figures["requests"]), 3)
        result[f"json_c{connections}"] = figures
        print(f"  json c{connections}: {figures}", file=sys.stderr)
    if slow:
        emulator_config({"chunk_interval": 0.05, "reply_words": 20})
        result["slow_500"] = streams(url, 500, key)
        print(f"  slow streams x500: {result['slow_500']}", file=sys.stderr)
        emulator_config({"chunk_interval": 0.0, "reply_words": 12})
    result["after"] = memory_mb(pid)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--no-streams", action="store_true", help="skip the 500 slow streams")
    args = parser.parse_args()
    results: dict[str, dict[str, object]] = {}
    emulator = [str(BIN / "kimi-pool"), "emulate", "moonshot", "--port", str(PORTS["emulator"]), "--keys", "4",
                "--balance", "1e12"]
    with tempfile.TemporaryDirectory() as tmp, started(emulator, cpu=ALL_CPUS) as emu:
        wait_ready(url_of("emulator"), KEYS[0], emu)
        emulator_config({"chunk_interval": 0.0, "reply_words": 12})
        for name in ("passthrough", "kimi-pool"):
            for workers in (1, args.workers):
                label = f"{name} x{workers}"
                print(f"== {label}", file=sys.stderr)
                work = Path(tmp) / f"{name}-{workers}"
                work.mkdir()
                cmd, env, key = target(name, workers, work)
                with started(cmd, cpu=ALL_CPUS, env=env) as proc:
                    wait_ready(url_of(name), key, proc)
                    for _ in range(200):  # warm up every worker
                        post(url_of(name), BODY, key)
                    results[label] = measure(name, proc.pid, key, args.duration, not args.no_streams)
    save("workers.json", results, "python -m bench.workers " + " ".join(sys.argv[1:]),
         versions=versions(["kimi-pool"]))


if __name__ == "__main__":
    main()
