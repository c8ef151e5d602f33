"""The API's namespaces besides the tasks (task_routes.py): health and stats; and the error shape.

Each resource validates its body against its RESTX model, hands the task to the gateway's
`TaskService`, and leaves the outcome in `g.outcome` for the after-request hook in `app.py`,
which turns it into cost headers, the ledger record and the summary log line.

`error_payload` is the one mapping from any exception to the JSON error shape, its status and
its log lines: `app.py`'s error handlers use it, and so does a stream that fails after its 200.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid

from flask import current_app, request
from flask_restx import Namespace, Resource
from werkzeug.exceptions import HTTPException

from gateway.auth.guard import TASK_OF_PATH
from gateway.container import Gateway, RequestInfo
from gateway.errors import GatewayError, InvalidRequest, UnsupportedMediaType, error_body, sane_retry_after
from gateway.http.request_state import state
from gateway.http.schemas import SECURITY, InvalidBody, Schemas
from gateway.observability.metrics import UNROUTED

__version__ = "1.0.0"
TASK_ENDPOINTS = frozenset(TASK_OF_PATH)  # one table of task paths (gateway/auth/guard.py), for the ledger too
# The /stats window is capped at 31 days: a month's billing. Its work grows with the rows in the window
# (SQLite scans them once, see gateway/storage/ledger_stats.py); longer reviews use CostTracker.export_records.
MAX_STATS_HOURS = 24 * 31
log = logging.getLogger("gateway.http")


def health_namespace(gateway: Gateway, schemas: Schemas) -> Namespace:
    ns = Namespace("health", description="Liveness and configuration summary")

    @ns.route("")
    class Health(Resource):
        @ns.response(200, "Service is up", schemas.health)
        def get(self):
            """Report status, version, environment, provider, mode, uptime and the serving process id."""
            return {
                "status": "ok",
                "version": __version__,
                "environment": gateway.config.app_env,
                "provider": gateway.upstream.provider,
                "model": gateway.service.default_model,
                "mode": gateway.upstream.mode,
                "uptime_seconds": round(time.monotonic() - gateway.started_at, 3),
                "pid": os.getpid(),
            }

    return ns


def stats_namespace(gateway: Gateway, schemas: Schemas, stats_limit) -> Namespace:
    ns = Namespace("stats", description="Usage, cost, cache and reliability figures")
    hours_doc = {"in": "query", "type": "number", "default": 24,
                 "description": f"Window for ledger figures, in hours (0 < hours <= {MAX_STATS_HOURS})"}

    @ns.route("")
    class Stats(Resource):
        @ns.doc(security=SECURITY, params={"hours": hours_doc})
        @ns.response(200, "Figures", schemas.stats)
        @ns.response(400, "Invalid hours", schemas.error)
        @ns.response(401, "No key, or an unknown, revoked or expired one", schemas.error)
        @ns.response(403, "An admin key is needed", schemas.error)
        @ns.response(429, "Rate limited (RATELIMIT_STATS_LIMITS); see Retry-After", schemas.error)
        @stats_limit
        def get(self):
            """Requests, latency percentiles, cache, costs and savings, retries, limits, security events."""
            hours = hours_argument(MAX_STATS_HOURS)
            process = gateway.metrics.snapshot()
            return {
                "uptime_seconds": round(time.monotonic() - gateway.started_at, 3),
                "window_hours": hours,
                "usage": gateway.tracker.get_usage_stats(hours),
                "cache": gateway.cache.stats(),
                "process": process,
            }

    return ns


def hours_argument(maximum: float, default: str | None = "24") -> float | None:
    """The `hours` query argument, in (0, maximum] (NaN and infinity fail too); `default` when absent."""
    raw = request.args.get("hours", default)
    if raw is None:
        return None
    try:
        hours = float(raw)
    except ValueError:
        hours = math.nan
    if not 0 < hours <= maximum:
        raise InvalidRequest(f"Invalid input: 'hours' must be a number above 0 and at most {maximum}",
                             details={"fields": {"hours": f"must be in (0, {maximum}]"}})
    return hours


def request_info() -> RequestInfo:
    """The current request as plain data for the gateway's accounting."""
    current, context = request._get_current_object(), state()
    key = context.api_key
    return RequestInfo(request_id=request_id(), method=current.method, path=clip_path(current.path),
                       client=current.remote_addr or "", prompt=context.prompt, model=context.model,
                       error_code=context.error_code, route=_route(current),
                       client_request_id=context.client_request_id, key_id=key.id if key else None,
                       user_agent=clip_user_agent(current.headers.get("User-Agent", "")))


def request_id() -> str:
    context = state()
    if context.request_id is None:
        context.request_id = new_request_id()
    return context.request_id


def new_request_id() -> str:
    """The gateway's id of one request: 128 random bits (32 hex digits), unique across processes and
    restarts and not guessable from another id (it is the ledger's unique key)."""
    return uuid.uuid4().hex


def json_body():
    """The parsed JSON body; 415 if it is not declared as JSON (400 if it does not parse)."""
    if not request.is_json:
        raise UnsupportedMediaType(
            "Send the body as JSON with 'Content-Type: application/json'",
            details={"content_type": request.content_type or ""},
        )
    return request.get_json()


# --- errors -------------------------------------------------------------------------------------

def error_payload(exc: BaseException) -> tuple[dict, int, dict]:
    """(body, status, headers) for any exception; failures that are not the client's go to api_errors.log."""
    headers = {}
    if isinstance(exc, GatewayError):
        status, code, message, details = exc.status, exc.code, exc.message, exc.details
        headers.update(exc.headers)
        if (retry_after := sane_retry_after(exc.retry_after)) is not None:
            headers["Retry-After"] = state().retry_after = str(max(1, math.ceil(retry_after)))
        log.warning("%s: %s", code, message, extra={"request_id": request_id()})
    elif isinstance(exc, HTTPException):
        status, details = exc.code or 500, {}
        code, message = _HTTP_ERRORS.get(status, HTTP_ERROR_FALLBACK)  # never werkzeug's description
        if status == 429:
            message = f"Rate limit exceeded ({exc.description}); retry after the time in Retry-After"
            details = {"limit": str(exc.description)}
        if status == 405 and exc.valid_methods:
            details = {"allowed_methods": sorted(exc.valid_methods)}
        if status == 400 and (reason := _body_problem(exc)) is not None:
            details = {"reason": reason}  # our words from BodyJSONProvider: a position at most, never the body
        headers = {key: value for key, value in exc.get_response().headers.items()
                   if key in ("Allow", "Retry-After")}
    else:
        status, code, message, details = 500, "internal_error", "The gateway failed unexpectedly", {}
        log.error("unhandled error", exc_info=exc, extra={"request_id": request_id()})
    state().error_code = code
    if status >= 500 or code == "upstream_rate_limited":
        current_app.extensions["gateway"].logger.log_error(
            exc, request_id=request_id(), status=status, code=code, path=clip_path(request.path))
    return error_body(message, code, details, request_id()), status, headers


def _body_problem(exc: BaseException) -> str | None:
    """The text of the `InvalidBody` behind a 400, if any (Flask wraps it in two BadRequests);
    only our own words, so a parser's message never reaches the client."""
    seen = exc
    for _ in range(4):  # BadRequest -> BadRequest (cause) -> InvalidBody (context): a short, bounded walk
        seen = seen.__cause__ or seen.__context__
        if seen is None:
            return None
        if isinstance(seen, InvalidBody):
            return str(seen)
    return None


_HTTP_ERRORS = {  # every status Flask, Werkzeug or Flask-Limiter raises here: (code, our own message)
    400: ("invalid_request", "The request body could not be read as JSON (see details.reason)"),
    404: ("not_found", "No such endpoint; see /swagger/ for the API"),
    405: ("method_not_allowed", "This endpoint does not accept that HTTP method"),
    413: ("payload_too_large", "The request body is larger than the gateway accepts"),
    415: ("unsupported_media_type", "Send the body as JSON with 'Content-Type: application/json'"),
    416: ("range_not_satisfiable", "The requested byte range is outside the file"),
    429: ("rate_limited", "Rate limit exceeded"),
}
HTTP_ERROR_FALLBACK = ("http_error", "The gateway could not serve this request")  # any other HTTP status


# --- bounded request facts ----------------------------------------------------------------------

MAX_LOGGED_PATH_CHARS = 1024


def clip_path(path: str) -> str:
    """The path as logged: at most MAX_LOGGED_PATH_CHARS, with a marker saying how much was cut."""
    if len(path) <= MAX_LOGGED_PATH_CHARS:
        return path
    path = _redacted(path)
    return f"{path[:MAX_LOGGED_PATH_CHARS]}...[{len(path) - MAX_LOGGED_PATH_CHARS} more chars]"


MAX_LOGGED_USER_AGENT_CHARS = 200


def clip_user_agent(agent: str) -> str:
    """The User-Agent as logged: at most MAX_LOGGED_USER_AGENT_CHARS."""
    if len(agent) <= MAX_LOGGED_USER_AGENT_CHARS:
        return agent
    return _redacted(agent)[:MAX_LOGGED_USER_AGENT_CHARS] + "..."


def _redacted(text: str) -> str:
    """Redacted before it is cut: the log writer redacts whole values, and would not know the prefix of a
    key that a cut left behind. Only for the rare value too long to log whole, so on the request thread."""
    return current_app.extensions["gateway"].logger.redact(text)


def _route(current) -> str:
    """The URL rule the request matched (`/api/v1/generate/text`), or one bucket for every unrouted path."""
    return current.url_rule.rule if current.url_rule is not None else UNROUTED
