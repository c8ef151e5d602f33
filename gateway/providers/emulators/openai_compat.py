"""A local stand-in for an OpenAI-compatible Chat Completions API, standard library only.

Why: the OpenAI-compatible provider must be tested, demoed and benchmarked through the real
`openai` SDK and LangChain's `ChatOpenAI` without network, keys or cost, as the Gemini provider
is against `gemini.py` beside this file. This serves the wire protocol on loopback:

* ``POST /v1/chat/completions``: a ``chat.completion`` JSON body, or with ``"stream": true``
  SSE ``data: {chat.completion.chunk}`` events and a final ``data: [DONE]``; with
  ``stream_options.include_usage`` every chunk carries ``"usage": null`` and one last chunk
  with empty ``choices`` carries the usage, as OpenAI sends it.
* ``POST /openai/deployments/{deployment}/chat/completions`` (Azure OpenAI's path; the
  deployment is the model) and ``GET /v1/models``.
* The key: ``Authorization: Bearer <key>`` or Azure's ``api-key`` header; none, or not the
  ``required_key``, is a 401 in OpenAI's error envelope ``{"error": {message, type, param, code}}``.
* Bodies are checked as OpenAI checks them: ``model``, ``messages``, ``temperature`` (0-2),
  ``top_p`` (0-1), ``max_tokens`` / ``max_completion_tokens`` (>= 1), ``stop`` (up to 4):
  a 400 naming the ``param``. ``stop`` and ``max_tokens`` shape the reply (cut at the first stop
  string; over the cap the text is cut and ``finish_reason`` is ``"length"``).

Replies are the Gemini emulator's (same prompt markers, same deterministic code, classification
and text answers) and usage is its four-characters-per-token estimate. The faults, their params,
``inject``/``set_steady_fault``/``clear_faults``/``reset``, ``deliveries``/``wait_delivery`` and the
``/_emulator/*`` control endpoints are the Gemini emulator's too (its module docstring lists them);
what differs is the wire: ``rate_limit`` is a 429 with ``retry-after`` (whole seconds) and
``retry-after-ms`` from ``retry_delay`` (a string is sent verbatim; ``retry_after`` /
``retry_after_ms`` set a header raw, None leaves it out); every error fault takes ``status`` to
answer another code (``permission_denied`` with ``status=401``, ``bad_request`` with 404 or 422)
and ``code`` for the error's ``code`` (``rate_limit`` with ``code="insufficient_quota"``);
``safety_block`` is ``finish_reason: "content_filter"`` with no content; ``error_chunk`` is an
OpenAI error object.

Standalone: ``python -m gateway.providers.emulators.openai_compat --port 8091``.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any
from urllib.parse import urlsplit

from gateway.providers.emulators.gemini import (
    _REPLY_FAULTS,
    _TEXT_FAULTS,
    SLOW_FAULTS,
    GeminiEmulator,
    _chunk,
    _split,
    _sse_event,
    _tokens,
    reply_for_prompt,
    run_standalone,
)
from gateway.providers.emulators.gemini import _Handler as _GeminiHandler
from gateway.providers.emulators.gemini import _Server as _GeminiServer

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "emulator-chat")
_ERRORS = {  # fault -> (HTTP status, error type, error code, message)
    "rate_limit": (429, "requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    "server_error": (500, "server_error", None, "The server had an error while processing your request."),
    "unavailable": (503, "server_error", None, "The engine is currently overloaded, please try again later."),
    "bad_request": (400, "invalid_request_error", None, "The request is not valid."),
    "permission_denied": (403, "invalid_request_error", "permission_denied",
                          "You do not have access to this model."),
}
_CHAT_PATH = re.compile(r"^(?:/v1|/openai/deployments/(?P<deployment>[^/]+))/chat/completions$")
_MODELS_PATH = re.compile(r"^/v1/models$")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_SECRET_HEADERS = frozenset({"authorization", "api-key"})
_BAD_JSON = b'{"choices": [{"delta": <html>Bad Gateway'
_ERROR_OBJECT = {"error": {"message": "The server had an error while processing your request.",
                           "type": "server_error", "param": None, "code": None}}


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of ``{"type": "text", "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _number_problem(body: dict, name: str, low: float, high: float, integer: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        return f"Invalid '{name}': expected {'an integer' if integer else 'a number'} from {low:g} to {high:g}."
    return None


def _body_problem(body: Any, deployment: str | None) -> tuple[str | None, str] | None:
    """(param, message) of the first thing OpenAI would refuse in this body, or None."""
    if not isinstance(body, dict):
        return None, "We could not parse the JSON body of your request."
    model = body.get("model") or deployment  # Azure's path names the deployment; the body may say null
    if not (isinstance(model, str) and model):
        return "model", "You must provide a model parameter."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages", "Invalid 'messages': expected a non-empty array."
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in _ROLES
                and (message.get("content") is None or isinstance(message.get("content"), (str, list)))):
            return f"messages[{index}]", f"Invalid 'messages[{index}]': expected a role and a content."
    for name, low, high, integer in (("temperature", 0, 2, False), ("top_p", 0, 1, False),
                                     ("max_tokens", 1, 10**9, True), ("max_completion_tokens", 1, 10**9, True)):
        if problem := _number_problem(body, name, low, high, integer):
            return name, problem
    stop = body.get("stop")
    if not (stop is None or isinstance(stop, str) or (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))):
        return "stop", "Invalid 'stop': expected a string or an array of up to 4 strings."
    if not isinstance(body.get("stream", False), bool):
        return "stream", "Invalid 'stream': expected a boolean."
    return None


def _shaped(text: str, body: dict) -> tuple[str, str]:
    """(text, finish_reason) after the request's stop strings and token cap, as a model would end."""
    stop = body.get("stop")
    cuts = [text.find(s) for s in ([stop] if isinstance(stop, str) else stop or []) if s and s in text]
    if cuts:
        text = text[:min(cuts)]
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    if cap and _tokens(text) > cap:
        return text[:cap * 4], "length"
    return text, "stop"


def _reply_events(text: str | None, finish: str, *, stream: bool, meta: dict, usage: dict | None,
                  include_usage: bool) -> list[Any]:
    """A chat.completion body, or the chunks of a stream (role first, text pieces, the finish,
    the usage chunk if asked, then [DONE])."""
    if not stream:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return [{**meta, "object": "chat.completion", "choices": [choice], **({"usage": usage} if usage else {})}]

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**meta, "object": "chat.completion.chunk", "choices": [choice],
                **({"usage": None} if include_usage else {})}

    events: list[Any] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in _split(text or "") if piece]
    events.append(chunk({}, finish))
    if include_usage and usage:
        events.append({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    return [*events, b"[DONE]"]


def _retry_headers(params: dict) -> dict[str, str]:
    """retry-after (whole seconds) and retry-after-ms from `retry_delay`, or the raw values given."""
    delay = params.get("retry_delay", 2)
    if isinstance(delay, (int, float)) and math.isfinite(delay):
        seconds, millis = str(math.ceil(delay)), str(round(delay * 1000))
    else:  # a hint as a misbehaving server might send it ("nans", "-1", "inf")
        seconds = millis = str(delay)
    headers = {"retry-after": params.get("retry_after", seconds),
               "retry-after-ms": params.get("retry_after_ms", millis)}
    return {name: str(value) for name, value in headers.items() if value is not None}


class _Handler(_GeminiHandler):
    """The Gemini emulator's connection handling (keep-alive, drip, stall, drop), OpenAI's routes and bodies."""

    server_version = "OpenAIEmulator/1.0"

    def _send_error(self, code: int, kind: str, message: str, details: Any = None,
                    headers: dict[str, str] | None = None) -> None:
        """OpenAI's error envelope, which the SDK maps to BadRequestError, RateLimitError, ...;
        `details` may set its `param` and `code`."""
        error = {"message": message, "type": kind, "param": None, "code": None}
        if isinstance(details, dict):
            error.update(details)
        self._send_json(code, {"error": error}, headers)

    def _dispatch(self) -> None:
        path = re.sub(r"/{2,}", "/", urlsplit(self.path).path)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return self._send_error(411, "invalid_request_error", "Send a Content-Length body.")
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            body = None
        if path.startswith("/_emulator/"):
            return self._control(path, body)
        bearer = self.headers.get("Authorization", "")
        key = bearer[7:].strip() if bearer[:7].lower() == "bearer " else self.headers.get("api-key")
        if self.command == "GET" and _MODELS_PATH.match(path):
            return self._models(key)
        match = _CHAT_PATH.match(path)
        if self.command != "POST" or not match:
            return self._send_error(404, "invalid_request_error", f"Invalid URL ({self.command} {path})")
        self._chat(match["deployment"], path, body, key)

    def _key_refused(self, key: str | None) -> bool:
        """Answer 401 (and say so) when the key is missing or not the required one."""
        emu = self.server.emulator
        if not key:
            self._send_error(401, "invalid_request_error", "You didn't provide an API key.")
        elif emu.required_key is not None and key != emu.required_key:
            self._send_error(401, "invalid_request_error", "Incorrect API key provided.", {"code": "invalid_api_key"})
        else:
            return False
        return True

    def _models(self, key: str | None) -> None:
        if not self._key_refused(key):
            models = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "emulator"}
                      for m in self.server.emulator.models]
            self._send_json(200, {"object": "list", "data": models})

    def _chat(self, deployment: str | None, path: str, body: Any, key: str | None) -> None:
        """Record the call, check key and body, then fail as told or reply."""
        emu = self.server.emulator
        stream = isinstance(body, dict) and body.get("stream") is True
        headers = {name.lower(): value for name, value in self.headers.items() if name.lower() not in _SECRET_HEADERS}
        model = (body.get("model") or deployment) if isinstance(body, dict) else deployment
        number = emu._record({"method": self.command, "path": path, "model": model, "json": body, "stream": stream,
                              "has_key": bool(key), "headers": headers}, key)
        if self._key_refused(key):
            return
        if problem := _body_problem(body, deployment):
            return self._send_error(400, "invalid_request_error", problem[1], {"param": problem[0]})
        messages = body["messages"]
        prompt = "\n".join(_text_of(m.get("content")) for m in messages)
        meta = {"id": f"chatcmpl-emu{number:06d}", "created": int(time.time()),
                "model": model, "system_fingerprint": "fp_emulator"}
        fault, params = emu._next_fault()
        include_usage = stream and (body.get("stream_options") or {}).get("include_usage") is True
        if fault and fault not in _REPLY_FAULTS | _TEXT_FAULTS:
            return self._fail(fault, params, stream, meta, include_usage, _tokens(prompt))
        delay = emu.reply_delay + (float(params.get("seconds", 1)) if fault == "slow" else 0)
        if delay > 0 and emu._stopping.wait(delay):
            return self._drop()  # the emulator is stopping
        users = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
        text = "" if fault == "empty" else str(params.get("text", "")) if fault == "reply" else reply_for_prompt(
            prompt, users[-1] if users else None)
        text, finish = _shaped(text.replace("local Gemini emulator", "local OpenAI-compatible emulator"), body)
        usage = None if fault == "no_usage" else {"prompt_tokens": _tokens(prompt), "completion_tokens": _tokens(text),
                                                   "total_tokens": _tokens(prompt) + _tokens(text)}
        events = _reply_events(text, finish, stream=stream, meta=meta, usage=usage, include_usage=include_usage)
        if fault in _REPLY_FAULTS:
            return self._misbehave(fault, params, stream, events)
        self._send_sse(events) if stream else self._send_json(200, events[0])

    def _misbehave(self, fault: str, params: dict, stream: bool, events: list) -> None:
        """Start a good reply, then go wrong part-way (see the Gemini emulator's docstring)."""
        after = int(params.get("after", 1))
        if stream:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            frames = [_chunk(_sse_event(event)) for event in events]
            if fault in SLOW_FAULTS:
                return self._send_slowly(head, [*frames, b"0\r\n\r\n"], fast=after if fault == "drip" else
                                         min(after, len(frames)), fault=fault, params=params)
            sent = frames[:after]
            if fault == "bad_chunk":
                sent.append(_chunk(_sse_event(_BAD_JSON)))
            elif fault == "error_chunk":
                sent.append(_chunk(_sse_event(_ERROR_OBJECT)))
            self._send(head + b"".join(sent) + (b"" if fault == "cut" else b"0\r\n\r\n"))
            return self._drop() if fault == "cut" else None
        if fault in ("bad_chunk", "error_chunk"):
            return self._send_json(200, _BAD_JSON if fault == "bad_chunk" else _ERROR_OBJECT)
        body = json.dumps(events[0]).encode("utf-8")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        if fault == "cut":
            self._send(head + body[:len(body) // 2])
            return self._drop()
        half = [body[:len(body) // 2], body[len(body) // 2:]]
        self._send_slowly(head, half, fast=0 if fault == "drip" else 1, fault=fault, params=params)

    def _fail(self, fault: str, params: dict, stream: bool, meta: dict, include_usage: bool,
              prompt_tokens: int) -> None:
        """Answer with one of the injected faults instead of a reply."""
        if fault in _ERRORS:
            status, kind, code, message = _ERRORS[fault]
            headers = _retry_headers(params) if fault == "rate_limit" else {}
            return self._send_error(int(params.get("status", status)), kind, message,
                                    {"code": params.get("code", code)}, headers)
        if fault == "hang":  # an Event wait, so stop() wakes it at once
            self.server.emulator._stopping.wait(float(params.get("seconds", 60)))
        if fault in ("hang", "drop"):
            return self._drop()
        if fault == "malformed":
            return self._send_sse([_BAD_JSON]) if stream else self._send_json(200, _BAD_JSON)
        if fault == "raw":
            events = params["events"] if "events" in params else [params.get("body")]
            return self._send_sse(events) if stream else self._send_json(200, events[0])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
        events = _reply_events(None, "content_filter", stream=stream, meta=meta, usage=usage,  # safety_block
                               include_usage=include_usage)
        return self._send_sse(events) if stream else self._send_json(200, events[0])


class _Server(_GeminiServer):
    def finish_request(self, request: Any, client_address: Any) -> None:
        _Handler(request, client_address, self)


class OpenAIEmulator(GeminiEmulator):
    """Loopback OpenAI-compatible server with deterministic replies and injectable faults.

    The public API is the Gemini emulator's (start/stop, context manager, faults, records,
    deliveries); `base_url` ends in ``/v1`` as the openai SDK expects, `root_url` does not
    (Azure's ``azure_endpoint``). `models` is what ``GET /v1/models`` lists (any model is answered).
    """

    server_class = _Server
    thread_name = "openai-emulator"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, reply_delay: float = 0.0,
                 required_key: str | None = None, models: tuple[str, ...] = DEFAULT_MODELS) -> None:
        super().__init__(host, port, reply_delay, required_key)
        self.models = tuple(models)

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:54321``: the server's root (Azure's endpoint)."""
        return super().base_url

    @property
    def base_url(self) -> str:
        """What to pass as the openai SDK's base_url, e.g. ``http://127.0.0.1:54321/v1``."""
        return f"{self.root_url}/v1"


def main(argv: list[str] | None = None) -> None:
    run_standalone(OpenAIEmulator, "OpenAI-compatible", 8091, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
