"""The one exception tree.

Every error kimi-pool raises knows the HTTP status, the OpenAI error ``type`` and ``code`` it is
rendered with at the boundary (``app/api/errors.py``) and, where it matters, how long to wait.

Two families live here:

* client-facing errors (bad input, auth, routing, back-pressure);
* upstream errors, classified once by the adapter into the closed set of DESIGN.md. The dispatcher
  reads the class to decide between failover and surfacing; the pool reads it to change the
  account's state.
"""

from __future__ import annotations

import math

from app.redact import redact


class KimiPoolError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, object]:
        """The OpenAI error object; the message is redacted (``app.redact``): it may quote an upstream."""
        return {"error": {"message": redact(self.message), "type": self.type, "param": self.param, "code": self.code}}


# --- client-facing ------------------------------------------------------------------------------


class InvalidRequest(KimiPoolError):
    status = 400
    type = "invalid_request_error"


class Unsupported(InvalidRequest):
    """A parameter kimi-pool (or every account that could serve the request) cannot honour."""

    code = "unsupported_parameter"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class AuthenticationFailed(KimiPoolError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(KimiPoolError):
    """The caller is known but may not do this (a client key on the admin API)."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class Conflict(KimiPoolError):
    """The thing to create exists already."""

    status = 409
    type = "invalid_request_error"
    code = "already_exists"


class NotFound(KimiPoolError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


SEE_MODELS = "GET /v1/models lists the models served (for the operator: kimi-pool models list)."
"""How a client (and its operator) sees what is served: the end of every ``ModelNotFound`` message."""


class MethodNotAllowed(KimiPoolError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: list[str]) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}


def _retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(min(60, max(1, math.ceil(seconds))))}


class IdempotencyMismatch(KimiPoolError):
    """An ``Idempotency-Key`` used again with a different request body."""

    status = 422
    type = "invalid_request_error"
    code = "idempotency_key_mismatch"


class PoolBusy(KimiPoolError):
    """Every account that could serve is busy or limited; try again after ``retry_after``."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return _retry_after_header(self.retry_after)


class QueueFull(PoolBusy):
    """The admission queue is full: the pool is saturated (``--max-queue`` requests already wait)."""

    code = "queue_full"


class PoolUnavailable(KimiPoolError):
    """No account can serve the request at all (all dead, disabled or out of quota)."""

    status = 503
    type = "service_unavailable"
    code = "no_account_available"

    def __init__(self, message: str, *, retry_after: float = 30.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return _retry_after_header(self.retry_after)


class NotConfigured(KimiPoolError):
    """Nothing can serve because of how the pool is set up: it has no account (``no_accounts``) or none
    is enabled (``no_enabled_account``). The operator's to fix; no ``Retry-After``."""

    status = 503
    type = "service_unavailable"
    code = "no_accounts"


class ClientGone(KimiPoolError):
    """The client closed its connection while its request waited for an account: it is dropped
    before it reaches an upstream (nobody would read the answer)."""

    status = 499
    type = "client_closed"
    code = "client_closed"


class ShuttingDown(KimiPoolError):
    """The server's shutdown grace period ended while this request was still running."""

    status = 503
    type = "service_unavailable"
    code = "shutting_down"

    def __init__(self, message: str = "The server is shutting down; the request was cut off. Retry it.") -> None:
        super().__init__(message)


# --- refused at the socket (``app.netguard``), before any request reaches the app -----------------


class HeadersTooLarge(InvalidRequest):
    status = 431
    code = "request_header_fields_too_large"


class HeadTimeout(InvalidRequest):
    """The request line and headers did not arrive in time (a stalled or very slow client)."""

    status = 408
    code = "request_timeout"


class TooManyConnections(KimiPoolError):
    status = 503
    type = "service_unavailable"
    code = "too_many_connections"

    def headers(self) -> dict[str, str]:
        return _retry_after_header(1.0)


# --- upstream, classified once in the adapter -----------------------------------------------------


class UpstreamError(KimiPoolError):
    """Base of the classified upstream failures. ``retryable`` means: try another account."""

    status = 502
    type = "upstream_error"
    code: str | None = "upstream_error"
    retryable = True

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        # adapters build messages from upstream bodies, which may quote a credential: redacted here,
        # once, before the message becomes an account's reason, a log line or a client's error
        super().__init__(redact(message), param=param, code=code)


class AuthDead(UpstreamError):
    """The credential is rejected; the account is out until an operator re-enables it."""

    code = "upstream_auth_failed"


class RateLimited(UpstreamError):
    """The account hit a short window (concurrency, RPM, TPM); cool it for ``retry_after`` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"

    def __init__(self, message: str, *, retry_after: float, bucket: str | None = None,
                 limit: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.bucket = bucket
        """Which window refused: ``concurrency``, ``rpm`` or ``tpm`` (None: not said)."""
        self.limit = limit
        """The limit the upstream named for that window, if it did."""

    def headers(self) -> dict[str, str]:
        return _retry_after_header(self.retry_after)


class QuotaExhausted(UpstreamError):
    """Out of credit or a long window (TPD); the account is out until ``until`` (None: until re-enabled)."""

    status = 429
    type = "insufficient_quota"
    code = "upstream_quota_exhausted"

    def __init__(self, message: str, *, until: float | None = None) -> None:
        super().__init__(message)
        self.until = until


class UpstreamOverloaded(UpstreamError):
    """The upstream itself is overloaded; not the account's fault."""

    status = 503
    type = "service_unavailable"
    code = "upstream_overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return _retry_after_header(self.retry_after)


class UpstreamBadRequest(UpstreamError):
    """The upstream refused the request itself (4xx about the input): never retried, passed on."""

    retryable = False

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type
        self.code = code


class Unsuitable(UpstreamError):
    """This account cannot take this request (e.g. it is longer than the upstream accepts), through no
    fault of its own: another account may. If none can, the client gets this error."""

    status = 400
    type = "invalid_request_error"
    code = "context_length_exceeded"


class Transient(UpstreamError):
    """5xx, network failure, timeout or a truncated stream."""

    code = "upstream_unavailable"


# --- configuration and operator input -------------------------------------------------------------


class ConfigError(KimiPoolError):
    """Bad settings, bad accounts.toml, bad CLI input: reported as one line by the CLI."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_config"


class NoDatabase(ConfigError):
    """A command found no database where it looked (only ``serve`` and ``db upgrade`` create one)."""
