"""The gateway's own error types: one status, one machine code, one message each.

Everything a client can be told goes through these; `app.py` turns any of them into the one
JSON error shape `{"error", "code", "details", "request_id"}`. Errors of the provider SDK are
translated into this tree in exactly one place (`gemini_wrapper.translate_provider_error`),
so no SDK type leaks past the wrapper and retry decisions are made on our own types.

    GatewayError                      500 internal_error
    ├── InvalidRequest                400 invalid_request     (details name the field)
    │   ├── ContentBlocked            400 content_blocked     (provider's safety filter)
    │   └── RequestBlocked            400 request_blocked     (our security checks, block mode)
    ├── Unauthorized                  401 unauthorized        (no key, or an unknown one; WWW-Authenticate: Bearer)
    │   ├── KeyRevoked                401 key_revoked
    │   └── KeyExpired                401 key_expired
    ├── Forbidden                     403 forbidden           (a user key on an admin operation)
    │   ├── TaskNotAllowed            403 task_not_allowed    (the key's allowed_tasks exclude the task)
    │   └── ModelNotAllowed           403 model_not_allowed   (the key's allowed_models exclude the model)
    ├── BudgetExceeded                402 budget_exceeded     (the key's monthly budget; details: budget, spent, reset)
    ├── NotFound                      404 not_found           (an unknown key id)
    │   └── ModelNotFound             404 model_not_found     (/v1: a model the registry does not serve)
    ├── UnsupportedMediaType          415 unsupported_media_type
    ├── TokenLimitExceeded            429 token_limit_exceeded (the key's tokens_per_minute; has retry_after)
    ├── StoreBusy                     503 store_busy          (the database stayed locked; has retry_after)
    ├── BatchBusy                     503 batch_busy          (BATCH_MAX_IN_FLIGHT batches running; has retry_after)
    ├── ProviderNotConfigured         503 provider_not_configured (the model's key variable is unset: details.missing)
    └── UpstreamError                 502 upstream_error      (provider failed; base class)
        ├── UpstreamRateLimited       429 upstream_rate_limited   retryable, has retry_after
        │                                 (the provider's 429, or the gateway's own outbound ceiling)
        ├── UpstreamUnavailable       502 upstream_unavailable    retryable (5xx, dropped connection)
        ├── UpstreamTimeout           504 upstream_timeout        retryable per attempt; final on deadline
        ├── UpstreamRejected          502 upstream_rejected       (provider said 4xx to our call)
        ├── UpstreamBadAnswer         502 upstream_bad_answer     (malformed or off-contract reply)
        └── CircuitOpen               503 circuit_open            not retried (the model's circuit breaker
                                          is open: no call made); has retry_after; fallbacks move on

404, 405 and 413 from Flask and the gateway's own 429 (Flask-Limiter) are HTTP exceptions,
given the same shape by `routes.error_payload`.
"""

from __future__ import annotations

import math

MAX_RETRY_AFTER_SECONDS = 86400.0  # a day: longer hints are the provider's mistake, not a plan


def sane_retry_after(value: object, maximum: float = MAX_RETRY_AFTER_SECONDS) -> float | None:
    """A retry hint we can act on: a finite, non-negative number of seconds, at most `maximum`.

    Anything else (nan, inf, negative, not a number) is ignored (None): the hint comes from the
    provider's reply, and nan or inf would break the Retry-After header or the retry wait."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, maximum)


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    status = 500
    code = "internal_error"
    retryable = False
    headers: dict[str, str] = {}  # extra response headers (WWW-Authenticate on a 401)
    # The priced `TaskOutcome` of a provider answer the task then refused (an unparseable structured answer):
    # the provider billed it, so the request's ledger row does too (set by TaskService.run).
    billed = None

    def __init__(self, message: str, *, details: dict | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after


class InvalidRequest(GatewayError):
    status = 400
    code = "invalid_request"


class ContentBlocked(InvalidRequest):
    code = "content_blocked"


class RequestBlocked(InvalidRequest):
    code = "request_blocked"


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="api"'}


class KeyRevoked(Unauthorized):
    code = "key_revoked"
    headers = {"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'}


class KeyExpired(Unauthorized):
    code = "key_expired"
    headers = {"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'}


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class TaskNotAllowed(Forbidden):
    code = "task_not_allowed"


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"


class BudgetExceeded(GatewayError):
    status = 402
    code = "budget_exceeded"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    """The OpenAI-compatible surface names an unknown model as OpenAI does (404), not as a field error (400)."""

    code = "model_not_found"


class TokenLimitExceeded(GatewayError):
    status = 429
    code = "token_limit_exceeded"


class StoreBusy(GatewayError):
    status = 503
    code = "store_busy"


class BatchBusy(GatewayError):
    """This process already runs its most batches at once (gateway/tasks/batch.py `BatchAdmission`)."""

    status = 503
    code = "batch_busy"


class ProviderNotConfigured(GatewayError):
    """A model of the registry whose provider has no key here: the operator's to fix, so 503 (not the client's
    400), without Retry-After (waiting does not help)."""

    status = 503
    code = "provider_not_configured"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "unsupported_media_type"


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"


class UpstreamRateLimited(UpstreamError):
    status = 429
    code = "upstream_rate_limited"
    retryable = True


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    retryable = True


class UpstreamRejected(UpstreamError):
    code = "upstream_rejected"


class UpstreamBadAnswer(UpstreamError):
    code = "upstream_bad_answer"


class CircuitOpen(UpstreamError):
    """The model kept failing, so the gateway stopped calling it for a cool-down: no call was made.

    Not retryable: retrying the same model within its cool-down is refused again at once; a
    fallback chain moves on to its next model instead. `retry_after` is the time until the
    breaker lets a probe call through."""

    status = 503
    code = "circuit_open"


def error_body(message: str, code: str, details: dict, request_id: str) -> dict:
    """The one JSON error shape every client sees (HTTP error bodies and stream error events)."""
    return {"error": message, "code": code, "details": details, "request_id": request_id}
