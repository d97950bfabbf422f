"""Where kimi-pool's CPU goes under load: py-spy samples the server while wrk drives it.

Starts the emulator (CPU 0) and ``kimi-pool serve`` (CPU 1), runs wrk for the non-streaming body,
records the server with py-spy and prints each part's share of the event-loop thread's samples
(inclusive, so the rows overlap): the scheduler (app/pool), auth, usage recording (dispatch._record, the write-behind
queue and its inserts; it includes the metrics and access-log observers, also shown alone), request parsing, the
adapter, and the HTTP layers around them.

    python bench/profile.py [--seconds 8] [--stream]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import BIN, BODY, KEYS, MASTER, PORTS, ROOT, STREAM_BODY, started, taskset, url_of, wait_ready

PARTS = {
    "scheduler (app/pool)": ("app/pool/",),
    "auth (app/api/auth.py)": ("app/api/auth.py",),
    "usage recording": ("Dispatcher._record", "app/store/writer.py", "app/store/repository.py"),
    "metrics and access log (app/metrics.py, app/logs.py)": ("app/metrics.py", "app/logs.py"),
    "request parsing and validation": ("app/api/openai/schema.py",),
    "Moonshot adapter (app/upstreams)": ("app/upstreams/",),
    "aiohttp client": ("aiohttp/",),
    "response rendering (sse, chat body)": ("app/api/openai/sse.py", "_completion_body", "_frames"),
}
HANDLER = "ChatCompletions.__call__"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        upstream = f"http://127.0.0.1:{PORTS['emulator']}/v1"
        toml = work / "accounts.toml"
        toml.write_text("".join(f'[[accounts]]\nname = "emu-{i}"\nkind = "moonshot"\napi_key = "{key}"\n'
                                f'base_url = "{upstream}"\n\n' for i, key in enumerate(KEYS, 1)))
        emulator = [str(BIN / "kimi-pool"), "emulate", "moonshot", "--port", str(PORTS["emulator"]), "--keys", "4",
                    "--balance", "1e12"]
        server = [str(BIN / "kimi-pool"), "--db", f"sqlite+aiosqlite:///{work}/p.db", "serve", "--port",
                  str(PORTS["kimi-pool"]), "--accounts", str(toml), "--log-level", "warning"]
        with started(emulator, cpu="0") as emu, started(server, cpu="1", env={"KIMI_POOL_MASTER_KEY": MASTER}) as gw:
            wait_ready(url_of("emulator"), KEYS[0], emu)
            wait_ready(url_of("kimi-pool"), MASTER, gw)
            body = STREAM_BODY if args.stream else BODY
            load = subprocess.Popen(
                [*taskset("0"), "wrk", "-t1", "-c32", f"-d{args.seconds + 2}s", "-s", str(ROOT / "bench" / "post.lua"),
                 url_of("kimi-pool")], env={"BODY": body, "KEY": MASTER, "PATH": "/usr/bin:/bin"},
                stdout=subprocess.PIPE, text=True)
            raw = work / "raw.txt"
            subprocess.run([str(BIN / "py-spy"), "record", "-p", str(gw.pid), "-d", str(args.seconds), "-r", "400",
                            "-f", "raw", "-o", str(raw)], check=True, capture_output=True)
            out, _ = load.communicate()
        samples = raw.read_text().splitlines()
    print(next(line for line in out.splitlines() if "Requests/sec" in line).strip())
    total = 0
    shares: collections.Counter[str] = collections.Counter()
    for line in samples:
        stack, count = line.rsplit(" ", 1)
        if "worker_thread" in stack:  # aiosqlite's thread: off the event loop
            continue
        total += int(count)
        for part, needles in PARTS.items():
            if any(needle in stack for needle in needles):
                shares[part] += int(count)
        if HANDLER not in stack:
            shares["outside the handler (event loop, uvicorn, socket writes)"] += int(count)
    print(f"event-loop samples: {total}")
    for part in [*PARTS, "outside the handler (event loop, uvicorn, socket writes)"]:
        print(f"  {100 * shares[part] / total:5.1f}%  {part}")
    ours = sum(shares[p] for p in ("scheduler (app/pool)", "auth (app/api/auth.py)", "usage recording"))
    print(f"  {100 * ours / total:5.1f}%  scheduler + auth + usage recording together")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
