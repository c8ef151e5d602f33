"""The HTTP layer: a Flask + Flask-RESTX app in front of the gateway's task calls.

`create_app(config)` wraps one `gateway.container.Gateway` in HTTP: the namespaces of
`gateway/http/` (tasks, health and stats, probes, models, keys, usage), the request hooks
(request id, security scan, timing, cost headers, the ledger record and one summary log line per
request), client authentication (`gateway/auth/guard.py`: the key goes on the request's
`RequestState`), rate limits (per key, or per client address without one), CORS and the error
handlers that turn every failure into one JSON shape. With `gateway/http/` it is the only code
that imports Flask.

Run it with `python app.py` (waitress on HOST:PORT, default 0.0.0.0:8081, with the settings of
`serve.waitress_settings`), `python serve.py` (production: supervised workers) or
`waitress-serve --host=0.0.0.0 --port=8081 app:app`. The module attribute `app`
is built on first access, so importing `create_app` (tests, tools) starts nothing.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import threading
import time
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_restx import Api
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import RequestRedirect

from enhanced_logging import log_uncaught_exceptions, redact_log_handlers
from gateway.auth import budgets
from gateway.auth import guard as auth
from gateway.auth.jwt_tokens import JWT_KEY_PREFIX, JwtVerifier
from gateway.config import Config, ConfigError
from gateway.container import Gateway, build_gateway
from gateway.errors import GatewayError, RequestBlocked
from gateway.http import (
    batch_routes,
    key_cli,
    key_routes,
    limit_parsing,
    limiter_hook,
    model_routes,
    openai_routes,
    probe_routes,
    process_routes,
    routes,
    security_headers,
    swagger_ui,
    task_routes,
    usage_routes,
)
from gateway.http.request_state import RequestState, state
from gateway.http.schemas import AUTHORIZATIONS, InvalidBody, bounded_int, register_models
from gateway.tasks.service import TaskOutcome

__version__ = routes.__version__
log = logging.getLogger("gateway.http")

REQUEST_ID_HEADER = "X-Request-ID"
CLIENT_REQUEST_ID_HEADER = "X-Client-Request-ID"  # the client's X-Request-ID, echoed back
_MAX_REQUEST_ID = 128
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")
COST_HEADERS = ["X-Cached", "X-Tokens-Input", "X-Tokens-Output", "X-Cost-Input", "X-Cost-Output",
                "X-Cost-Total", "X-Cost-Saved", "X-Cost-Overall", "X-Model", "X-Provider", "X-Fallback-Used"]
EXPOSED_HEADERS = [
    REQUEST_ID_HEADER, CLIENT_REQUEST_ID_HEADER, "X-Response-Time-ms", "Retry-After",
    "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", *COST_HEADERS,
]
ALLOWED_HEADERS = ["Content-Type", "Authorization", "X-Requested-With", "X-API-Key", "X-API-Token", REQUEST_ID_HEADER,
                   "Cache-Control"]


class GatewayFlask(Flask):
    """Flask that leaves our own errors to `routes.error_payload`'s logging (no traceback per 502),
    and whose routing redirects (`/swagger` -> `/swagger/`) point at a path on this server."""

    def handle_http_exception(self, e):
        """Werkzeug's RequestRedirect skips every error handler and answers HTML with an absolute
        Location built from the client's Host header (`http://evil.example/...`): answer it with the
        path alone instead, and no HTML."""
        if isinstance(e, RequestRedirect):
            target = urlsplit(e.new_url)
            location = "/" + target.path.lstrip("/")  # never `//host`: a browser reads that as another site
            location += f"?{target.query}" if target.query else ""
            return Response(status=e.code, headers={"Location": location}, mimetype="text/plain")
        return super().handle_http_exception(e)

    def log_exception(self, exc_info) -> None:
        if not isinstance(exc_info[1], GatewayError):
            super().log_exception(exc_info)


def create_app(config: Config | None = None, *, retry_overrides: dict | None = None) -> Flask:
    """Build a gateway app. `retry_overrides` replace retry policy fields (tests inject sleep and clock)."""
    config = config or Config.load()
    _configure_logging(config)
    gateway = build_gateway(config, retry_overrides=retry_overrides)
    redact_log_handlers(gateway.logger.redactor.secrets)  # stderr learns the registry's own keys (key_env) too

    app = GatewayFlask(__name__)
    app.url_map.merge_slashes = False  # `/api/v1//health` is a JSON 404, not a redirect built from Host
    app.json = BodyJSONProvider(app)
    app.config.update(
        MAX_CONTENT_LENGTH=config.request_max_bytes,
        RESTX_MASK_SWAGGER=False,
        SWAGGER_UI_DOC_EXPANSION="list",
        RESTX_ERROR_404_HELP=False,
        ERROR_INCLUDE_MESSAGE=False,
        PROPAGATE_EXCEPTIONS=False,
        RATELIMIT_HEADERS_ENABLED=True,
    )
    app.extensions["gateway"] = gateway
    if config.ratelimit_trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=config.ratelimit_trusted_proxies)
    if config.cors_origins:  # "*" only in demo mode unless set; a live key gets no origin until CORS_ORIGINS names it
        CORS(app, origins=_cors_origins(config.cors_origins), methods=["GET", "POST", "DELETE", "OPTIONS"],
             allow_headers=ALLOWED_HEADERS, expose_headers=EXPOSED_HEADERS, max_age=600)

    limit_parsing.install()  # each limit string parsed once, not six times a request
    _register_hooks(app, gateway)  # before the limiter's, so ours run after it and see its headers
    limiter = Limiter(
        _limit_key, app=app, storage_uri=config.ratelimit_storage_uri,
        strategy=config.ratelimit_strategy, enabled=config.ratelimit_enabled, headers_enabled=True,
    )
    app.extensions["rate_limiter"] = limiter  # a disabled Limiter is referenced nowhere else (weakrefs)
    api = Api(
        app, version=__version__, title="Multi-Task LLM API", prefix="/api/v1", doc="/swagger/",
        description="Text generation, code generation, text classification, batches and prompt processing in "
                    "front of Gemini, OpenAI and Anthropic models (the OpenAI-compatible /v1 is in the README). "
                    "Every error is JSON of one shape: {error, code, details, request_id}.",
        authorizations=AUTHORIZATIONS,
    )
    swagger_ui.install(app, api)  # the page without inline code, so its CSP needs no 'unsafe-inline'
    security_headers.install(app, hsts=config.hsts_enabled)
    schemas = register_models(api, config.request_max_prompt_chars)
    _register_error_handlers(app, api)
    app.add_url_rule("/swagger.json", "swagger_spec", lambda: jsonify(api.__schema__))
    task_limit = _task_limit(limiter, config.ratelimit_task_limits)
    api.add_namespace(routes.health_namespace(gateway, schemas), path="/health")
    for namespace, path in task_routes.task_namespaces(gateway, schemas, task_limit):
        api.add_namespace(namespace, path=path)
    batch_limit = _task_limit(limiter, config.ratelimit_task_limits,  # each item of a batch counts as a request
                              cost=batch_routes.batch_cost(config.batch_max_items))
    batch_namespace, batch_path = batch_routes.batch_namespace(gateway, schemas, batch_limit)
    app.extensions["batch_runner"] = batch_namespace.runner  # the process's one pool for batch items
    api.add_namespace(batch_namespace, path=batch_path)
    api.add_namespace(process_routes.process_namespace(gateway, api, schemas, task_limit), path="/process")
    for namespace, path in probe_routes.probe_namespaces(gateway, schemas):
        api.add_namespace(namespace, path=path)
    stats_limit = limiter.limit(config.ratelimit_stats_limits)  # /stats reads the ledger: its own budget
    api.add_namespace(routes.stats_namespace(gateway, schemas, stats_limit), path="/stats")
    api.add_namespace(key_routes.keys_namespace(gateway, schemas, stats_limit), path="/keys")
    api.add_namespace(usage_routes.usage_namespace(gateway, schemas, stats_limit), path="/usage")
    api.add_namespace(model_routes.models_namespace(gateway, schemas, stats_limit), path="/models")
    app.register_blueprint(openai_routes.blueprint(gateway, task_limit, stats_limit))  # /v1: OpenAI's wire format
    limiter_hook.drop_idle_check(app, limiter)  # every limit is a route's decorator: checked once, there
    app.cli.add_command(key_cli.keys_command)
    log.info("gateway ready: env=%s mode=%s model=%s", config.app_env, gateway.upstream.mode, config.gemini_model)
    log.info("client authentication: %s", "on (API keys required; /health and Swagger open)" if config.auth_enabled
             else "off (AUTH_ENABLED=false, or unset outside production): requests are not authenticated")
    for warning in config.exposure_warnings():  # a live key strangers could spend: say so at every start
        log.warning(warning)
    return app


# --- hooks --------------------------------------------------------------------------------------

def _limit_key() -> str:
    """Rate limits count per API key when the request has one, per client address otherwise."""
    key = state().api_key
    return f"key:{key.id}" if key is not None else get_remote_address()


def _task_limit(limiter: Limiter, default: str, cost=1):
    """The task endpoints' limits: `default` on each endpoint, or, for a key with its own `rate_limit`,
    that limit over all task endpoints together (requests per key, whichever task they ask for).

    One limit whose value and bucket depend on the key, not two limits of which one is exempt: Flask-Limiter
    resolves, checks and reports every decorator on every request, so two cost twice the limiter work.
    `cost`: what one request counts (a batch: its items, `batch_routes.batch_cost`)."""
    return limiter.shared_limit(
        lambda: state().api_key.rate_limit if _has_own_limit() else default,
        # one limit checked once per request: the default counts per endpoint, a key's own over all of them
        scope=lambda endpoint: _OWN_LIMIT_SCOPE if _has_own_limit() else endpoint,
        cost=cost)


_OWN_LIMIT_SCOPE = "key-own-limit"


def _has_own_limit() -> bool:
    key = state().api_key
    return key is not None and bool(key.rate_limit)


def _register_hooks(app: Flask, gateway: Gateway) -> None:
    scan = gateway.config.security_mode != "off"
    authenticate = gateway.config.auth_enabled
    jwt = JwtVerifier.from_config(gateway.config) if authenticate else None

    @app.before_request
    def start_request():
        context = g._get_current_object().state = RequestState()  # the one object requests share
        context.request_id = routes.new_request_id()  # always ours: unique and unguessable
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        # The client's id is kept apart (ledger column, log line, echoed header); checked in linear
        # time, the length first, so a huge header costs nothing.
        if len(incoming) <= _MAX_REQUEST_ID and _VALID_REQUEST_ID.fullmatch(incoming):
            context.client_request_id = incoming
        if authenticate and auth.needs_key(request.method, request.path):
            context.api_key = key = auth.authenticate(gateway.keys, request.headers, time.time(), jwt)
            auth.authorize(key, request.path)
            if jwt is None or not key.id.startswith(JWT_KEY_PREFIX):  # a JWT's key has no row to touch
                gateway.keys.touch(key)
            if key.tokens_per_minute is not None and request.path in auth.TASK_OF_PATH:
                gateway.tokens.check(key.id, key.tokens_per_minute)
            if key.monthly_budget_usd is not None and request.path in auth.TASK_OF_PATH:
                context.budget_reservation = gateway.budgets.reserve(
                    key.id, key.monthly_budget_usd, _estimated_cost(gateway, key))
        elif not authenticate:
            auth.refuse_anonymous_management(request.path)
        if scan:
            _scan_request(gateway)

    @app.after_request
    def finish_request(response):
        context = state()
        elapsed_ms = (time.perf_counter() - context.started) * 1000
        headers = response.headers
        _settle_retry_after(headers, context)
        headers[REQUEST_ID_HEADER] = routes.request_id()
        if context.client_request_id is not None:
            headers[CLIENT_REQUEST_ID_HEADER] = context.client_request_id
        headers["X-Response-Time-ms"] = f"{elapsed_ms:.1f}"
        if context.streaming:
            return response  # accounted for when the stream ends (gateway/http/routes.py)
        outcome: TaskOutcome | None = context.outcome
        info = routes.request_info()
        overall = gateway.finish_request(info, response.status_code, elapsed_ms, outcome,
                                         is_task=info.method == "POST" and info.path in routes.TASK_ENDPOINTS)
        if outcome is not None:
            _add_cost_headers(response, outcome, overall)
        return response

    @app.teardown_request
    def release_budget(_exc):
        """After the request is accounted for (for a stream: when it ends), its budget reservation goes."""
        context = state()
        reservation, context.budget_reservation = context.budget_reservation, None
        if reservation is not None:
            gateway.budgets.release(reservation)


def _estimated_cost(gateway: Gateway, key) -> float:
    """What a task request may cost at most (gateway/auth/budgets.py says how it is estimated): the body is not read
    yet, so on the dearest model this key may use, at that model's output limit."""
    size = request.content_length
    if size is None:
        size = len(request.get_data(cache=True))
    input_tokens, output_tokens = budgets.estimated_tokens(size, gateway.service.max_output_tokens)
    return gateway.models.highest_cost(input_tokens, output_tokens, gateway.service.price_of, gateway.router.routes,
                                       key)


def _cors_origins(origins: tuple[str, ...]) -> list:
    """The configured origins as flask-cors should match them: each literal exactly.

    flask-cors reads a string holding `[`, `*`, `?`... as a regex and matches it unanchored, so a
    bracketed IPv6 origin would become a character class; an escaped, anchored pattern keeps every
    literal literal (`config.is_literal_origin` has already refused anything else)."""
    return [origin if origin == "*" else re.compile(re.escape(origin) + r"\Z", re.IGNORECASE)
            for origin in origins]


def _settle_retry_after(headers, context) -> None:
    """Keep the Retry-After that belongs to this response.

    Flask-Limiter writes its own window into every response (its hook runs before ours), which
    would overwrite the provider's hint on an upstream 429; only the limiter's own 429 keeps it.
    """
    own_hint = context.retry_after
    if own_hint is not None:
        headers["Retry-After"] = own_hint
    elif context.error_code != "rate_limited":
        headers.pop("Retry-After", None)


def _scan_request(gateway: Gateway) -> None:
    """Log each security finding; in block mode refuse high-severity ones with 400.

    The scanner reads the body's strings lazily and stops at its per-location cap, so a large
    body costs a bounded scan."""
    current = request._get_current_object()  # one proxy lookup, not one per attribute
    body = current.get_json(silent=True) if current.is_json else None
    result = gateway.scanner.scan(
        path=current.path, query=current.query_string.decode("latin-1"), headers=current.headers,
        body_texts=_iter_strings(body), body_size=current.content_length or 0,
    )
    for event in result.events:
        gateway.metrics.count_security_event(event.type)
        gateway.logger.log_security_event(event, request_id=routes.request_id(), client=current.remote_addr or "")
    if gateway.scanner.should_block(result.events, gateway.config.security_mode):
        raise RequestBlocked("The request was refused by the gateway's security checks",
                             details={"findings": sorted({event.type for event in result.events
                                                          if event.severity == "high"})})


def _strings_in(value) -> list[str]:
    """The string values of a parsed JSON body (what a prompt injection or XSS would hide in)."""
    return list(_iter_strings(value))


def _iter_strings(value):
    """The string values of a parsed JSON body in document order, one at a time.

    A walk with an explicit stack: a body nested hundreds of levels deep must not overflow ours."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            pending.extend(reversed(item.values()))
        elif isinstance(item, list):
            pending.extend(reversed(item))


class BodyJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing (400, not a 500 later) what Python's parser accepts but nothing can use:
    nesting past the parser's depth, numbers of more than MAX_NUMBER_DIGITS digits, and lone
    surrogate escapes such as "\\ud800", which are not Unicode text and cannot be encoded for a cache
    key, a log line or the provider. Every failure is an `InvalidBody` in our own words (a position at
    most): the parser's messages name Python internals such as `sys.set_int_max_str_digits()`."""

    def loads(self, s, **kwargs):
        kwargs.setdefault("parse_int", bounded_int)
        try:
            value = super().loads(s, **kwargs)
        except InvalidBody:
            raise
        except RecursionError:
            raise InvalidBody("the JSON is nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise InvalidBody(f"not valid JSON at line {exc.lineno} column {exc.colno}") from None
        except UnicodeDecodeError as exc:
            raise InvalidBody(f"not valid UTF-8, UTF-16 or UTF-32 text at byte {exc.start}") from None
        except ValueError:
            raise InvalidBody("not valid JSON") from None
        for text in _strings_in(value):  # microseconds for a request body; the body may be UTF-16 or -32
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidBody("a string holds a lone surrogate escape (\\ud800-\\udfff)") from None
        return value


def _add_cost_headers(response, outcome: TaskOutcome, overall: float) -> None:
    pairs = [
        ("X-Model", outcome.model_id),  # who answered: a fallback, when the asked model failed
        ("X-Provider", outcome.provider),
        ("X-Fallback-Used", "true" if outcome.fallback_used else "false"),
        ("X-Cached", "true" if outcome.cached else "false"),
        ("X-Tokens-Input", str(outcome.input_tokens)),
        ("X-Tokens-Output", str(outcome.output_tokens)),
        ("X-Cost-Input", _usd(outcome.cost.input)),
        ("X-Cost-Output", _usd(outcome.cost.output)),
        ("X-Cost-Total", _usd(outcome.cost.total)),
        ("X-Cost-Overall", _usd(overall)),
    ]
    if outcome.cached:
        pairs.append(("X-Cost-Saved", _usd(outcome.saved.total)))
    headers = response.headers
    # Werkzeug's `headers[name] = value` scans every header already there for each name set (eleven
    # scans of ~15 names); one scan tells whether any is there, and when none is (a task's answer
    # carries none before this hook) appending gives the same headers.
    if any(name.lower() in _COST_HEADER_NAMES for name in headers.keys()):
        for name, value in pairs:
            headers[name] = value
    else:
        for name, value in pairs:
            headers.add(name, value)


_COST_HEADER_NAMES = frozenset(name.lower() for name in COST_HEADERS)


def _usd(amount: float) -> str:
    return f"{amount:.10f}"


# --- errors -------------------------------------------------------------------------------------

def _register_error_handlers(app: Flask, api: Api) -> None:
    """Every failure, from RESTX routes or plain Flask ones, becomes the one JSON error shape."""

    @api.errorhandler(Exception)
    def api_error(exc):
        """Any failure: JSON {error, code, details, request_id} with the matching status."""
        _bill_refused_answer(exc)
        body, status, headers = routes.error_payload(exc)
        return body, status, headers

    @app.errorhandler(Exception)
    def flask_error(exc):
        _bill_refused_answer(exc)
        if openai_routes.is_openai_path(request.path):  # OpenAI's clients read OpenAI's error format
            body, status, headers = openai_routes.openai_error(exc)
        else:
            body, status, headers = routes.error_payload(exc)
        return jsonify(body), status, headers


def _bill_refused_answer(exc: BaseException) -> None:
    """An answer the provider was paid for but the task refused (GatewayError.billed) is this request's
    outcome: its ledger row, budget and cost headers carry the cost, though the client gets the error."""
    billed = getattr(exc, "billed", None)
    if billed is not None:
        state().outcome = billed


def _configure_logging(config: Config) -> None:
    """Python logging to stderr, every handler of it redacted like the JSON logs (the key included):
    a traceback or a library's record can carry what an upstream echoed back."""
    logging.basicConfig(
        level=config.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("httpx", "httpx2", "google_genai", "google_genai.models"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    redact_log_handlers(config.secret_values)


# --- entry points -----------------------------------------------------------------------------

def _app_or_exit() -> Flask:
    """Build the app from the environment, or exit with a one-line reason if it is unusable."""
    from dotenv import load_dotenv

    load_dotenv()
    log_uncaught_exceptions()  # entry points only: tests keep pytest's own hooks
    try:
        return create_app(Config.load())
    except ConfigError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


_module_app: Flask | None = None


def __getattr__(name: str):
    """`app` is built on first access, so `waitress-serve app:app` works and imports stay cheap."""
    global _module_app
    if name == "app":
        if _module_app is None:
            _module_app = _app_or_exit()
            _stop_cleanly_on_sigterm()
        return _module_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stop_cleanly_on_sigterm() -> None:
    """`waitress-serve app:app` installs no SIGTERM handler, so SIGTERM (what `docker stop` sends) ended the process
    at once, without the exit handlers that drain the log writer: requests answered in its last few milliseconds had
    no log line. As a SystemExit, waitress stops serving (running requests get 5 s) and the process exits normally,
    logs written. Only from the main thread, and only where nothing (serve.py's worker, a host) handles SIGTERM."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum, _frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the shutdown short
    log.info("signal %s: stopping", signum)
    raise SystemExit(0)


def main() -> None:
    application = _app_or_exit()
    config: Config = application.extensions["gateway"].config
    shown_host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    print(f" * Running on http://{config.host}:{config.port}")
    print(f" * Swagger UI available at: http://{shown_host}:{config.port}/swagger/", flush=True)
    from gateway import serve  # waitress with the production launcher's settings, in development too

    serve.serve_app(application)


if __name__ == "__main__":
    main()
