"""The reference: the smallest honest Starlette + aiohttp-client passthrough.

It round-robins over the given keys and relays the upstream's bytes untouched (no parsing, no
auth, no bookkeeping). kimi-pool is measured against it in the same run; what kimi-pool costs
beyond this is the price of being a gateway.

    python bench/passthrough.py --port 9103 --upstream http://127.0.0.1:9101/v1 --key sk-emu-0001 ... [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def create(upstream: str, keys: list[str]) -> Starlette:
    ring = itertools.cycle(keys)
    holder: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        holder["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await holder["session"].close()

    async def chat(request: Request) -> Response:
        body = await request.body()
        headers = {"Authorization": f"Bearer {next(ring)}", "Content-Type": "application/json"}
        upstream_response = await holder["session"].post(f"{upstream}/chat/completions", data=body, headers=headers)
        if upstream_response.headers.get("content-type", "").startswith("text/event-stream"):
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream_response.content.iter_any():
                        yield chunk
                finally:
                    upstream_response.release()
            return StreamingResponse(relay(), status_code=upstream_response.status, media_type="text/event-stream")
        data = await upstream_response.read()
        return Response(data, status_code=upstream_response.status, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def from_env() -> Starlette:
    """The app for uvicorn's worker processes (``--workers N``), configured through the environment."""
    return create(os.environ["PASSTHROUGH_UPSTREAM"], os.environ["PASSTHROUGH_KEYS"].split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--key", action="append", required=True)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each its own ring)")
    args = parser.parse_args()
    options = {"host": "127.0.0.1", "port": args.port, "log_level": "warning", "access_log": False,
               "loop": "uvloop", "http": "httptools"}
    if args.workers > 1:
        os.environ["PASSTHROUGH_UPSTREAM"] = args.upstream
        os.environ["PASSTHROUGH_KEYS"] = ",".join(args.key)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        uvicorn.run("bench.passthrough:from_env", factory=True, workers=args.workers, **options)
        return
    uvicorn.run(create(args.upstream, args.key), **options)


if __name__ == "__main__":
    main()
