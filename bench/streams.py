"""Open N concurrent streaming chat requests at once; report time to first token and total time.

The N connections are opened by a first, unmeasured round of the same N streams (a chat UI's
connection is open before its user presses enter; ``--cold`` measures with the TCP handshakes).
Each stream's times count from the moment that stream's request is sent.

    python bench/streams.py URL N [--key KEY] [--model M] [--cold]   → one JSON line on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> tuple[
        float, float, bool]:
    start = time.perf_counter()
    first = None
    done = False
    async with session.post(url, data=body, headers=headers) as response:
        async for line in response.content:
            if first is None and b'"content"' in line and b'"content":""' not in line:
                first = time.perf_counter() - start
            if line.startswith(b"data: [DONE]"):
                done = True
    total = time.perf_counter() - start
    return (first if first is not None else total), total, done and response.status == 200


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("n", type=int)
    parser.add_argument("--key", default="")
    parser.add_argument("--model", default="kimi-k2-0905-preview")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--cold", action="store_true", help="no warm-up round: new connections")
    args = parser.parse_args()
    body = json.dumps({"model": args.model, "stream": True,
                       "messages": [{"role": "user", "content": "stream to me"}]}).encode()
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if not args.cold:
            await asyncio.gather(*(one(session, args.url, body, headers) for _ in range(args.n)),
                                 return_exceptions=True)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(session, args.url, body, headers) for _ in range(args.n)),
                                       return_exceptions=True)
        wall = time.perf_counter() - start
    ok = [r for r in results if isinstance(r, tuple) and r[2]]
    ttfb = [r[0] * 1000 for r in ok]
    total = [r[1] * 1000 for r in ok]
    print(json.dumps({
        "n": args.n, "ok": len(ok), "wall_s": round(wall, 3), "streams_per_s": round(len(ok) / wall, 1),
        "ttfb_p50_ms": round(percentile(ttfb, 0.5), 1), "ttfb_p99_ms": round(percentile(ttfb, 0.99), 1),
        "total_p50_ms": round(percentile(total, 0.5), 1), "total_p99_ms": round(percentile(total, 0.99), 1),
        "total_mean_ms": round(statistics.fmean(total), 1) if total else None,
    }))


if __name__ == "__main__":
    asyncio.run(main())
