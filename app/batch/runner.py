"""The batch runner: drains batch jobs through the pool, inside the server.

One loop looks at the active batches whenever something changed (a batch was created or cancelled,
a request ended, a retry or an expiry came due on the injected clock) and

* opens a new batch (``validating``, ``stages.open_batch``): its file's lines become items, and it
  moves to ``in_progress`` (or to ``failed``, when the file is not UTF-8 text or no line is a request);
* starts pending items, the oldest batch first and each batch in line order, while fewer than
  ``concurrency`` are in flight. Each goes through ``Dispatcher.complete`` as a *batch* request: the
  pool's admission queue paces it, serves waiting interactive requests first, and keeps it to the
  batch share of every account; so the batch drains at the pace the pool allows, no faster;
* closes a batch with nothing left to run (``stages.close_batch``): ``finalizing``, its output and
  error files (in line order), ``completed``; or ``cancelled`` (after a cancel) or ``expired`` (past
  its completion window), the requests that never ran going to the error file.

Opening and closing run beside the loop, so a big file does not hold up other batches' requests.

**Durable.** An item's result line is committed (``GroupCommit``) before anything else counts it.
Items have no "running" state on disk: what was in flight when the server died is still pending at
the next start and runs again, and an item with a stored result never does. Active batches resume
by themselves when the runner starts.

**Failures.** A request that fails with a retryable error (429 or 5xx, after the dispatcher's own
failover between accounts) is tried again after a backoff on the clock, up to ``max_attempts``
times; any other error is final. A request the pool turned away before sending it anywhere (no
account with room within ``max_wait``) is no attempt: its batch pauses until the pool has room.
Cancelling or expiry stops new starts and drops the requests still waiting for an account; those
already sent upstream finish, and their results count.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import Counter
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from app.api.openai.schema import parse_chat_request
from app.api.openai.sse import completion_body
from app.batch.commit import GroupCommit
from app.batch.job import Job, Running
from app.batch.lines import failed_line, new_id, output_line
from app.batch.stages import close_batch, open_batch
from app.clock import Clock
from app.dispatch import Dispatcher
from app.errors import KimiPoolError, PoolBusy, PoolUnavailable
from app.pool.context import RequestContext
from app.store.batches import TERMINAL, BatchRepository, ItemResult, PendingItem
from app.store.db import Database

log = logging.getLogger("kimi_pool.batch")

BACKOFF = 2.0
"""Seconds before a failed request's second attempt; doubled for each later one, up to ``MAX_BACKOFF``."""
MAX_BACKOFF = 60.0
RETRY_PASS = 5.0
"""After a database failure, seconds before the runner tries that work again."""
KEEP_SETTLED = 1000
"""Final statuses the runner remembers for ``wait_for``; ``wait_settled`` reads older ones from the database."""


class BatchRunner:
    def __init__(self, db: Database, dispatcher: Dispatcher, clock: Clock, *, models: Callable[[], Collection[str]],
                 concurrency: int = 256, max_wait: float = 300.0, max_attempts: int = 5) -> None:
        self._db = db
        self._dispatcher = dispatcher
        self._clock = clock
        self._models = models
        self._concurrency = concurrency
        self._max_wait = max_wait
        self._max_attempts = max_attempts
        self._commit = GroupCommit(db, clock)
        self._jobs: dict[str, Job] = {}
        self._in_flight = 0
        self._served: dict[str, Counter[str]] = {}
        """Batch → account → requests it answered, since this server started (for progress displays)."""
        self._reload = True
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._settled: dict[str, str] = {}
        self._changed: asyncio.Event | None = None
        self.passes = 0
        """Looks the loop has taken at the batches (for tests: one follows every wake-up)."""

    # --- lifecycle and signals --------------------------------------------------------------------

    def start(self) -> None:
        """Start working: on the batches left active by an earlier run first."""
        self._commit.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kimi-pool batch runner")

    def notify(self, batch_id: str, status: str) -> None:
        """A batch was created or cancelled (``status`` is its new one): look at the database again.
        A cancel takes effect before this returns: the batch's requests still waiting for an account
        are dropped, so none of them is sent after the caller is told ``cancelling``."""
        job = self._jobs.get(batch_id)
        if status == "cancelling" and job is not None and job.status == "in_progress":
            job.status = status
            self._drop_waiting(job)
        self._reload = True
        self._wake.set()

    async def close(self) -> None:
        """Stop: requests in flight are cancelled (their items stay pending, for the next start),
        results already received are stored, validations and finalizations under way finish."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        items = [running.task for job in self._jobs.values() for running in job.running.values()]
        for task in items:
            task.cancel()
        chores = [job.task for job in self._jobs.values() if job.task is not None]
        await asyncio.gather(*items, *chores, return_exceptions=True)
        await self._commit.close()

    # --- what tests and status pages may look at ----------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests started and not finished (waiting for an account included)."""
        return self._in_flight

    def retrying(self, batch_id: str) -> int:
        """Requests of the batch waiting for their next attempt."""
        job = self._jobs.get(batch_id)
        return len(job.retries) if job is not None else 0

    def settled(self, batch_id: str) -> str | None:
        """The final status this runner gave the batch, if it did."""
        return self._settled.get(batch_id)

    async def wait_for(self, predicate: Callable[[BatchRunner], bool]) -> None:
        """Return once ``predicate(runner)`` holds; it is checked again whenever the runner's state changes."""
        while not predicate(self):
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    async def wait_settled(self, batch_id: str) -> str:
        """The batch's final status, once it has one."""
        async with self._db.session() as session:
            row = await BatchRepository(session).get(batch_id)
        if row is not None and row.status in TERMINAL:
            return row.status
        await self.wait_for(lambda runner: runner.settled(batch_id) is not None)
        return self._settled[batch_id]

    def _notify_change(self) -> None:
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    # --- the loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                at = await self._step()
            except Exception:
                log.exception("batch runner: a pass failed; trying again in %.0f s", RETRY_PASS)
                self._reload = True
                at = self._clock.time() + RETRY_PASS
            self.passes += 1
            self._notify_change()
            await self._sleep(at)

    async def _sleep(self, until: float) -> None:
        if self._wake.is_set():
            return
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
        if until != float("inf"):
            waits.append(asyncio.ensure_future(self._clock.sleep_until(until)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _step(self) -> float:
        """One look at every active batch; returns when to look again unless woken before."""
        if self._reload:
            self._reload = False
            await self._load()
        now = self._clock.time()
        wake = float("inf")
        free = self._concurrency - self._in_flight
        for job in list(self._jobs.values()):
            if job.task is not None:
                continue
            if job.task_after > now:
                wake = min(wake, job.task_after)
                continue
            if job.status == "validating":
                self._spawn(job, self._validate(job))
                continue
            stopping = job.stopping(now)
            if stopping:
                self._drop_waiting(job)
            if not job.running and (stopping or job.status == "finalizing" or job.drained()):
                self._spawn(job, self._finalize(job))
                continue
            if stopping:
                continue  # what is in flight finishes; nothing new starts
            wake = min(wake, job.expires_at)
            if job.paused_until > now:
                wake = min(wake, job.paused_until)
            elif free > 0 and job.status == "in_progress":
                free -= await self._fill(job, free, now)
            if job.retries:
                wake = min(wake, job.retries[0][0])
        return wake

    async def _load(self) -> None:
        async with self._db.session() as session:
            rows = await BatchRepository(session).active()
        active = set()
        for row in rows:
            active.add(row.id)
            job = self._jobs.get(row.id)
            if job is None:
                self._jobs[row.id] = Job(row.id, row.status, row.client_key, row.endpoint, row.input_file_id,
                                          row.expires_at)
            elif job.task is None:
                job.status = row.status
        for batch_id, job in list(self._jobs.items()):
            if batch_id not in active and job.task is None and not job.running:
                del self._jobs[batch_id]

    def _spawn(self, job: Job, work: Coroutine[Any, Any, None]) -> None:
        """Run a batch's validation or finalization beside the loop."""

        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("batch %s: %s failed; trying again in %.0f s", job.id,
                              "validation" if job.status == "validating" else "finalization", RETRY_PASS)
                job.task_after = self._clock.time() + RETRY_PASS
                self._reload = True
            finally:
                job.task = None
                self._wake.set()
                self._notify_change()

        job.task = asyncio.get_running_loop().create_task(guarded(), name=f"kimi-pool batch {job.id}")

    # --- the two ends: opening (validation) and closing (the files) --------------------------------

    async def _validate(self, job: Job) -> None:
        outcome = await open_batch(self._db, job.id, input_file_id=job.input_file_id, endpoint=job.endpoint,
                                   models=self._models(), now=self._clock.time())
        if outcome.status is None:  # cancelled meanwhile
            self._reload = True
        elif outcome.status == "failed":
            self._finished(job, "failed", outcome.detail)
        else:
            job.status = outcome.status
            log.info("batch %s in progress: %s", job.id, outcome.detail)

    # --- running requests -------------------------------------------------------------------------

    async def _fill(self, job: Job, free: int, now: float) -> int:
        """Start up to ``free`` of the batch's items: those due for a retry, then the next in line."""
        started = 0
        due: list[int] = []
        while job.retries and job.retries[0][0] <= now and len(due) < free:
            due.append(heapq.heappop(job.retries)[1])
        if due:
            async with self._db.session() as session:
                for item in await BatchRepository(session).pending_lines(job.id, due):
                    self._start(job, item)
                    started += 1
        while started < free:
            if job.ready:
                self._start(job, job.ready.popleft())
                started += 1
                continue
            if job.exhausted:
                break
            want = max(self._concurrency, free - started)
            async with self._db.session() as session:
                items = await BatchRepository(session).pending(job.id, after_line=job.cursor, limit=want)
            job.exhausted = len(items) < want
            if items:
                job.cursor = items[-1].line
            for item in items:
                if item.retry_at is not None and item.retry_at > now:
                    heapq.heappush(job.retries, (item.retry_at, item.line))
                else:
                    job.ready.append(item)
        return started

    def served(self, batch_id: str) -> dict[str, int]:
        """How many of the batch's requests each account answered (since this server started)."""
        return dict(self._served.get(batch_id, ()))

    def _start(self, job: Job, item: PendingItem) -> None:
        ctx = RequestContext(new_id("req_"), job.owner, max_wait=self._max_wait, batch=True)
        task = asyncio.get_running_loop().create_task(self._run_item(job, item, ctx))
        job.running[item.line] = Running(task, ctx)
        self._in_flight += 1

    def _drop_waiting(self, job: Job) -> None:
        """Cancel the batch's requests that are still waiting for an account (none was sent upstream)."""
        for running in job.running.values():
            if running.ctx.account is None:
                running.task.cancel()

    async def _run_item(self, job: Job, item: PendingItem, ctx: RequestContext) -> None:
        try:
            result = await self._attempt(job, item, ctx)
            if result is None:  # turned away by the pool before it was sent: the batch pauses
                job.ready.appendleft(item)
                return
            await self._commit.save(result)
            if result.state == "done" and ctx.account is not None:
                self._served.setdefault(job.id, Counter())[ctx.account] += 1
            if result.retry_at is not None:
                heapq.heappush(job.retries, (result.retry_at, item.line))
        except Exception:  # its result could not be stored (logged where it failed): it runs again later
            heapq.heappush(job.retries, (self._clock.time() + RETRY_PASS, item.line))
        finally:
            del job.running[item.line]
            self._in_flight -= 1
            self._wake.set()
            self._notify_change()

    async def _attempt(self, job: Job, item: PendingItem, ctx: RequestContext) -> ItemResult | None:
        """One try at the item: its result (done, failed, or pending for a retry), or None when the pool
        turned it away before any account was tried."""
        error: KimiPoolError
        try:
            request = parse_chat_request(item.body)
            request.stream = request.include_usage = False
            completion = await self._dispatcher.complete(request, ctx)
        except (PoolBusy, PoolUnavailable) as exc:
            if ctx.attempts == 0:
                job.paused_until = max(job.paused_until, self._clock.time() + max(1.0, exc.retry_after))
                return None
            error = exc
        except KimiPoolError as exc:
            error = exc
        except Exception:
            log.exception("batch %s: line %d failed unexpectedly (request %s)", job.id, item.line, ctx.request_id)
            error = KimiPoolError(f"Internal error; quote request id {ctx.request_id} when reporting it.")
        else:
            body = completion_body(completion, new_id("chatcmpl-"), int(self._clock.time()), request.model)
            return ItemResult(job.id, item.line, "done", item.attempts + 1,
                              output_line(item.custom_id, ctx.request_id, body))
        attempts = item.attempts + 1
        if (error.status == 429 or error.status >= 500) and attempts < self._max_attempts:
            wait = max(min(MAX_BACKOFF, BACKOFF * 2 ** (attempts - 1)), float(getattr(error, "retry_after", 0.0)))
            return ItemResult(job.id, item.line, "pending", attempts, retry_at=self._clock.time() + wait)
        return ItemResult(job.id, item.line, "failed", attempts, failed_line(item.custom_id, error, ctx.request_id))

    async def _finalize(self, job: Job) -> None:
        outcome = await close_batch(self._db, job.id, status=job.status, owner=job.owner, expires_at=job.expires_at,
                                    now=self._clock.time())
        if outcome is None:  # requests are pending that the runner lost track of: read the batch again
            job.cursor, job.exhausted = 0, False
        elif outcome.status is None:  # cancelled meanwhile
            self._reload = True
        else:
            self._finished(job, outcome.status, outcome.detail)

    def _finished(self, job: Job, status: str, detail: str) -> None:
        job.status = status
        self._jobs.pop(job.id, None)
        self._settled[job.id] = status
        if len(self._settled) > KEEP_SETTLED:
            del self._settled[next(iter(self._settled))]
        log.info("batch %s finished: %s; %s", job.id, status, detail)
