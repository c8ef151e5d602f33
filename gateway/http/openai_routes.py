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

from flask import Blueprint, jsonify, request

from gateway.auth.guard import model_allowed
from gateway.container import Gateway
from gateway.errors import InvalidRequest, ModelNotFound
from gateway.http import openai_wire as wire
from gateway.http import stream_driver
from gateway.http.request_state import state
from gateway.http.routes import error_payload, json_body, request_id
from gateway.http.task_routes import cache_control
from gateway.tasks.service import TaskOptions, TaskOutcome

PREFIX = wire.PREFIX
CHAT_PATH = f"{PREFIX}/chat/completions"
CHAT_TASK = "chat"


is_openai_path = wire.is_openai_path


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
            raise _no_such_model(chat.model)
        inputs = {"messages": chat.messages}
        current.prompt = "\n".join(content for _role, content in chat.messages)
        key = current.api_key
        try:
            options = gateway.models.checked_options(TaskOptions(
                model=chat.model, temperature=chat.temperature, max_tokens=chat.max_tokens, top_p=chat.top_p,
                stop=chat.stop, caller=f"key:{key.id}" if key is not None else f"address:{request.remote_addr}"),
                key, "text")
        except InvalidRequest as exc:  # the catalog names the gateway's field; OpenAI's `param` is the client's
            raise _renamed(exc, "max_tokens", chat.max_tokens_field) from None
        current.model = options.model
        completion_id, created = f"chatcmpl-{request_id()}", int(time.time())
        control = cache_control({})
        if chat.stream:
            return stream_driver.stream_task(
                gateway, CHAT_TASK, inputs, options, control,
                lambda opened: ChatChunks(completion_id, created, opened.model_id, chat.include_usage))
        outcome = gateway.service.run(CHAT_TASK, inputs, options, control)
        current.outcome = outcome  # cost headers and the ledger row, in app.py's after_request
        return jsonify(wire.completion_body(completion_id, created, outcome.model_id, outcome.completion.text,
                                            outcome.completion.finish_reason, outcome.input_tokens,
                                            outcome.output_tokens))

    @bp.get("/models")
    @listing_limit
    def models():
        """The registry's models this key may use (its allowed_models), as OpenAI lists models."""
        key = state().api_key
        allowed = [spec for spec in gateway.registry if model_allowed(key, spec)]
        created = _started_at(gateway)
        return jsonify({"object": "list", "data": [_model_object(spec, created) for spec in allowed]})

    @bp.get("/models/<path:model_id>")
    @listing_limit
    def model(model_id: str):
        """One model as OpenAI describes it (the SDK's `models.retrieve`); 404 unless this key may use it."""
        spec = gateway.registry.find(model_id)
        if spec is None or not model_allowed(state().api_key, spec):
            raise _no_such_model(model_id)  # another key's model is as absent as an unknown one
        return jsonify(_model_object(spec, _started_at(gateway)))

    return bp


def _started_at(gateway: Gateway) -> int:
    """When this gateway started (Unix seconds): the `created` of every model it lists."""
    return int(time.time() - (time.monotonic() - gateway.started_at))


def _model_object(spec, created: int) -> dict:
    return {"id": spec.id, "object": "model", "created": created, "owned_by": spec.provider}


def _no_such_model(name: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{name[:128]}' does not exist on this gateway (GET /v1/models lists them)",
                         details={"model": name[:128]})


def _renamed(exc: InvalidRequest, field: str, client_field: str) -> InvalidRequest:
    fields = exc.details.get("fields") or {}
    if field == client_field or field not in fields:
        return exc
    reason = fields[field]
    return InvalidRequest(f"Invalid input: '{client_field}' {reason}", details={"fields": {client_field: reason}})


class ChatChunks:
    """OpenAI's stream format: `data:` lines of `chat.completion.chunk` (the role, the content deltas, the finish
    reason, the usage when the client asked for it), then `data: [DONE]`; a failure mid-stream is one
    `{"error": ...}` line (OpenAI's SDK raises it). gateway/http/stream_driver.py runs the stream."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool):
        self.completion_id, self.created, self.model, self.include_usage = completion_id, created, model, include_usage

    def opening(self) -> str:
        return self._line({"role": "assistant", "content": ""})

    def piece(self, text: str) -> str:
        return self._line({"content": text})

    def done(self, outcome: TaskOutcome, overall: float | None) -> str:
        lines = [self._line({}, wire.finish_reason(outcome.completion.finish_reason))]
        if self.include_usage:
            lines.append(self._line(None, usage_of=wire.usage(outcome.input_tokens, outcome.output_tokens)))
        return "".join(lines) + "data: [DONE]\n\n"

    def failed(self, body: dict, status: int) -> str:
        return _data(wire.error_body(body, status))

    def _line(self, delta: dict | None, reason: str | None = None, usage_of: dict | None = None) -> str:
        return _data(wire.chunk(self.completion_id, self.created, self.model, delta, reason,
                                with_usage=self.include_usage, usage_of=usage_of))


def _data(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
