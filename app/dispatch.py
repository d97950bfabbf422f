"""Where pool, upstreams and store meet: one request, from lease to usage record.

Before the first event reaches the client, a retryable upstream failure is reported to the pool
and the request moves to another account, bounded by the number of accounts and a deadline.
After it, a failure ends the stream (the API renders an error event) and is recorded.

Every finished request becomes a ``UsageRecord`` for the store's write-behind and for the
observers (metrics, the access log); every failed upstream attempt, failed over or not, is told to
the observers too. Observers run on the request path: they must be cheap and must not raise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from app.capabilities import describe, first_param, kinds_able
from app.clock import Clock
from app.errors import (
    ClientGone,
    KimiPoolError,
    PoolBusy,
    PoolUnavailable,
    QuotaExhausted,
    RateLimited,
    ShuttingDown,
    Transient,
    Unsuitable,
    Unsupported,
    UpstreamError,
)
from app.pool.account import Account
from app.pool.admission import KEY_QUEUE_FULL
from app.pool.context import RequestContext
from app.pool.leases import Held, Leases
from app.shutdown import Shutdown
from app.store.records import UsageRecord
from app.tokens import estimate_tokens
from app.upstreams.base import Batch, ChatRequest, Completion, Delta, Thread, Usage
from app.upstreams.registry import Registry

log = logging.getLogger("kimi_pool.dispatch")


class UsageSink(Protocol):
    def put_usage(self, record: UsageRecord) -> None: ...


class RequestObserver(Protocol):
    def finished(self, record: UsageRecord, waited_ms: float | None, first_byte_ms: float | None) -> None:
        """A request ended. ``waited_ms``: time spent waiting for an account (on the pool's clock), None
        for a request refused before dispatch; ``first_byte_ms``: when a stream's first events were
        ready, counted from the start of the request (None for a whole answer, or a stream that never
        started)."""
        ...

    def upstream_failed(self, request_id: str, account: str, error: UpstreamError) -> None:
        """One upstream attempt failed (whether the request then moved to another account or not)."""
        ...


class Dispatcher:
    def __init__(self, leases: Leases, registry: Registry, usage: UsageSink, clock: Clock, *,
                 failover_deadline: float = 60.0, default_max_tokens: int = 1024,
                 observers: Sequence[RequestObserver] = (), shutdown: Shutdown | None = None) -> None:
        self._leases = leases
        self._registry = registry
        self._usage = usage
        self._clock = clock
        self._deadline = failover_deadline
        self._default_max_tokens = default_max_tokens
        self._observers = tuple(observers)
        self._shutdown = shutdown or Shutdown()

    @property
    def leases(self) -> Leases:
        return self._leases

    def check(self, request: ChatRequest) -> None:
        """Refuse a request no enabled account could serve: a model none serves (404; 503 when the pool has
        no enabled account at all: ``Leases.unserved`` says which), or one whose accounts cannot do what it
        needs (400 naming the parameter). Cheap: asked on every request."""
        model = request.model
        if model not in self._leases.models():
            raise self._leases.unserved(model)
        needs = request.needs
        if needs and not self._leases.capable(model, needs):
            raise self._incapable(model, needs)

    def _incapable(self, model: str, needs: frozenset[str]) -> Unsupported:
        missing = frozenset(n for n in needs if not self._leases.capable(model, frozenset({n}))) or needs
        able = kinds_able(missing)
        serving = ", ".join(sorted(self._leases.kinds_serving(model)))
        hint = (f" Accounts of kind {' or '.join(able)} can, for a model that offers it." if able
                else " No kind of account kimi-pool supports can.")
        return Unsupported(f"No enabled account serving '{model}' can do {describe(missing)} (the accounts serving "
                           f"it are of kind {serving}).{hint}", param=first_param(missing))

    # --- failover ------------------------------------------------------------------------------

    def cost(self, request: ChatRequest) -> int:
        """What the request is charged up front: prompt estimate + the completion it may produce."""
        return estimate_tokens(request.messages) + (request.max_tokens or self._default_max_tokens)

    async def _lease(self, request: ChatRequest, tried: set[str], last: UpstreamError | None,
                     ctx: RequestContext) -> Held:
        cost = self.cost(request)
        ctx.needs = request.needs
        lease = self._leases.try_take(request.model, cost, ctx, tried)
        if lease is None:
            lease = await self._wait_for_lease(request, cost, tried, last, ctx)
        ctx.attempts += 1
        ctx.account = lease.account.name
        tried.add(lease.account.name)
        return lease

    async def _wait_for_lease(self, request: ChatRequest, cost: int, tried: set[str], last: UpstreamError | None,
                              ctx: RequestContext) -> Held:
        now = self._clock.time()
        try:
            if ctx.gone is None:
                return await self._leases.take(request.model, cost, ctx, tried)
            return await self._take_unless_gone(request.model, cost, ctx, tried, ctx.gone)
        except (PoolBusy, PoolUnavailable) as refused:
            if last is None or refused.code == KEY_QUEUE_FULL:  # the client's own doing: say so
                raise
            raise self._no_account(request.model, last,
                                   await self._leases.next_free_in(request.model, request.needs)) from None
        finally:
            ctx.waited += self._clock.time() - now

    async def _take_unless_gone(self, model: str, cost: int, ctx: RequestContext, tried: set[str],
                                gone: Callable[[], Awaitable[None]]) -> Held:
        taking = asyncio.ensure_future(self._leases.take(model, cost, ctx, tried))
        watching = asyncio.ensure_future(gone())
        try:
            await asyncio.wait((taking, watching), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            taking.cancel()
            raise
        finally:
            watching.cancel()
        if not taking.done():
            taking.cancel()
            try:
                await taking
            except (asyncio.CancelledError, PoolBusy, PoolUnavailable):
                pass
            else:
                taking.result().release(0)  # granted as the client left
            raise ClientGone("The client closed the connection while the request waited for an account.")
        return taking.result()

    @staticmethod
    def _unreadable(ctx: RequestContext, account: Account, exc: Exception) -> Transient:
        """An adapter that raised something unclassified: logged with its traceback (a bug, or an upstream
        sending what it never should), and treated as a transient failure of this attempt."""
        log.error("request %s: the %s adapter failed on account %s", ctx.request_id, account.kind, account.name,
                  exc_info=exc)
        return Transient(f"The upstream's answer could not be read ({type(exc).__name__}).")

    @staticmethod
    def _no_account(model: str, last: UpstreamError | None, wait: float | None) -> KimiPoolError:
        if isinstance(last, Unsuitable):
            return last  # the request itself is the problem, not the pool
        why = f" Last upstream error: {last.message}" if last is not None else ""
        if wait is None:
            return PoolUnavailable(f"No account can serve '{model}' now: all are disabled, dead or out of quota.{why}")
        if last is None or isinstance(last, RateLimited | QuotaExhausted):
            return PoolBusy(f"Every account serving '{model}' is busy or rate-limited; retry later.{why}",
                            retry_after=max(1.0, wait))
        return PoolUnavailable(f"Every account serving '{model}' failed.{why}", retry_after=max(1.0, wait))

    @staticmethod
    def _thread(ctx: RequestContext, account: Account) -> Thread:
        """The upstream chat this request continues: the binding's, if this account holds it."""
        binding = ctx.binding
        if binding is not None and binding.account == account.name and binding.chat_id:
            return Thread(binding.chat_id, binding.parent_id, binding.turns, keep=True)
        return Thread(keep=binding is not None)

    async def _failed(self, lease: Held, error: UpstreamError, deadline: float, ctx: RequestContext) -> None:
        self._leases.report(lease, error)  # first, so whoever the release wakes sees the new state
        self._upstream_failed(ctx, lease.account, error)
        lease.release(0)  # a refused request produced no tokens
        await self._leases.saved()  # a cooldown or a dead key is stored before the request goes on
        if not error.retryable or self._clock.time() > deadline:
            raise error

    # --- the two shapes of a request -----------------------------------------------------------

    async def complete(self, request: ChatRequest, ctx: RequestContext) -> Completion:
        tried: set[str] = set()
        last: UpstreamError | None = None
        deadline = self._clock.time() + self._deadline
        status, outcome, usage = 200, "ok", None
        try:
            self.check(request)
            while True:
                lease = await self._lease(request, tried, last, ctx)
                account = lease.account
                thread = self._thread(ctx, account)
                try:
                    completion = await self._registry.get(account.kind).complete(
                        account, request, account.upstream_models[request.model], thread)
                except UpstreamError as error:
                    await self._failed(lease, error, deadline, ctx)
                    last = error
                    continue
                except asyncio.CancelledError:
                    lease.release()  # the client left mid-answer: the upstream spent what was charged
                    raise
                except Exception as exc:  # the adapter choked on what the upstream sent: this attempt failed
                    unreadable = self._unreadable(ctx, account, exc)
                    await self._failed(lease, unreadable, deadline, ctx)
                    last = unreadable
                    continue
                except BaseException:
                    lease.release(0)  # our own failure (a bug): it must not cost the account anything
                    raise
                usage = completion.usage or Usage(estimate_tokens(request.messages),
                                                  len(completion.content or "") // 4)
                self._leases.succeeded(lease)
                lease.release(usage.total_tokens)
                self._leases.keep_thread(ctx, thread)
                completion.usage = usage
                return completion
        except KimiPoolError as error:
            status, outcome = error.status, error.code or error.type
            raise
        except asyncio.CancelledError:
            status, outcome = self._cancelled()
            raise
        except Exception:
            status, outcome = 500, "internal_error"
            raise
        finally:
            self._record(request, ctx, usage, status, outcome)

    async def stream(self, request: ChatRequest, ctx: RequestContext) -> AsyncIterator[Batch]:
        """Batches of events of one answer. The first ``__anext__`` does the failover; errors after it
        end the stream."""
        tried: set[str] = set()
        last: UpstreamError | None = None
        deadline = self._clock.time() + self._deadline
        status, outcome = 200, "ok"
        usage: Usage | None = None
        chars = 0
        lease: Held | None = None
        events: AsyncIterator[Batch] | None = None
        first_byte: float | None = None
        try:
            self.check(request)
            while True:
                lease = await self._lease(request, tried, last, ctx)
                account = lease.account
                thread = self._thread(ctx, account)
                events = self._registry.get(account.kind).stream(
                    account, request, account.upstream_models[request.model], thread)
                try:
                    first = await anext(events)
                except StopAsyncIteration:
                    error: UpstreamError = Transient("The upstream ended the stream without an answer.")
                except UpstreamError as exc:
                    error = exc
                except Exception as exc:
                    error = self._unreadable(ctx, account, exc)
                else:
                    break
                await events.aclose()  # type: ignore[attr-defined]
                events = None
                failed = lease
                lease = None
                await self._failed(failed, error, deadline, ctx)
                last = error
            batch: Batch = first
            first_byte = time.perf_counter()
            while True:
                for event in batch:
                    if type(event) is Delta:
                        chars += len(event.content or "") + len(event.reasoning or "")
                    elif type(event) is Usage:
                        usage = event
                yield batch
                try:
                    batch = await anext(events)
                except StopAsyncIteration:
                    break
                except UpstreamError:
                    raise
                except Exception as exc:
                    raise self._unreadable(ctx, account, exc) from None
            if usage is None:
                usage = Usage(estimate_tokens(request.messages), chars // 4)
                yield [usage]
            self._leases.succeeded(lease)
            self._leases.keep_thread(ctx, thread)
        except KimiPoolError as error:
            status, outcome = error.status, error.code or error.type
            if lease is not None and isinstance(error, UpstreamError):
                self._leases.report(lease, error)
                self._upstream_failed(ctx, lease.account, error)
                await self._leases.saved()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status, outcome = self._cancelled()
            raise
        except Exception:
            status, outcome = 500, "internal_error"
            raise
        finally:
            if events is not None:
                await events.aclose()  # type: ignore[attr-defined]
            if usage is None:
                usage = Usage(estimate_tokens(request.messages), chars // 4)
            if lease is not None:
                lease.release(0 if status == 500 else usage.total_tokens)  # our own failure costs nothing
            self._record(request, ctx, usage, status, outcome, first_byte)

    # --- what is told to the store and the observers --------------------------------------------

    def _cancelled(self) -> tuple[int, str]:
        """How a cancelled request ended: cut at the end of the shutdown's grace period, or left by its
        client."""
        if self._shutdown.over:
            error = ShuttingDown()
            return error.status, error.code or error.type
        return 499, "client_closed"

    def refused(self, request_id: str, client: str | None, model: str | None, stream: bool,
                error: KimiPoolError, started: float) -> None:
        """Tell the observers of a request turned away before dispatch (bad key, body or model). The
        usage table keeps dispatched requests only."""
        if not self._observers:
            return
        record = UsageRecord(
            ts=self._clock.time(), request_id=request_id, account=None, client_key=client, model=model or "",
            stream=stream, latency_ms=(time.perf_counter() - started) * 1000.0, status=error.status,
            outcome=error.code or error.type, attempts=0)
        for observer in self._observers:
            observer.finished(record, None, None)

    def replayed(self, request_id: str, client: str | None, model: str, stream: bool, started: float) -> None:
        """Tell the observers of a request answered with the stored answer of an earlier one with the same
        ``Idempotency-Key`` (outcome ``replayed``). Nothing was dispatched: the usage table does not see it."""
        if not self._observers:
            return
        record = UsageRecord(
            ts=self._clock.time(), request_id=request_id, account=None, client_key=client, model=model,
            stream=stream, latency_ms=(time.perf_counter() - started) * 1000.0, status=200, outcome="replayed",
            attempts=0)
        for observer in self._observers:
            observer.finished(record, None, None)

    def _upstream_failed(self, ctx: RequestContext, account: Account, error: UpstreamError) -> None:
        for observer in self._observers:
            observer.upstream_failed(ctx.request_id, account.name, error)

    def _record(self, request: ChatRequest, ctx: RequestContext, usage: Usage | None, status: int,
                outcome: str, first_byte: float | None = None) -> None:
        record = UsageRecord(
            ts=self._clock.time(),
            request_id=ctx.request_id,
            account=ctx.account,
            client_key=ctx.client,
            model=request.model,
            stream=request.stream,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_ms=(time.perf_counter() - ctx.started) * 1000.0,
            status=status,
            outcome=outcome,
            attempts=ctx.attempts,
        )
        self._usage.put_usage(record)
        if self._observers:
            waited_ms = ctx.waited * 1000.0
            first_byte_ms = None if first_byte is None else (first_byte - ctx.started) * 1000.0
            for observer in self._observers:
                observer.finished(record, waited_ms, first_byte_ms)
