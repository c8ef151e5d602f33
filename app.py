"""The HTTP layer: a Flask + Flask-RESTX app in front of the Gemini task calls.

`create_app(config)` builds one gateway: namespaces for health, generate and classify, the
request hooks (request id, timing, JSON body checks, one summary log line), rate limits,
CORS and the error handlers that turn every failure into one JSON shape. It is the only
module that imports Flask.

Run it with `python app.py` (development server on HOST:PORT, default 0.0.0.0:8081) or
`waitress-serve --host=0.0.0.0 --port=8081 app:app` (production). The module attribute `app`
is built on first access, so importing `create_app` (tests, tools) starts nothing.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import uuid
from dataclasses import dataclass

from flask import Flask, g, jsonify, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_restx import Api, Namespace, Resource
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

import demo_mode
from api_schema import Schemas, check_distinct_categories, register_models
from config import Config, ConfigError
from errors import GatewayError, UnsupportedMediaType
from gemini_wrapper import Completion, GeminiClient

__version__ = "1.0.0"
log = logging.getLogger("gateway.http")
access_log = logging.getLogger("gateway.access")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
EXPOSED_HEADERS = [
    REQUEST_ID_HEADER, "X-Response-Time-ms", "Retry-After",
    "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
]
ALLOWED_HEADERS = ["Content-Type", "Authorization", "X-Requested-With", "X-API-Key", REQUEST_ID_HEADER]


class GatewayFlask(Flask):
    """Flask that leaves our own errors to `error_payload`'s logging (no traceback per 502)."""

    def log_exception(self, exc_info) -> None:
        if not isinstance(exc_info[1], GatewayError):
            super().log_exception(exc_info)


@dataclass(frozen=True)
class Gateway:
    """What the routes of one app share: settings, the provider client and where it points."""

    config: Config
    client: GeminiClient
    upstream: demo_mode.Upstream
    started_at: float


def create_app(config: Config | None = None, *, client: GeminiClient | None = None) -> Flask:
    """Build a gateway app. `client` replaces the Gemini client built from `config` (tests)."""
    config = config or Config.load()
    _configure_logging(config)
    upstream = demo_mode.resolve_upstream(config)
    if client is None:
        client = GeminiClient.from_config(config.replace(google_api_key=upstream.api_key), base_url=upstream.base_url)
    gateway = Gateway(config=config, client=client, upstream=upstream, started_at=time.monotonic())

    app = GatewayFlask(__name__)
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
    if config.cors_origins:
        CORS(app, origins=list(config.cors_origins), methods=["GET", "POST", "OPTIONS"],
             allow_headers=ALLOWED_HEADERS, expose_headers=EXPOSED_HEADERS, max_age=600)

    _register_hooks(app)  # before the limiter's, so ours run after it and see its headers
    limiter = Limiter(
        get_remote_address, app=app, storage_uri=config.ratelimit_storage_uri,
        strategy=config.ratelimit_strategy, enabled=config.ratelimit_enabled, headers_enabled=True,
    )
    app.extensions["rate_limiter"] = limiter  # a disabled Limiter is referenced nowhere else (weakrefs)
    api = Api(
        app, version=__version__, title="Multi-Task LLM API", prefix="/api/v1", doc="/swagger/",
        description="Text generation, code generation and text classification in front of Google Gemini. "
                    "Every error is JSON of one shape: {error, code, details, request_id}.",
    )
    schemas = register_models(api, config.request_max_prompt_chars)
    _register_error_handlers(app, api)
    app.add_url_rule("/swagger.json", "swagger_spec", lambda: jsonify(api.__schema__))
    api.add_namespace(_health_namespace(gateway, schemas), path="/health")
    task_limit = limiter.limit(config.ratelimit_task_limits)
    api.add_namespace(_generate_namespace(gateway, schemas, task_limit), path="/generate")
    api.add_namespace(_classify_namespace(gateway, schemas, task_limit), path="/classify")
    log.info("gateway ready: env=%s mode=%s model=%s", config.app_env, upstream.mode, config.gemini_model)
    return app


# --- routes -----------------------------------------------------------------------------------

def _health_namespace(gateway: Gateway, schemas: Schemas) -> Namespace:
    ns = Namespace("health", description="Liveness and configuration summary")

    @ns.route("")
    class Health(Resource):
        @ns.response(200, "Service is up", schemas.health)
        def get(self):
            """Report status, version, environment, provider, mode and uptime."""
            return {
                "status": "ok",
                "version": __version__,
                "environment": gateway.config.app_env,
                "provider": gateway.upstream.provider,
                "model": gateway.client.model,
                "mode": gateway.upstream.mode,
                "uptime_seconds": round(time.monotonic() - gateway.started_at, 3),
            }

    return ns


def _task_responses(ns: Namespace, schemas: Schemas, success_model):
    """The documented responses every task endpoint shares."""
    codes = {
        200: ("Answer", success_model), 400: ("Invalid input", schemas.error),
        413: ("Body too large", schemas.error), 415: ("Body is not JSON", schemas.error),
        429: ("Rate limited, by the gateway or the provider; see Retry-After", schemas.error),
        502: ("The provider failed or gave an unusable answer", schemas.error),
        503: ("No provider configured", schemas.error), 504: ("The provider did not answer in time", schemas.error),
    }

    def decorate(method):
        for status, (description, model) in codes.items():
            method = ns.response(status, description, model)(method)
        return method

    return decorate


def _generate_namespace(gateway: Gateway, schemas: Schemas, task_limit) -> Namespace:
    ns = Namespace("generate", description="Text and code generation")

    @ns.route("/text")
    class TextGeneration(Resource):
        @ns.expect(schemas.text_request.model)
        @_task_responses(ns, schemas, schemas.text_response)
        @task_limit
        def post(self):
            """Generate text from a prompt (temperature 0.7)."""
            payload = schemas.text_request.validate(_json_body())
            completion = gateway.client.generate_text(payload["prompt"])
            return {"generated_text": completion.text, **_answer_fields(gateway, completion)}

    @ns.route("/code")
    class CodeGeneration(Resource):
        @ns.expect(schemas.code_request.model)
        @_task_responses(ns, schemas, schemas.code_response)
        @task_limit
        def post(self):
            """Generate code (temperature 0.2); the answer is the code without markdown fences."""
            payload = schemas.code_request.validate(_json_body())
            language = payload.get("language", "python").strip().lower()
            completion = gateway.client.generate_code(payload["prompt"], language)
            return {"generated_code": completion.text, "language": language, **_answer_fields(gateway, completion)}

    return ns


def _classify_namespace(gateway: Gateway, schemas: Schemas, task_limit) -> Namespace:
    ns = Namespace("classify", description="Text classification into caller-given categories")

    @ns.route("/text")
    class TextClassification(Resource):
        @ns.expect(schemas.classify_request.model)
        @_task_responses(ns, schemas, schemas.classify_response)
        @task_limit
        def post(self):
            """Classify text into exactly one of the given categories (temperature 0.0)."""
            payload = schemas.classify_request.validate(_json_body())
            categories = [category.strip() for category in payload["categories"]]
            check_distinct_categories(categories)
            completion = gateway.client.classify_text(payload["text"], categories)
            return {"classification": completion.text, "categories": categories,
                    **_answer_fields(gateway, completion)}

    return ns


def _json_body():
    """The parsed JSON body; 415 if it is not declared as JSON (400 if it does not parse)."""
    if not request.is_json:
        raise UnsupportedMediaType(
            "Send the body as JSON with 'Content-Type: application/json'",
            details={"content_type": request.content_type or ""},
        )
    return request.get_json()


def _answer_fields(gateway: Gateway, completion: Completion) -> dict:
    input_tokens, output_tokens = completion.input_tokens or 0, completion.output_tokens or 0
    return {
        "model": completion.model,
        "provider": gateway.upstream.provider,
        "cached": False,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                  "total_tokens": input_tokens + output_tokens},
        "request_id": g.request_id,
    }


# --- hooks and errors --------------------------------------------------------------------------

def _register_hooks(app: Flask) -> None:
    @app.before_request
    def start_request():
        g.started = time.perf_counter()
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex

    @app.after_request
    def finish_request(response):
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        if response.status_code not in (429, 503):
            response.headers.pop("Retry-After", None)  # Flask-Limiter adds it to every response
        response.headers[REQUEST_ID_HEADER] = _request_id()
        response.headers["X-Response-Time-ms"] = f"{elapsed_ms:.1f}"
        access_log.info(
            "%s %s %d %.1fms", request.method, request.path, response.status_code, elapsed_ms,
            extra={"request_id": _request_id(), "status": response.status_code},
        )
        return response


def _request_id() -> str:
    if "request_id" not in g:
        g.request_id = uuid.uuid4().hex
    return g.request_id


def _register_error_handlers(app: Flask, api: Api) -> None:
    """Every failure, from RESTX routes or plain Flask ones, becomes the one JSON error shape."""

    @api.errorhandler(Exception)
    def api_error(exc):
        """Any failure: JSON {error, code, details, request_id} with the matching status."""
        body, status, headers = error_payload(exc)
        return body, status, headers

    @app.errorhandler(Exception)
    def flask_error(exc):
        body, status, headers = error_payload(exc)
        return jsonify(body), status, headers


def error_payload(exc: BaseException) -> tuple[dict, int, dict]:
    """(body, status, headers) for any exception, logging the ones that are our fault."""
    headers = {}
    if isinstance(exc, GatewayError):
        status, code, message, details = exc.status, exc.code, exc.message, exc.details
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        log.warning("%s: %s", code, message, extra={"request_id": _request_id()})
    elif isinstance(exc, HTTPException):
        status, details = exc.code or 500, {}
        code, message = _HTTP_ERRORS.get(status, ("http_error", exc.description or exc.name))
        if status == 429:
            message = f"Rate limit exceeded ({exc.description}); retry after the time in Retry-After"
            details = {"limit": str(exc.description)}
        if status == 405 and exc.valid_methods:
            details = {"allowed_methods": sorted(exc.valid_methods)}
        headers = {key: value for key, value in exc.get_response().headers.items()
                   if key in ("Allow", "Retry-After")}
    else:
        status, code, message, details = 500, "internal_error", "The gateway failed unexpectedly", {}
        log.error("unhandled error", exc_info=exc, extra={"request_id": _request_id()})
    body = {"error": message, "code": code, "details": details, "request_id": _request_id()}
    return body, status, headers


_HTTP_ERRORS = {
    400: ("invalid_request", "The request body is not valid JSON"),
    404: ("not_found", "No such endpoint; see /swagger/ for the API"),
    405: ("method_not_allowed", "This endpoint does not accept that HTTP method"),
    413: ("payload_too_large", "The request body is larger than the gateway accepts"),
    415: ("unsupported_media_type", "Send the body as JSON with 'Content-Type: application/json'"),
    429: ("rate_limited", "Rate limit exceeded"),
}


def _configure_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("httpx", "httpx2", "google_genai", "google_genai.models"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


# --- entry points -----------------------------------------------------------------------------

def _app_or_exit() -> Flask:
    """Build the app from the environment, or exit with a one-line reason if it is unusable."""
    from dotenv import load_dotenv

    load_dotenv()
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
        return _module_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    application = _app_or_exit()
    config: Config = application.extensions["gateway"].config
    shown_host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    print(f" * Running on http://{config.host}:{config.port}")
    print(f" * Swagger UI available at: http://{shown_host}:{config.port}/swagger/")
    if config.is_production:
        from waitress import serve

        serve(application, host=config.host, port=config.port)
    else:
        application.run(host=config.host, port=config.port, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
