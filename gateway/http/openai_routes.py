"""The OpenAI-compatible surface: `POST /v1/chat/completions` and `GET /v1/models`, for tools that speak OpenAI.

A plain Flask blueprint outside `/api/v1` (the OpenAI SDKs and LangChain's `ChatOpenAI` append
`/chat/completions` to their base URL). A chat request is the `chat` task of `TaskService`
(gateway/tasks/table.py: a text task whose input is the whole conversation), so it goes through the
same authentication, per-key limits and budget (its path is in `guard.TASK_OF_PATH`), cache and single
flight, retries, fallbacks (FALLBACKS_TEXT), ledger, logs and cost headers as `/api/v1/generate/text`.
Only the wire format differs (`openai_wire.py`), errors included: `openai_error` is what `app.py`'s
error handler answers on these paths.
"""

from __future__ import annotations

import json
import time

from flask import Blueprint, Response, jsonify, request, stream_with_context

from gateway.auth.guard import model_allowed
from gateway.container import Gateway
from gateway.errors import ModelNotFound
from gateway.http import openai_wire as wire
from gateway.http.request_state import state
from gateway.http.routes import error_payload, json_body, request_id, request_info
from gateway.http.task_routes import CLIENT_CLOSED_REQUEST, cache_control
from gateway.tasks.service import CacheControl, OpenStream, TaskOptions

PREFIX = "/v1"
CHAT_PATH = f"{PREFIX}/chat/completions"
CHAT_TASK = "chat"


def is_openai_path(path: str) -> bool:
    return path == PREFIX or path.startswith(f"{PREFIX}/")


def openai_error(exc: BaseException):
    """(body, status, headers) of any failure on `/v1`, in OpenAI's error format (the gateway's statuses)."""
    body, status, headers = error_payload(exc)
    return wire.error_body(body, status), status, headers


def blueprint(gateway: Gateway, task_limit, listing_limit) -> Blueprint:
    """The `/v1` routes; `task_limit` is the task endpoints' rate limit, `listing_limit` the model listing's."""
    bp = Blueprint("openai", __name__, url_prefix=PREFIX)

    @bp.post("/chat/completions")
    @task_limit
    def chat_completions():
        """One chat completion, whole or streamed, in OpenAI's wire format."""
        chat = wire.read_chat_request(json_body(), gateway.config.request_max_prompt_chars)
        current = state()
        current.model = gateway.service.default_model
        if gateway.registry.find(chat.model) is None:
            raise ModelNotFound(f"The model '{chat.model[:128]}' does not exist on this gateway (GET /v1/models "
                                "lists them)", details={"model": chat.model[:128]})
        inputs = {"messages": chat.messages}
        current.prompt = "\n".join(content for _role, content in chat.messages)
        key = current.api_key
        options = gateway.models.checked_options(TaskOptions(
            model=chat.model, temperature=chat.temperature, max_tokens=chat.max_tokens, top_p=chat.top_p,
            stop=chat.stop, caller=f"key:{key.id}" if key is not None else f"address:{request.remote_addr}"),
            key, "text")
        current.model = options.model
        completion_id, created = f"chatcmpl-{request_id()}", int(time.time())
        if chat.stream:
            started = time.perf_counter()
            # failures here: plain error answers. /v1 streams stay out of the cache (the task streams use it)
            opened = gateway.service.open_stream(CHAT_TASK, inputs, options, CacheControl(read=False, write=False))
            current.streaming = True
            events = _chunks(gateway, opened, (time.perf_counter() - started) * 1000, completion_id, created,
                             chat.include_usage)
            return Response(stream_with_context(events), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        outcome = gateway.service.run(CHAT_TASK, inputs, options, cache_control({}))
        current.outcome = outcome  # cost headers and the ledger row, in app.py's after_request
        return jsonify(wire.completion_body(completion_id, created, outcome.model_id, outcome.completion.text,
                                            outcome.completion.finish_reason, outcome.input_tokens,
                                            outcome.output_tokens))

    @bp.get("/models")
    @listing_limit
    def models():
        """The registry's models this key may use (its allowed_models), as OpenAI lists models."""
        key = state().api_key
        created = int(time.time() - (time.monotonic() - gateway.started_at))  # when this gateway started
        allowed = [spec for spec in gateway.registry if model_allowed(key, spec)]
        return jsonify({"object": "list", "data": [
            {"id": spec.id, "object": "model", "created": created, "owned_by": spec.provider} for spec in allowed]})

    return bp


def _chunks(gateway: Gateway, opened: OpenStream, open_ms: float, completion_id: str, created: int,
            include_usage: bool):
    """The SSE lines of one streamed answer: the role, the content deltas, the finish reason, the usage (when asked),
    then `[DONE]`. The ledger row is written before the last chunk; a failure mid-stream ends with one
    `{"error": ...}` line (OpenAI's SDK raises it), a client that leaves is recorded as 499 (task_routes.py's rules)."""
    accounted = False
    stream = opened.stream
    model = opened.model_id

    def line(delta, reason=None, usage_of=None):
        body = wire.chunk(completion_id, created, model, delta, reason, with_usage=include_usage, usage_of=usage_of)
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    try:
        yield line({"role": "assistant", "content": ""})
        try:
            for text in stream:
                yield line({"content": text})
            status, outcome = 200, gateway.service.stream_outcome(opened, open_ms)
            final = [line({}, wire.finish_reason(outcome.completion.finish_reason))]
            if include_usage:
                final.append(line(None, usage_of=wire.usage(outcome.input_tokens, outcome.output_tokens)))
            final.append("data: [DONE]\n\n")
        except Exception as exc:  # noqa: BLE001 - the 200 already went out: the failure becomes the last line
            body, status, _ = error_payload(exc)
            final = [f"data: {json.dumps(wire.error_body(body, status), separators=(',', ':'))}\n\n"]
            outcome = gateway.service.failed_stream_outcome(opened, exc, open_ms)
        accounted = True  # before recording: a failure inside it must not add a second, 499 record
        _account(gateway, status, outcome)
        yield "".join(final)
    except GeneratorExit:
        if not accounted:
            _account(gateway, CLIENT_CLOSED_REQUEST, gateway.service.partial_stream_outcome(opened, open_ms))
        raise
    finally:
        stream.close()


def _account(gateway: Gateway, status: int, outcome) -> None:
    elapsed_ms = (time.perf_counter() - state().started) * 1000
    gateway.finish_request(request_info(), status, elapsed_ms, outcome, is_task=True)
