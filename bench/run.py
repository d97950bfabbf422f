"""``make bench``: kimi-pool side by side with a direct call, a minimal passthrough and LiteLLM.

One run starts the Moonshot emulator (4 keys, no limits) and, one at a time, each path under test:

* direct     — the load generator talks to the emulator itself;
* passthrough — ``bench/passthrough.py``, the smallest Starlette + aiohttp relay (the yardstick);
* kimi-pool  — ``kimi-pool serve`` with the 4 keys as accounts, a master key, a fresh SQLite file;
* litellm    — ``litellm --config`` with the same 4 deployments, no database, telemetry off,
  from its own virtualenv (created on first use: ``$BENCH_LITELLM_VENV`` or ``.venv-litellm``).

The server under test runs on CPU 1; the emulator and the load generators on CPU 0, so the
gateway's single worker is not preempted by the load it serves. Figures: wrk (non-streaming
req/s and latency at 32 and 128 connections, streaming req/s), ``bench/streams.py`` (32 and 500
concurrent slow streams: 20 chunks over ~1 s), RSS from /proc, CPU time per request.

    python bench/run.py [--duration 10] [--only direct,passthrough,kimi-pool] [--no-litellm]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
OUT = ROOT / "bench" / "out"
PORTS = {"emulator": 9101, "passthrough": 9103, "kimi-pool": 9102, "litellm": 9104}
KEYS = [f"sk-emu-{n:04d}" for n in range(1, 5)]
MASTER = "bench-master-key-0123456789"
MODEL = "kimi-k2-0905-preview"
PROMPT = [{"role": "user", "content": "Benchmark me."}]
BODY = json.dumps({"model": MODEL, "messages": PROMPT})
STREAM_BODY = json.dumps({"model": MODEL, "messages": PROMPT, "stream": True})
CLK_TCK = os.sysconf("SC_CLK_TCK")


def url_of(name: str) -> str:
    return f"http://127.0.0.1:{PORTS[name]}/v1/chat/completions"


def taskset(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def post(url: str, body: str, key: str = "", timeout: float = 5.0) -> int:
    request = urllib.request.Request(url, data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def wait_ready(url: str, key: str, proc: subprocess.Popen[bytes], limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        if post(url, BODY, key) == 200:
            return
        time.sleep(0.2)  # a benchmark harness waiting for a server it started; not a test
    raise SystemExit(f"{url} did not come up in {limit:.0f}s")


@contextmanager
def started(cmd: list[str], *, cpu: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([*taskset(cpu), *cmd], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def memory_mb(pid: int) -> dict[str, float]:
    """RSS now and its peak (VmHWM) of the process and its children (LiteLLM forks workers)."""
    rss = hwm = 0.0
    for p in [pid, *_children(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        rss += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        hwm += int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    return {"rss_mb": round(rss, 1), "peak_mb": round(hwm, 1)}


def _children(pid: int) -> list[int]:
    try:
        found = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return found + [g for c in found for g in _children(c)]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, body: str, key: str, connections: int, duration: int) -> dict[str, float]:
    cmd = [*taskset("0"), "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "30s",
           "-s", str(ROOT / "bench" / "post.lua"), url]
    out = subprocess.run(cmd, env={**os.environ, "BODY": body, "KEY": key}, capture_output=True, text=True,
                         check=True).stdout
    latency = {q: float(v) * _UNITS[u] for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\b", out, re.M)}
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": round(latency.get("50", float("nan")), 2), "p99_ms": round(latency.get("99", float("nan")), 2),
        "requests": requests,
        "errors": (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0),
    }


def streams(url: str, n: int, key: str) -> dict[str, float]:
    cmd = [*taskset("0"), str(BIN / "python"), str(ROOT / "bench" / "streams.py"), url, str(n), "--key", key]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def emulator_config(changes: Mapping[str, object]) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{PORTS['emulator']}/__fake/config",
                                     data=json.dumps(changes).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def litellm_venv() -> Path:
    venv = Path(os.environ.get("BENCH_LITELLM_VENV", ROOT / ".venv-litellm"))
    if not (venv / "bin" / "litellm").exists():
        print(f"installing litellm[proxy] into {venv} (once)…", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return venv


def target_command(name: str, work: Path) -> tuple[list[str], dict[str, str], str]:
    """(command, extra environment, key clients use) for a path under test."""
    upstream = f"http://127.0.0.1:{PORTS['emulator']}/v1"
    port = str(PORTS[name])
    if name == "passthrough":
        keys = [arg for key in KEYS for arg in ("--key", key)]
        return [str(BIN / "python"), str(ROOT / "bench" / "passthrough.py"), "--port", port, "--upstream", upstream,
                *keys], {}, ""
    if name == "kimi-pool":
        toml = work / "accounts.toml"
        toml.write_text("".join(f'[[accounts]]\nname = "emu-{i}"\nkind = "moonshot"\napi_key = "{key}"\n'
                                f'base_url = "{upstream}"\n\n' for i, key in enumerate(KEYS, 1)))
        db = f"sqlite+aiosqlite:///{work}/bench.db"
        return [str(BIN / "kimi-pool"), "--db", db, "serve", "--port", port, "--accounts", str(toml),
                "--log-level", "warning"], {"KIMI_POOL_MASTER_KEY": MASTER}, MASTER
    if name == "litellm":
        venv = litellm_venv()
        config = work / "litellm.yaml"
        deployments = "".join(
            f"  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n"
            f"      api_base: {upstream}\n      api_key: {key}\n" for key in KEYS)
        config.write_text(f"model_list:\n{deployments}litellm_settings:\n  telemetry: false\n"
                          "  drop_params: true\n")
        litellm_key = "sk-bench-" + "0123456789abcdef" * 4  # a master key, as kimi-pool has one
        env = {"LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION",
               "LITELLM_MASTER_KEY": litellm_key, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        return [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", port,
                "--num_workers", "1"], env, litellm_key
    raise ValueError(name)


def measure(name: str, pid: int | None, key: str, duration: int) -> dict[str, object]:
    url = url_of(name)
    result: dict[str, object] = {}
    if pid is not None:
        result["idle"] = memory_mb(pid)
    for connections in (32, 128):
        before = cpu_seconds(pid) if pid is not None else 0.0
        figures = wrk(url, BODY, key, connections, duration)
        if pid is not None:
            figures["cpu_ms_per_req"] = round((cpu_seconds(pid) - before) * 1000 / max(1, figures["requests"]), 3)
        result[f"json_c{connections}"] = figures
        print(f"  {name:12} json c{connections}: {figures}", file=sys.stderr)
    result["stream_c32"] = wrk(url, STREAM_BODY, key, 32, duration)
    print(f"  {name:12} stream c32: {result['stream_c32']}", file=sys.stderr)
    return result


def measure_slow(name: str, pid: int | None, key: str) -> dict[str, object]:
    result: dict[str, object] = {}
    for n in (32, 500):
        result[f"slow_{n}"] = streams(url_of(name), n, key)
        print(f"  {name:12} slow streams x{n}: {result[f'slow_{n}']}", file=sys.stderr)
    if pid is not None:
        result["after_streams"] = memory_mb(pid)
    return result


def versions(names: list[str]) -> dict[str, str]:
    found = {"python": platform.python_version(), "machine": f"{os.cpu_count()} cores, {platform.machine()}"}
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    found["kimi-pool"] = sha.stdout.strip() or "?"
    for package in ("starlette", "uvicorn", "aiohttp", "orjson", "uvloop", "httptools"):
        found[package] = importlib.metadata.version(package)
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    found["wrk"] = (wrk_version.stdout or wrk_version.stderr).split("[")[0].strip()
    if "litellm" in names:
        code = "import importlib.metadata as m; print(m.version('litellm'))"
        out = subprocess.run([str(litellm_venv() / "bin" / "python"), "-c", code], capture_output=True, text=True)
        found["litellm"] = out.stdout.strip()
    return found


def save(filename: str, results: object, command: str, **extra: object) -> None:
    """Write a run's figures to ``bench/out/FILENAME`` (and stdout) with when and how they were made."""
    payload = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), **extra, "results": results, "command": command}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / filename).write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description="kimi-pool side-by-side benchmark")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--only", default="direct,passthrough,kimi-pool,litellm")
    parser.add_argument("--no-litellm", action="store_true")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n and not (args.no_litellm and n == "litellm")]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, object]] = {}
    emulator = [str(BIN / "kimi-pool"), "emulate", "moonshot", "--port", str(PORTS["emulator"]), "--keys", "4",
                "--balance", "1e12"]  # never run out of credit mid-benchmark
    with tempfile.TemporaryDirectory() as tmp, started(emulator, cpu="0") as emu:
        wait_ready(url_of("emulator"), KEYS[0], emu)
        fast = {"chunk_interval": 0.0, "reply_words": 12}
        slow = {"chunk_interval": 0.05, "reply_words": 20}  # 20 chunks over about one second
        for name in names:
            print(f"== {name}", file=sys.stderr)
            emulator_config(fast)
            if name == "direct":
                results[name] = measure("emulator", None, KEYS[0], args.duration)
                emulator_config(slow)
                results[name] |= measure_slow("emulator", None, KEYS[0])
                results[name]["emulator_cpu_note"] = "emulator and load generator share CPU 0"
                continue
            cmd, env, key = target_command(name, Path(tmp))
            with started(cmd, cpu="1", env=env) as proc:
                wait_ready(url_of(name), key, proc)
                for _ in range(50):
                    post(url_of(name), BODY, key)  # warm up
                results[name] = measure(name, proc.pid, key, args.duration)
                emulator_config(slow)
                results[name] |= measure_slow(name, proc.pid, key)
    save("latest.json", results, "python bench/run.py " + " ".join(sys.argv[1:]), versions=versions(names))


if __name__ == "__main__":
    main()
