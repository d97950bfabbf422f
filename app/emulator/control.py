"""The control side every emulator shares: scripted outcomes, change notification, held streams,
and the ``/__fake/*`` HTTP routes.

* ``ScriptBook`` queues outcomes per credential (``None``: any credential), FIFO, one consumed per
  request; each emulator declares its outcome kinds and their parameters, and bad scripts are
  refused when queued, not when played. (``KeyedQueues`` is its queueing, for other scripted things.)
* ``Notifier`` lets ``wait_for`` sleep until the emulator's state changes: no polling.
* ``Gate`` holds streams until released.
* ``control_routes`` serves script / release / state / reset / config for any ``Controllable``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

T = TypeVar("T")

ANY_KEY = "*"
"""How the any-credential queue is named in snapshots and accepted in HTTP scripts."""


@dataclass(frozen=True, slots=True)
class Param:
    """One outcome parameter: its default (which also fixes its type), allowed values, minimum."""

    default: Any
    choices: tuple[str, ...] | None = None
    minimum: float | None = 0
    maximum: float | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    params: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.params[name]


OutcomeKinds = Mapping[str, Mapping[str, Param]]


def _check_param(kind: str, name: str, spec: Param, value: Any) -> Any:
    expected: type | tuple[type, ...]
    if isinstance(spec.default, bool):
        expected = bool
    elif isinstance(spec.default, float):
        expected = (int, float)
    else:
        expected = type(spec.default)
    if not isinstance(value, expected) or (isinstance(value, bool) and not isinstance(spec.default, bool)):
        raise ValueError(f"outcome {kind!r}: {name} must be {type(spec.default).__name__}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"outcome {kind!r}: {name} must be one of {', '.join(spec.choices)}")
    if spec.minimum is not None and isinstance(value, int | float) and value < spec.minimum:
        raise ValueError(f"outcome {kind!r}: {name} must be >= {spec.minimum}")
    if spec.maximum is not None and isinstance(value, int | float) and value > spec.maximum:
        raise ValueError(f"outcome {kind!r}: {name} must be <= {spec.maximum}")
    return value


def parse_outcome(raw: Mapping[str, Any], kinds: OutcomeKinds) -> Outcome:
    """``{"kind": "rate_limit", "bucket": "rpm", "wait": 5}`` → ``Outcome``, checked against ``kinds``."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"an outcome is an object with a 'kind', got {raw!r}")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(f"unknown outcome kind {kind!r}; known: {', '.join(kinds)}")
    specs = kinds[kind]
    unknown = set(raw) - set(specs) - {"kind"}
    if unknown:
        raise ValueError(f"outcome {kind!r} takes no {', '.join(sorted(unknown))}")
    params = {name: _check_param(kind, name, spec, raw[name]) if name in raw else spec.default
              for name, spec in specs.items()}
    return Outcome(kind, params)


class KeyedQueues(Generic[T]):
    """Items queued per credential, FIFO; a credential's own queue goes before the shared one (``None``)."""

    def __init__(self) -> None:
        self._queues: dict[str | None, deque[T]] = {}

    def extend(self, key: str | None, items: list[T]) -> int:
        if items:
            self._queues.setdefault(key, deque()).extend(items)
        return len(items)

    def pop(self, key: str | None) -> T | None:
        queues = self._queues
        if not queues:
            return None
        for owner in (key, None):
            queue = queues.get(owner)
            if queue:
                item = queue.popleft()
                if not queue:
                    del queues[owner]
                return item
        return None

    def pending(self) -> dict[str, int]:
        return {ANY_KEY if key is None else key: len(queue) for key, queue in self._queues.items()}

    def clear(self) -> None:
        self._queues.clear()


class ScriptBook(KeyedQueues[Outcome]):
    """Queued outcomes per credential, checked against the emulator's outcome kinds when queued."""

    def __init__(self, kinds: OutcomeKinds) -> None:
        super().__init__()
        self.kinds = kinds

    def add(self, key: str | None, outcomes: Iterable[Mapping[str, Any]]) -> int:
        """Queue ``outcomes`` for ``key``; all are checked before any is queued. Returns the count."""
        return self.extend(key, [parse_outcome(raw, self.kinds) for raw in outcomes])


class Notifier:
    """Wakes ``wait_for`` callers when state changes. ``notify`` costs nothing when nobody waits."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()

    async def changed(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    async def wait_for(self, check: Callable[[], bool], timeout: float) -> None:
        """Return once ``check()`` holds; ``TimeoutError`` after ``timeout`` real seconds."""
        async with asyncio.timeout(timeout):
            while not check():
                await self.changed()


class Gate:
    """Streams wait here (``hold``) until ``release`` lets every current waiter through."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._event: asyncio.Event | None = None
        self._on_change = on_change
        self.held = 0

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def hold(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        self.held += 1
        self._changed()
        try:
            await event.wait()
        finally:
            self.held -= 1
            self._changed()

    def release(self) -> int:
        released, event = self.held, self._event
        self._event = None
        if event is not None:
            event.set()
        return released


class Controls:
    """What every emulator offers its tests and its control routes: scripted outcomes, answers held
    at a gate, and ``wait_for`` on its state. Emulators subclass it and call ``_notify`` whenever
    their state changes. ``keyless``: the upstream has no credential, so every script goes to the
    one any-credential queue whatever key is named."""

    def __init__(self, kinds: OutcomeKinds, *, keyless: bool = False) -> None:
        self.scripts = ScriptBook(kinds)
        self._notifier = Notifier()
        self.gate = Gate(self._notify)
        self._keyless = keyless

    def script(self, key: str | None, outcomes: list[dict[str, Any]]) -> int:
        """Queue outcomes for ``key`` (None: any credential), played one per request, FIFO."""
        queued = self.scripts.add(None if self._keyless else key, outcomes)
        self._notify()
        return queued

    def release(self) -> int:
        """Let every answer held at the gate go on; returns how many were held."""
        released = self.gate.release()
        self._notify()
        return released

    @property
    def held(self) -> int:
        return self.gate.held

    async def wait_for(self, predicate: Callable[[Self], bool], timeout: float = 5.0) -> None:
        """Return once ``predicate(self)`` holds, re-checked on every state change."""
        await self._notifier.wait_for(lambda: predicate(self), timeout)

    def _notify(self) -> None:
        self._notifier.notify()


class Controllable(Protocol):
    """What ``control_routes`` needs from an emulator."""

    def script(self, key: str | None, outcomes: list[dict[str, Any]]) -> int: ...

    def release(self) -> int: ...

    def snapshot(self) -> dict[str, Any]: ...

    def reset(self) -> None: ...

    def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]: ...


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _refuse(message: str) -> Response:
    return _json({"error": {"type": "invalid_request_error", "message": message}}, 400)


async def _object_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    body = orjson.loads(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def control_routes(target: Controllable) -> list[Route]:
    """``POST /__fake/script|release|reset|config`` and ``GET /__fake/state`` for ``target``."""

    async def script(request: Request) -> Response:
        try:
            body = await _object_body(request)
            key = body.get("key")
            outcomes = body.get("outcomes")
            if key is not None and not isinstance(key, str):
                raise ValueError("key must be a string or null")
            if not isinstance(outcomes, list):
                raise ValueError("outcomes must be a list")
            queued = target.script(None if key == ANY_KEY else key, outcomes)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            return _refuse(str(exc))
        return _json({"queued": queued})

    async def release(request: Request) -> Response:
        return _json({"released": target.release()})

    async def state(request: Request) -> Response:
        return _json(target.snapshot())

    async def reset(request: Request) -> Response:
        target.reset()
        return _json({"reset": True})

    async def config(request: Request) -> Response:
        try:
            applied = target.configure(await _object_body(request))
        except ValueError as exc:
            return _refuse(str(exc))
        return _json(applied)

    return [
        Route("/__fake/script", script, methods=["POST"]),
        Route("/__fake/release", release, methods=["POST"]),
        Route("/__fake/state", state, methods=["GET"]),
        Route("/__fake/reset", reset, methods=["POST"]),
        Route("/__fake/config", config, methods=["POST"]),
    ]
