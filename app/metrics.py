"""Prometheus metrics for ``GET /metrics``, kept in a registry of the app's own.

Two sources:

* what happened: the dispatcher tells ``Metrics`` of every finished request and every failed
  upstream attempt. A request only appends to a list, whatever number of series it touches; the
  list is folded into the counters and histograms when ``/metrics`` is read, or when it holds
  ``fold_at`` requests (a pause of ~2 ms, however long nobody scrapes);
* what is: the queue's depth, each account's state and in-flight count, read from the live pool
  and admission queue at scrape time, never pushed from the request path.

Labels come from bounded sets only (account names, client key names, served models, outcomes,
error classes): a model no account serves is client-chosen text and is counted under ``model=""``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from app.clock import Clock
from app.errors import UpstreamError
from app.pool.account import State
from app.pool.admission import Admission
from app.pool.scheduler import Pool
from app.store.records import UsageRecord

PREFIX = "kimi_pool_"
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TIMED_STATES = (State.COOLING_DOWN, State.QUOTA_EXHAUSTED)

_UNSERVED = frozenset({"model_not_found", "no_accounts", "no_enabled_account"})
"""Outcomes of requests for a model nothing serves: counted with ``model=""``, so clients cannot make up series."""

_Finished = tuple[UsageRecord, float | None, float | None]


class Metrics:
    """A ``RequestObserver`` for the dispatcher and a collector for a ``CollectorRegistry``."""

    def __init__(self, pool: Pool, admission: Admission, clock: Clock, *, fold_at: int = 1000) -> None:
        self._pool = pool
        self._admission = admission
        self._clock = clock
        self._fold_at = fold_at
        self._pending: list[_Finished] = []
        self._requests = Counter(
            PREFIX + "requests", "Chat completion requests, by how they ended (outcome: ok, client_closed or an "
            "error code), including requests refused before dispatch (account empty).",
            ("account", "model", "client_key", "outcome"), registry=None)
        self._prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.",
                                      ("account", "model", "client_key"), registry=None)
        self._completion_tokens = Counter(PREFIX + "completion_tokens", "Completion tokens of finished requests.",
                                          ("account", "model", "client_key"), registry=None)
        self._duration = Histogram(PREFIX + "request_duration_seconds", "Time from a request's arrival to its "
                                   "end (a stream's last byte), for dispatched requests.", ("model", "stream"),
                                   buckets=DURATION_BUCKETS, registry=None)
        self._first_token = Histogram(PREFIX + "time_to_first_token_seconds", "Time from a streamed request's "
                                      "arrival to its first events.", ("model",), buckets=FIRST_TOKEN_BUCKETS,
                                      registry=None)
        self._queue_wait = Histogram(PREFIX + "queue_wait_seconds", "Time dispatched requests waited for an "
                                     "account with room (0 for most).", ("model",), buckets=WAIT_BUCKETS,
                                     registry=None)
        self._upstream_errors = Counter(PREFIX + "upstream_errors", "Failed upstream attempts, whether the request "
                                        "then moved to another account or not, by error class.",
                                        ("account", "error"), registry=None)

    @classmethod
    def registry(cls, pool: Pool, admission: Admission, clock: Clock, **kw: Any) -> tuple[Metrics, CollectorRegistry]:
        """A new registry holding only kimi-pool's metrics (never the process-wide default one)."""
        metrics = cls(pool, admission, clock, **kw)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(metrics)
        return metrics, registry

    # --- the request path: one append ------------------------------------------------------------

    def finished(self, record: UsageRecord, waited_ms: float | None, first_byte_ms: float | None) -> None:
        pending = self._pending
        pending.append((record, waited_ms, first_byte_ms))
        if len(pending) >= self._fold_at:
            self.fold()

    def upstream_failed(self, request_id: str, account: str, error: UpstreamError) -> None:
        self._upstream_errors.labels(account, type(error).__name__).inc()  # rare: counted at once

    # --- folding -----------------------------------------------------------------------------------

    def fold(self) -> None:
        """Move the finished requests appended since the last fold into the counters and histograms."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        counts: dict[tuple[str, str, str, str], list[int]] = {}
        timed: dict[tuple[str, bool], tuple[Any, Any, Any]] = {}
        for record, waited_ms, first_byte_ms in pending:
            model = "" if record.outcome in _UNSERVED else record.model
            key = (record.account or "", model, record.client_key or "", record.outcome)
            count = counts.get(key)
            if count is None:
                counts[key] = [1, record.prompt_tokens, record.completion_tokens]
            else:
                count[0] += 1
                count[1] += record.prompt_tokens
                count[2] += record.completion_tokens
            if waited_ms is None:
                continue  # refused at the door: counted, not timed
            children = timed.get((model, record.stream))
            if children is None:
                children = timed[(model, record.stream)] = (
                    self._duration.labels(model, "true" if record.stream else "false"),
                    self._queue_wait.labels(model), self._first_token.labels(model))
            children[0].observe(record.latency_ms / 1000.0)
            children[1].observe(waited_ms / 1000.0)
            if first_byte_ms is not None:
                children[2].observe(first_byte_ms / 1000.0)
        tokens: dict[tuple[str, str, str], list[int]] = {}
        for (account, model, client, outcome), (requests, prompt, completion) in counts.items():
            self._requests.labels(account, model, client, outcome).inc(requests)
            if prompt or completion:
                total = tokens.setdefault((account, model, client), [0, 0])
                total[0] += prompt
                total[1] += completion
        for labels, (prompt, completion) in tokens.items():
            self._prompt_tokens.labels(*labels).inc(prompt)
            self._completion_tokens.labels(*labels).inc(completion)

    # --- the collector -----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        self.fold()
        for metric in (self._requests, self._prompt_tokens, self._completion_tokens, self._duration,
                       self._first_token, self._queue_wait, self._upstream_errors):
            for family in metric.collect():
                # no "_created" series: they would double the series count and say nothing here
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family
        yield from self._live()

    def _live(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Requests waiting for an account with room.")
        depth.add_metric([], self._admission.depth)
        yield depth
        now = self._clock.time()
        states = GaugeMetricFamily(PREFIX + "account_state", "1 for the state each account is in, 0 for the others.",
                                   labels=("account", "state"))
        in_flight = GaugeMetricFamily(PREFIX + "account_in_flight", "Requests each account is serving now.",
                                      labels=("account",))
        for account in self._pool.accounts.values():
            state = account.state
            if state in _TIMED_STATES and account.until is not None and now >= account.until:
                state = State.ACTIVE  # what the pool will find when it next looks; read, not changed, here
            for each in State:
                states.add_metric([account.name, each.value], 1.0 if each is state else 0.0)
            in_flight.add_metric([account.name], account.in_flight)
        yield states
        yield in_flight
