"""Batch throughput against the pool's theoretical capacity (the sum of its accounts' RPM).

Starts the Moonshot emulator with 4 organizations limited to ``--rpm`` requests a minute each and
``kimi-pool serve`` with the 4 keys as accounts declaring that RPM, submits one batch of ``--items``
requests through the OpenAI Batch API, and follows it to the end. Capacity is ``4 * rpm`` requests a
minute; since the windows start empty, the first minute may burst, so the figure reported is the
steady pace: requests finished per minute after the first window, against capacity.

    python -m bench.batch [--rpm 120] [--items 1200] [--interactive-share 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.run import BIN, KEYS, MASTER, MODEL, PORTS, started, url_of, wait_ready

OUT = Path(__file__).resolve().parent / "out"


def api(path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{PORTS['kimi-pool']}{path}", data=body,
                                     method="POST" if body is not None else "GET",
                                     headers={"Authorization": f"Bearer {MASTER}", "Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def upload(lines: bytes) -> str:
    boundary = "kimipoolbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + lines + f"\r\n--{boundary}--\r\n".encode()
    return str(api("/v1/files", body, f"multipart/form-data; boundary={boundary}")["id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=int, default=120, help="requests per minute of each of the 4 accounts")
    parser.add_argument("--items", type=int, default=1200)
    parser.add_argument("--interactive-share", type=float, default=0.2)
    args = parser.parse_args()
    capacity = 4 * args.rpm
    with tempfile.TemporaryDirectory(prefix="kimi-pool-batch-bench-") as work:
        toml = Path(work) / "accounts.toml"
        toml.write_text("".join(f'[[accounts]]\nname = "acct-{i}"\nkind = "moonshot"\napi_key = "{key}"\n'
                                f'base_url = "http://127.0.0.1:{PORTS["emulator"]}/v1"\nrpm = {args.rpm}\n\n'
                                for i, key in enumerate(KEYS, start=1)))
        emulator = [str(BIN / "kimi-pool"), "emulate", "moonshot", "--port", str(PORTS["emulator"]),
                    "--keys", "4", "--rpm", str(args.rpm)]
        gateway = [str(BIN / "kimi-pool"), "--db", f"sqlite+aiosqlite:///{work}/kimi-pool.db", "serve",
                   "--port", str(PORTS["kimi-pool"]), "--accounts", str(toml), "--log-level", "warning",
                   "--interactive-share", str(args.interactive_share)]
        env = {**os.environ, "KIMI_POOL_MASTER_KEY": MASTER}
        with started(emulator, cpu="0"), started(gateway, cpu="1", env=env) as proc:
            wait_ready(url_of("kimi-pool"), MASTER, proc)  # one chat request: the server is up
            lines = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                         "body": {"model": MODEL, "max_tokens": 16,
                                                  "messages": [{"role": "user", "content": f"item {i}"}]}}).encode()
                             + b"\n" for i in range(args.items))
            batch = api("/v1/batches", json.dumps({"input_file_id": upload(lines), "endpoint": "/v1/chat/completions",
                                                   "completion_window": "24h"}).encode())
            started_at = time.monotonic()
            marks: list[tuple[float, int]] = []
            while True:
                batch = api(f"/v1/batches/{batch['id']}")
                counts = batch["request_counts"]
                marks.append((time.monotonic() - started_at, counts["completed"] + counts["failed"]))
                if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                    break
                time.sleep(1.0)  # a harness asking a server it started how far it got; not a test
    elapsed, done = marks[-1]
    after = [(t, n) for t, n in marks if t >= 60.0]
    steady = (after[-1][1] - after[0][1]) / max(after[-1][0] - after[0][0], 1e-9) * 60 if len(after) > 1 else None
    result = {
        "command": f"python -m bench.batch --rpm {args.rpm} --items {args.items} "
                   f"--interactive-share {args.interactive_share}",
        "capacity_rpm": capacity, "items": args.items, "status": batch["status"], "done": done,
        "failed": batch["request_counts"]["failed"], "elapsed_s": round(elapsed, 1),
        "overall_rpm": round(done / elapsed * 60, 1),
        "steady_rpm": None if steady is None else round(steady, 1),
        "steady_share_of_capacity": None if steady is None else round(steady / capacity, 3),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "batch.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
