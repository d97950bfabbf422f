"""``kimi-pool batch``: run a file of chat requests through a running kimi-pool, with a progress bar.

``batch run requests.jsonl -o results.jsonl`` uploads the file (OpenAI batch JSONL: one
``{"custom_id", "method", "url", "body"}`` per line), creates a batch on the server and follows it
to the end, then writes the results in OpenAI's output format to ``results.jsonl`` and the failures
to ``results.errors.jsonl``. The server does the work (pacing, retries, durability); this command
only watches.

Ctrl-C stops cleanly: the batch is cancelled (requests in flight finish, nothing new starts), the
results so far are written, and running the same command again resumes — only the requests that
have no result yet are sent. If the command itself dies, a second run reattaches to the batch that
is still running on the server. What a run needs to resume is kept beside the output file, in
``results.jsonl.batch.json``, until the output is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from app.cli.support import console as _console
from app.errors import ConfigError

batch_app = typer.Typer(name="batch", no_args_is_help=True,
                        help="Run files of chat requests through a running kimi-pool (the OpenAI Batch API).")

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
RETRIED_CODES = frozenset({"batch_cancelled", "batch_expired"})
"""Error lines a later run sends again: the request never got its own answer."""
DEFAULT_URL = "http://127.0.0.1:8088"

Url = Annotated[str, typer.Option(envvar="KIMI_POOL_URL", help="The running kimi-pool.")]
Key = Annotated[str | None, typer.Option(
    envvar="KIMI_POOL_API_KEY", show_default=False,
    help="A client key or the master key (default: $KIMI_POOL_API_KEY, then $KIMI_POOL_MASTER_KEY).")]


class BatchClient:
    """The few OpenAI Files and Batches calls the command needs, over aiohttp."""

    def __init__(self, url: str, key: str | None) -> None:
        self._url = url.rstrip("/")
        key = key or os.environ.get("KIMI_POOL_MASTER_KEY") or os.environ.get("API_MASTER_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._session.close()

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            async with self._session.request(method, self._url + path, headers=self._headers, **kw) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise ConfigError(f"kimi-pool answered {response.status} to {method} {path}: {_message(raw)}")
                if response.content_type == "application/json":
                    return json.loads(raw)
                return raw
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach kimi-pool at {self._url}: {type(exc).__name__} {exc}".rstrip()) from None

    async def upload(self, name: str, content: bytes) -> str:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=name, content_type="application/jsonl")
        return str((await self._call("POST", "/v1/files", data=form))["id"])

    async def create(self, file_id: str, window: str) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": window}
        result: dict[str, Any] = await self._call("POST", "/v1/batches", json=body)
        return result

    async def get(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/batches/{batch_id}")
        return result

    async def list(self, limit: int) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/v1/batches", params={"limit": str(limit)}))["data"])

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/batches/{batch_id}/cancel")
        return result

    async def content(self, file_id: str | None) -> bytes:
        if not file_id:
            return b""
        data = await self._call("GET", f"/v1/files/{file_id}/content")
        return data if isinstance(data, bytes) else json.dumps(data).encode()


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:200] or "no message"


# --- what a run has done, kept beside the output ------------------------------------------------------


@dataclass
class RunFiles:
    output: Path

    @property
    def errors(self) -> Path:
        return self.output.with_name(self.output.stem + ".errors" + (self.output.suffix or ".jsonl"))

    @property
    def state(self) -> Path:
        return self.output.with_name(self.output.name + ".batch.json")

    def load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.state} ({exc}); delete it to start over") from None
        return state if isinstance(state, dict) else {}

    def save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        tmp.replace(self.state)

    def answered(self) -> set[str]:
        """custom_ids that have their final line: every output line, and error lines not to retry."""
        done = {line["custom_id"] for line in _read_jsonl(self.output)}
        for line in _read_jsonl(self.errors):
            code = (line.get("error") or {}).get("code")
            if code not in RETRIED_CODES:
                done.add(line["custom_id"])
        return done

    def append(self, output: bytes, errors: bytes) -> tuple[int, int]:
        """Add a finished batch's lines (errors that a later run retries are left out)."""
        kept_errors = [line for line in errors.splitlines() if line.strip()
                       and (json.loads(line).get("error") or {}).get("code") not in RETRIED_CODES]
        outputs = [line for line in output.splitlines() if line.strip()]
        for path, lines in ((self.output, outputs), (self.errors, kept_errors)):
            if lines:
                with path.open("ab") as handle:
                    handle.write(b"\n".join(lines) + b"\n")
        return len(outputs), len(kept_errors)


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except ValueError:
                raise ConfigError(f"{path}:{number} is not a JSON line; move the file away to start over") from None
    return lines


def _pending_lines(source: Path, done: set[str]) -> tuple[list[bytes], int]:
    """The input lines without a final result yet, and how many lines the input has. Lines without a
    readable custom_id are sent as they are (the server reports them in the error file)."""
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
    lines = [line for line in raw.splitlines() if line.strip()]
    pending = []
    for line in lines:
        try:
            custom_id = json.loads(line).get("custom_id")
        except (ValueError, AttributeError):
            custom_id = None
        if custom_id is None or custom_id not in done:
            pending.append(line)
    return pending, len(lines)


# --- watching -----------------------------------------------------------------------------------------


class Watch:
    """The progress bar: done (completed + failed) of total, failures, rate, ETA, and each account's share."""

    def __init__(self, console: Console, total: int, already: int) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            TextColumn("{task.fields[shares]}"), console=console, transient=False)
        self._task = self._progress.add_task("batch", total=total, completed=already, failed=0, rate="", shares="")
        self._already = already
        self._started = time.monotonic()

    def __enter__(self) -> Watch:
        self._progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._progress.stop()

    def note(self, text: str) -> None:
        self._progress.console.print(text)

    def update(self, batch: dict[str, Any]) -> None:
        counts = batch.get("request_counts") or {}
        done = int(counts.get("completed", 0)) + int(counts.get("failed", 0))
        elapsed = max(time.monotonic() - self._started, 1e-6)
        accounts = (batch.get("kimi_pool") or {}).get("accounts") or {}
        served = sum(accounts.values()) or 1
        shares = " ".join(f"{name} {count * 100 // served}%" for name, count in sorted(accounts.items()))
        self._progress.update(self._task, completed=self._already + done, failed=int(counts.get("failed", 0)),
                              rate=f"{done / elapsed:.1f}/s", shares=shares, description=str(batch.get("status")))


class Interrupts:
    """Ctrl-C while a batch is followed: counted, not raised, so the command can stop cleanly."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()
        self._installed = False

    def __enter__(self) -> Interrupts:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._hit)
            self._installed = True
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (embedded use)
            self._installed = False
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)

    def _hit(self) -> None:
        self.count += 1
        self.event.set()


async def _follow(client: BatchClient, batch_id: str, watch: Watch, poll: float,
                  interrupts: Interrupts) -> dict[str, Any]:
    """Follow a batch to a terminal status. The first Ctrl-C cancels it (and the following goes on
    until it has stopped); a second one leaves it as it is."""
    cancelled = False
    while True:
        batch = await client.get(batch_id)
        watch.update(batch)
        if batch["status"] in TERMINAL or interrupts.count > 1:
            return batch
        if interrupts.count and not cancelled:
            cancelled = True
            watch.update(await client.cancel(batch_id))
            watch.note(f"cancelling batch {batch_id}: requests in flight finish, nothing new starts "
                       "(Ctrl-C again to leave it as it is)")
        interrupts.event.clear()
        with contextlib.suppress(TimeoutError):  # a remote server's progress: asked for every `poll` seconds
            await asyncio.wait_for(interrupts.event.wait(), poll)


async def _run(source: Path, digest: str, files: RunFiles, url: str, key: str | None, window: str, poll: float,
               console: Console) -> int:
    state = files.load_state()
    if state and state.get("input_sha256") != digest:
        raise ConfigError(f"{files.state} belongs to another input file; delete it (and {files.output}) to start over")
    async with BatchClient(url, key) as client:
        batch_id = state.get("batch_id")
        if batch_id is None:
            pending, total = _pending_lines(source, files.answered())
            if not pending:
                console.print(f"all {total} requests already have results in {files.output}")
                files.state.unlink(missing_ok=True)
                return 0
            file_id = await client.upload(source.name, b"\n".join(pending) + b"\n")
            batch = await client.create(file_id, window)
            batch_id = str(batch["id"])
            files.save_state({"batch_id": batch_id, "input_sha256": digest})
            console.print(f"batch {batch_id}: {len(pending)} of {total} requests sent"
                          + (" (resuming)" if len(pending) < total else ""))
        else:
            total = len(_pending_lines(source, set())[0])
            console.print(f"reattaching to batch {batch_id}")
        already = len(files.answered())
        with Watch(console, total, already) as watch, Interrupts() as interrupts:
            batch = await _follow(client, batch_id, watch, poll, interrupts)
        interrupted = interrupts.count > 0
        if batch["status"] not in TERMINAL:  # a second Ctrl-C: leave it running; a later run reattaches
            console.print(f"left batch {batch_id} {batch['status']}; run the same command again to reattach")
            return 130
        written, failed = files.append(await client.content(batch.get("output_file_id")),
                                       await client.content(batch.get("error_file_id")))
        files.save_state({"input_sha256": digest})
        remaining = total - len(files.answered())
        console.print(f"batch {batch_id} {batch['status']}: {written} results written to {files.output}"
                      + (f", {failed} failures to {files.errors}" if failed else ""))
        if remaining:
            console.print(f"{remaining} requests have no result yet; run the same command again to resume")
            return 130 if interrupted or batch["status"] == "cancelled" else 1
        files.state.unlink(missing_ok=True)
        return 0 if batch["status"] != "failed" else 1


@batch_app.command("run")
def batch_run(
    source: Annotated[Path, typer.Argument(metavar="FILE", help="JSONL of /v1/chat/completions requests.",
                                           show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="Where the results go.",
                                         show_default=False)],
    url: Url = DEFAULT_URL,
    key: Key = None,
    completion_window: Annotated[str, typer.Option(help="Give up on what is not done by then.")] = "24h",
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between progress updates.")] = 1.0,
) -> int:
    """Run a batch file to the end with a progress bar; Ctrl-C stops, running it again resumes."""
    try:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
    return asyncio.run(_run(source, digest, RunFiles(output), url, key, completion_window, poll, _console()))


@batch_app.command("list")
def batch_list(url: Url = DEFAULT_URL, key: Key = None,
               limit: Annotated[int, typer.Option(min=1, max=100, help="How many, newest first.")] = 20,
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The batches on the server, newest first."""
    async def fetch() -> list[dict[str, Any]]:
        async with BatchClient(url, key) as client:
            return await client.list(limit)

    batches = asyncio.run(fetch())
    if as_json:
        typer.echo(json.dumps(batches, indent=2))
        return
    table = Table("id", "status", "done", "failed", "total", "created")
    for batch in batches:
        counts = batch.get("request_counts") or {}
        table.add_row(batch["id"], batch["status"], str(counts.get("completed", 0)), str(counts.get("failed", 0)),
                      str(counts.get("total", 0)), time.strftime("%Y-%m-%d %H:%M", time.localtime(batch["created_at"])))
    _console().print(table)


@batch_app.command("status")
def batch_status(batch_id: Annotated[str, typer.Argument(metavar="ID", show_default=False)],
                 url: Url = DEFAULT_URL, key: Key = None) -> None:
    """One batch, as the OpenAI Batch API shows it."""
    async def fetch() -> dict[str, Any]:
        async with BatchClient(url, key) as client:
            return await client.get(batch_id)

    typer.echo(json.dumps(asyncio.run(fetch()), indent=2))


@batch_app.command("cancel")
def batch_cancel(batch_id: Annotated[str, typer.Argument(metavar="ID", show_default=False)],
                 url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Cancel a batch: requests in flight finish, nothing new starts."""
    async def cancel() -> dict[str, Any]:
        async with BatchClient(url, key) as client:
            return await client.cancel(batch_id)

    typer.echo(f"batch {batch_id}: {asyncio.run(cancel())['status']}")
