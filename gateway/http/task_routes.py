"""The task endpoints, generated from the task table: one resource per task, one stream resource.

Each task's resource validates its body with the task's schema, reads the per-request options
(model, temperature, max_tokens, top_p, stop, fallbacks, cache control), runs the task through
`TaskService` and answers with the task's result field plus the model, usage and cost. What
differs between tasks is in `gateway.tasks.table` and the task's request schema, nothing here.
A task that streams answers as server-sent events when the body says `"stream": true` (or, with no
`stream` in the body, when `Accept` prefers `text/event-stream` to JSON): `chunk` events as the
provider produces them, then `done` with the JSON answer's fields (a text's without the text,
which is the chunks joined), or `error`.
"""

from __future__ import annotations

import json
import math

from flask import Response, request
from flask_restx import Namespace, Resource

from gateway.container import Gateway
from gateway.errors import InvalidRequest
from gateway.http import stream_driver
from gateway.http.request_state import state
from gateway.http.routes import json_body, request_id
from gateway.http.schemas import SECURITY, Schemas
from gateway.tasks.service import CacheControl, TaskOptions, TaskOutcome
from gateway.tasks.table import TASKS, TaskDefinition, unchanged

# Summaries are the first line, without a period: RESTX cuts a summary at its first "." ("0.7" -> "0").
DOCS = {
    "text": "Generate text from a prompt.\n\nDefault temperature 0.7; the body may choose the model and sampling. "
            "With `\"stream\": true` (or `Accept: text/event-stream` and no `stream`) the 200 is a "
            "text/event-stream: `chunk` events, then `done` with this answer's fields except `generated_text` "
            "(the chunks joined), or `error`.",
    "code": "Generate code for a request, returned without markdown fences.\n\n"
            "Default temperature 0.2; the body may choose the language, the model and sampling. "
            "With `\"stream\": true` (or `Accept: text/event-stream` and no `stream`) the 200 is a "
            "text/event-stream: `chunk` events (the model's text, fences included), then `done` with this "
            "answer's fields (`generated_code`: the code extracted from the whole answer), or `error`.",
    "classify": "Classify a text into exactly one of the given categories.\n\n"
                "Default temperature 0.0; the answer is always one of the categories as the caller wrote it.",
}
STREAM_DOC = ("Generate text as it is produced, as server-sent events.\n\n"
              "`chunk` events ({text}), then `done` (model, usage, cost) or `error` (the error shape). "
              "The same as POST /generate/text with `\"stream\": true`. "
              "A completed stream is cached and a hit is replayed as a stream; cost headers come in the `done` event.")
STREAM_200 = ("A text/event-stream, not JSON: `event: chunk` with data {\"text\"} for each piece as the provider "
              "produces it, then one `event: done` with data {model, provider, cached, usage, cost, request_id} "
              "or one `event: error` with data {error, code, details, request_id}. Errors before the stream "
              "starts are plain JSON with the statuses below.")
TASK_200 = ("Answer (JSON; cost headers X-Cost-*, X-Tokens-*, X-Cached), or with `stream` a text/event-stream: "
            "`event: chunk` data {\"text\"} per piece, then one `event: done` with the JSON answer's fields "
            "(a text's without `generated_text`: the chunks joined) or one `event: error` with the error shape")
# Resource class names give the Swagger operation ids (post_text_generation...): kept stable for client generators.
RESOURCE_NAMES = {"text": "TextGeneration", "code": "CodeGeneration", "classify": "TextClassification"}
NAMESPACES = {"generate": ("/generate", "Text and code generation"),
              "classify": ("/classify", "Text classification into caller-given categories")}


def task_namespaces(gateway: Gateway, schemas: Schemas, task_limit) -> list[tuple[Namespace, str]]:
    """(namespace, path) pairs holding every task's resource, ready for `api.add_namespace`."""
    namespaces = {name: Namespace(name, description=description)
                  for name, (_path, description) in NAMESPACES.items()}
    for task in TASKS.values():
        ns = namespaces["classify" if task.path.startswith("/classify") else "generate"]
        _add_task_resource(ns, gateway, schemas, task, task_limit)
    _add_stream_resource(namespaces["generate"], gateway, schemas, task_limit)
    return [(ns, NAMESPACES[name][0]) for name, ns in namespaces.items()]


def _add_task_resource(ns: Namespace, gateway: Gateway, schemas: Schemas, task: TaskDefinition, task_limit) -> None:
    request_schema, response_model = schemas.requests[task.name], schemas.responses[task.name]

    def post(self):
        payload, inputs, options = read_request(gateway, task, request_schema)
        if wants_stream(task, payload):
            return stream_response(gateway, task, inputs, options, cache_control(payload))
        outcome = gateway.service.run(task.name, inputs, options, cache_control(payload))
        echoed = {name: inputs[name] for name in task.echo}
        return {task.result_field: outcome.completion.text, **echoed, **answer_fields(outcome)}

    post.__doc__ = DOCS[task.name]
    documented = task_responses(ns, schemas, response_model, TASK_200) if task.streams else \
        task_responses(ns, schemas, response_model)
    post = ns.expect(request_schema.model)(documented(task_limit(post)))
    if task.streams:
        post = ns.produces(["application/json", "text/event-stream"])(post)
    resource = type(RESOURCE_NAMES[task.name], (Resource,), {"post": post})
    ns.route(task.path.removeprefix(f"/{ns.name}"))(resource)


def _add_stream_resource(ns: Namespace, gateway: Gateway, schemas: Schemas, task_limit) -> None:
    task = TASKS["text"]
    request_schema = schemas.requests[task.name]

    @ns.route("/text/stream")
    class TextGenerationStream(Resource):
        @ns.expect(request_schema.model)
        @ns.produces(["text/event-stream", "application/json"])
        @task_responses(ns, schemas, None, STREAM_200)
        @task_limit
        def post(self):
            payload, inputs, options = read_request(gateway, task, request_schema)
            return stream_response(gateway, task, inputs, options, cache_control(payload))

        post.__doc__ = STREAM_DOC


def wants_stream(task: TaskDefinition, payload: dict) -> bool:
    """Whether to answer as server-sent events: the body's `stream` decides; without it, an `Accept` that
    prefers text/event-stream to JSON (`*/*`, or both listed alike, keeps JSON). A task that does not
    stream refuses `"stream": true` (400) and answers JSON whatever `Accept` says."""
    asked = payload.get("stream")
    if not task.streams:
        if asked is not None and asked is not False:
            raise InvalidRequest(f"Invalid input: '{task.name}' does not stream: leave 'stream' out or false",
                                 details={"fields": {"stream": "this task does not stream"}})
        return False
    if asked is not None:
        return asked
    if "text/event-stream" not in request.headers.get("Accept", "").lower():  # most requests: no parsing
        return False
    accept = request.accept_mimetypes
    return accept["text/event-stream"] > accept["application/json"]


def stream_response(gateway: Gateway, task: TaskDefinition, inputs: dict, options: TaskOptions,
                    control: CacheControl) -> Response:
    """The task's answer as events (gateway/http/stream_driver.py opens and runs the stream)."""
    result = None if task.parse is unchanged else (task.result_field, {name: inputs[name] for name in task.echo})
    return stream_driver.stream_task(gateway, task.name, inputs, options, control, lambda _opened: TaskEvents(result))


class TaskEvents:
    """The task streams' format: `event: chunk` {text} per piece, then `event: done` with the answer fields, plus
    the task's result (and echoed inputs) when its parser changes the text (the code of a code answer; a text's
    result is the chunks joined, not sent twice: an answer may be megabytes), or `event: error`."""

    def __init__(self, result: tuple[str, dict] | None):
        self.result = result  # (result field, echoed inputs), or None

    def opening(self) -> None:
        return None

    def piece(self, text: str) -> str:
        return _sse("chunk", {"text": text})

    def done(self, outcome: TaskOutcome, overall: float | None) -> str:
        fields = answer_fields(outcome)
        if self.result is not None:
            field, echoed = self.result
            fields = {field: outcome.completion.text, **echoed, **fields}
        fields["cost"]["overall"] = None if overall is None else round(overall, 10)
        return _sse("done", fields)

    def failed(self, body: dict, status: int) -> str:
        return _sse("error", body)


def read_request(gateway: Gateway, task: TaskDefinition, request_schema) -> tuple[dict, dict, TaskOptions]:
    """(body, task inputs, checked options) of a task request, noting on the request state what its log
    line and ledger row need: the prompt, and the model (the default one while the options are refused)."""
    payload = request_schema.validate(json_body())
    inputs = task.inputs(payload)
    current = state()
    current.prompt = inputs[task.prompt_field]
    current.model = gateway.service.default_model
    options = task_options(payload, gateway, task.name)
    current.model = options.model
    return payload, inputs, options


def task_responses(ns: Namespace, schemas: Schemas, success_model,
                    success="Answer; cost headers X-Cost-*, X-Tokens-*, X-Cached"):
    """The documented responses every task endpoint shares (`success_model` None: the 200 is not JSON)."""
    codes = {
        200: (success, success_model),
        400: ("Invalid input", schemas.error),
        401: ("No valid API key (missing, unknown, revoked or expired), when AUTH_ENABLED", schemas.error),
        402: ("The key's monthly budget is spent (details: budget, spent, reset)", schemas.error),
        403: ("The key may not run this task or model (allowed_tasks, allowed_models)", schemas.error),
        413: ("Body too large", schemas.error), 415: ("Body is not JSON", schemas.error),
        429: ("Rate limited, by the gateway or the provider; see Retry-After", schemas.error),
        502: ("The provider failed or gave an unusable answer", schemas.error),
        503: ("The model's provider is not configured, or its circuit is open", schemas.error),
        504: ("The provider did not answer in time", schemas.error),
    }

    def decorate(method):
        for status, (description, model) in codes.items():
            method = ns.response(status, description, model)(method)
        method = ns.doc(security=SECURITY, params={"Cache-Control": {"in": "header", "type": "string", "description":
                        "no-cache: skip the cache lookup; no-store: do not cache the answer"}})(method)
        return method

    return decorate


def task_options(payload: dict, gateway: Gateway, task: str) -> TaskOptions:
    """The per-request options of a validated body; the schema has checked types and ranges already."""
    for name in ("temperature", "top_p"):
        value = payload.get(name)
        if value is not None and not math.isfinite(value):  # NaN passes every range check
            raise InvalidRequest(f"Invalid input: '{name}' must be a finite number",
                                 details={"fields": {name: "must be a finite number"}})
    fallbacks = payload.get("fallbacks")
    key = state().api_key
    return gateway.models.checked_options(TaskOptions(
        model=payload.get("model"), temperature=payload.get("temperature"), max_tokens=payload.get("max_tokens"),
        top_p=payload.get("top_p"), stop=tuple(payload.get("stop") or ()),
        fallbacks=None if fallbacks is None else tuple(fallbacks),
        caller=f"key:{key.id}" if key is not None else f"address:{request.remote_addr}"), key, task)


def cache_control(payload: dict) -> CacheControl:
    """`Cache-Control: no-cache / no-store` headers, or the body's `cache` object, per request."""
    directives = {part.strip().lower() for part in request.headers.get("Cache-Control", "").split(",")}
    body = payload.get("cache") or {}
    return CacheControl(
        read="no-cache" not in directives and not body.get("no_cache", False),
        write="no-store" not in directives and not body.get("no_store", False),
    )


def answer_fields(outcome: TaskOutcome) -> dict:
    """The fields every task answer carries besides its result; the outcome goes on the request state
    for the cost headers and the ledger."""
    state().outcome = outcome
    return outcome_fields(outcome, request_id())


def outcome_fields(outcome: TaskOutcome, answer_id: str) -> dict:
    """An outcome's answer fields (model, usage, cost...) under `answer_id`: a request's id, or a batch item's."""
    return {
        "model": outcome.model_id,
        "provider": outcome.provider,
        "cached": outcome.cached,
        "fallback_used": outcome.fallback_used,
        "usage": {"input_tokens": outcome.input_tokens, "output_tokens": outcome.output_tokens,
                  "total_tokens": outcome.input_tokens + outcome.output_tokens, "source": outcome.token_source},
        "cost": {"currency": "USD", "input": round(outcome.cost.input, 10), "output": round(outcome.cost.output, 10),
                 "total": round(outcome.cost.total, 10), "saved": round(outcome.saved.total, 10)},
        "request_id": answer_id,
    }


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

