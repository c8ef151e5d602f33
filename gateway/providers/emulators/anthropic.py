"""A local stand-in for Anthropic's Messages API, standard library only.

Why: like the Gemini emulator beside it, it lets tests, demo mode and benchmarks drive the
*real* anthropic SDK and LangChain's `ChatAnthropic` over loopback HTTP, without network, keys
or cost. It serves ``POST [prefix]/v1/messages`` (plain JSON, or the event stream when
``"stream": true``) and ``POST [prefix]/v1/messages/count_tokens``.

The wire, as Anthropic documents it: the key (in ``x-api-key``, or ``Authorization: Bearer``
as anthropic 2.x sends it) and an ``anthropic-version`` header are required, and so are
``model``, ``max_tokens`` and ``messages`` (roles user/assistant only: ``system`` is a
top-level field); ``temperature`` and ``top_p`` lie in 0-1. A
reply is ``{id, type: "message", role, model, content: [{type: "text", text}], stop_reason,
stop_sequence, usage: {input_tokens, output_tokens}}``; a stream is ``message_start`` (with
``usage.input_tokens``), ``content_block_start``, ``ping``, ``content_block_delta``
(``text_delta``) events, ``content_block_stop``, ``message_delta`` (``stop_reason`` and the
cumulative ``usage.output_tokens``) and ``message_stop``. Errors are
``{"type": "error", "error": {"type": ..., "message": ...}}``. ``stop_sequences`` and
``max_tokens`` are honoured (stop_reason ``stop_sequence`` / ``max_tokens``).

Replies are the Gemini emulator's deterministic ones (`reply_for_prompt`: the task markers
pick a category, a code block or a paragraph), over the system text and every turn.

Faults (``inject()`` one-shot, ``set_steady_fault()`` until ``clear_faults()``, or the
``/_emulator/*`` endpoints), with the Gemini emulator's meaning and parameters:
``rate_limit`` (429 ``rate_limit_error`` with a ``retry-after`` header from ``retry_delay``,
a string sent verbatim), ``overloaded`` (529), ``server_error`` (500 ``api_error``),
``bad_request`` (400), ``auth`` (401), ``permission_denied`` (403), ``not_found`` (404),
``refusal`` (no text, stop_reason ``refusal``), ``hang``, ``slow``, ``drop``, ``malformed``,
``empty``, ``no_usage``, ``drip``, ``pace``, ``cut``, ``bad_chunk``, ``error_chunk`` (an ``error`` event
mid-stream, of ``error_type``, default ``overloaded_error``), ``stall`` and ``raw`` (``body``
as a 200 reply, or ``events``: dicts sent as ``event: <type>`` frames, bytes verbatim).

The fault queue, records, deliveries and lifecycle are the Gemini emulator's (this class
extends it); only the protocol differs. Standalone: ``python -m
gateway.providers.emulators.anthropic --port 8092``.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from gateway.providers.emulators.gemini import (
    SLOW_FAULTS,
    GeminiEmulator,
    _chunk,
    _split,
    _tokens,
    reply_for_prompt,
    run_standalone,
)
from gateway.providers.emulators.gemini import _Handler as _GeminiHandler
from gateway.providers.emulators.gemini import _Server as _GeminiServer

_ERROR_FAULTS = {  # fault -> (HTTP status, Anthropic error type, message)
    "rate_limit": (429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "server_error": (500, "api_error", "Internal server error"),
    "bad_request": (400, "invalid_request_error", "messages: the request is not valid"),
    "auth": (401, "authentication_error", "invalid x-api-key"),
    "permission_denied": (403, "permission_error", "Your API key does not have permission to use this resource."),
    "not_found": (404, "not_found_error", "model: not found"),
}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                500: "api_error", 529: "overloaded_error"}
_REPLY_FAULTS = frozenset({"drip", "pace", "cut", "bad_chunk", "error_chunk", "stall"})  # misbehave while answering
_ANSWER_FAULTS = _REPLY_FAULTS | {"slow", "empty", "no_usage", "refusal"}  # a reply is still built
FAULTS = frozenset(_ERROR_FAULTS) | _ANSWER_FAULTS | {"hang", "drop", "malformed", "raw"}
_MALFORMED = b'{"type": "message", "content": [{"type": "text", <html>Bad Gateway'


# --------------------------------------------------------------------------- the request
def _texts(content: Any) -> list[str]:
    """Text of a message's content: a string, or a list of blocks whose text blocks count."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
    return []


def _number_in(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def check_request(body: Any) -> str | None:
    """What the real API would reject with a 400 (its wording, roughly), or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Field required (an integer of at least 1)"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required"
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            role = message.get("role") if isinstance(message, dict) else None
            return (f"messages.{number}.role: Unexpected role {role!r}. The Messages API accepts a "
                    "top-level `system` parameter, not \"system\" as an input message role.")
        if not isinstance(message.get("content"), (str, list)):
            return f"messages.{number}.content: Field required"
    for name in ("temperature", "top_p"):
        if name in body and not _number_in(body[name], 0, 1):
            return f"{name}: range: 0..1"
    stops = body.get("stop_sequences", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s.strip() for s in stops):
        return "stop_sequences: each must be a string with non-whitespace characters"
    if not isinstance(body.get("system", ""), (str, list)) or not isinstance(body.get("stream", False), bool):
        return "system or stream: wrong type"
    return None


def build_message(body: dict, number: int, fault: str | None) -> dict:
    """The reply to a checked request: deterministic text, cut at a stop sequence or max_tokens."""
    system = _texts(body.get("system"))
    turns = [t for m in body["messages"] for t in _texts(m["content"])]
    users = [m for m in body["messages"] if m["role"] == "user"]
    prompt = "\n".join(system + turns)
    text = "" if fault in ("empty", "refusal") else reply_for_prompt(
        prompt, "\n".join(_texts(users[-1]["content"])) if users else None)
    text = text.replace("local Gemini emulator", "local Anthropic emulator")
    stop_reason, stop_sequence = "refusal" if fault == "refusal" else "end_turn", None
    found = [(text.find(s), s) for s in body.get("stop_sequences", []) if s in text]
    if found:
        at, stop_sequence = min(found)
        text, stop_reason = text[:at], "stop_sequence"
    if _tokens(text) > body["max_tokens"]:
        text, stop_reason, stop_sequence = text[:body["max_tokens"] * 4], "max_tokens", None
    message = {"id": f"msg_emu{number:06d}", "type": "message", "role": "assistant", "model": body["model"],
               "content": [{"type": "text", "text": text}] if text else [],
               "stop_reason": stop_reason, "stop_sequence": stop_sequence,
               "usage": {"input_tokens": _tokens(prompt), "output_tokens": _tokens(text)}}
    if fault == "no_usage":
        del message["usage"]
    return message


def stream_events(message: dict) -> list[dict]:
    """The message as Anthropic streams it; output_tokens in message_delta is cumulative."""
    usage = message.get("usage")
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    if usage:
        start["usage"] = {"input_tokens": usage["input_tokens"], "output_tokens": 1}
    events: list[dict] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message["content"]):
        events += [{"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                   {"type": "ping"}]
        events += [{"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}
                   for piece in _split(block["text"])]
        events.append({"type": "content_block_stop", "index": index})
    delta: dict[str, Any] = {"type": "message_delta", "delta": {
        "stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}}
    if usage:
        delta["usage"] = {"output_tokens": usage["output_tokens"]}
    return [*events, delta, {"type": "message_stop"}]


def _sse(event: Any) -> bytes:
    """One server-sent event named after its type; bytes are a whole frame, sent verbatim."""
    if isinstance(event, bytes):
        return event
    name = event.get("type", "message") if isinstance(event, dict) else "message"
    return b"event: %s\ndata: %s\n\n" % (str(name).encode(), json.dumps(event).encode("utf-8"))


def _key_of(headers: Any) -> str | None:
    """The API key: ``x-api-key``, or a bearer token (anthropic 2.x sends the key that way)."""
    bearer = headers.get("authorization", "")
    return headers.get("x-api-key") or (bearer[7:].strip() if bearer[:7].lower() == "bearer " else None) or None


def _error_body(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


# --------------------------------------------------------------------------- HTTP side
class _Handler(_GeminiHandler):
    """The Gemini emulator's connection handling (keep-alive, drip, stall, drop), Anthropic's wire."""

    server_version = "AnthropicEmulator/1.0"
    _STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    def _send_error(self, code: int, status: str, message: str, details: list | None = None,
                    headers: dict[str, str] | None = None) -> None:
        """Anthropic's error body; the signature is the inherited one (the control endpoints use it)."""
        kind = status if status in _ERROR_TYPES.values() else _ERROR_TYPES.get(code, "api_error")
        self._send_json(code, _error_body(kind, message), headers)

    def _send_sse(self, events: list) -> None:
        self._send(self._STREAM_HEAD + b"".join(_chunk(_sse(e)) for e in events) + b"0\r\n\r\n")

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
        endpoint = path.rstrip("/")  # after any prefix of the base URL
        action = ("count_tokens" if endpoint.endswith("/v1/messages/count_tokens")
                  else "messages" if endpoint.endswith("/v1/messages") else None)
        if self.command != "POST" or action is None:
            return self._send_error(404, "not_found_error", f"Not found: {self.command} {path}")
        self._messages(action, path, body)

    def _messages(self, action: str, path: str, body: Any) -> None:
        """Record the call, check key, version and body, then fail as told or reply."""
        emu, key = self.server.emulator, _key_of(self.headers)
        stream = isinstance(body, dict) and body.get("stream") is True
        number = emu._record({"method": self.command, "path": path, "action": action, "json": body,
                              "model": body.get("model") if isinstance(body, dict) else None,
                              "stream": stream, "has_key": bool(key),
                              "version": self.headers.get("anthropic-version")}, key)
        if not key:
            return self._send_error(401, "authentication_error", "x-api-key header is required")
        if emu.required_key is not None and key != emu.required_key:
            return self._send_error(401, "authentication_error", "invalid x-api-key")
        if not self.headers.get("anthropic-version"):
            return self._send_error(400, "invalid_request_error", "anthropic-version: header is required")
        if action == "count_tokens" and isinstance(body, dict):
            body = {"max_tokens": 1, **body}  # the one field it does not need
        problem = check_request(body)
        if problem:
            return self._send_error(400, "invalid_request_error", problem)
        fault, params = emu._next_fault()
        if fault and fault not in _ANSWER_FAULTS:
            return self._fail(fault, params, stream)
        delay = emu.reply_delay + (float(params.get("seconds", 1)) if fault == "slow" else 0)
        if delay > 0 and emu._stopping.wait(delay):
            return self._drop()  # the emulator is stopping
        message = build_message(body, number, fault)
        if action == "count_tokens":
            return self._send_json(200, {"input_tokens": message.get("usage", {}).get("input_tokens", 0)})
        if fault in _REPLY_FAULTS:
            return self._misbehave(fault, params, stream, message)
        self._send_sse(stream_events(message)) if stream else self._send_json(200, message)

    def _misbehave(self, fault: str, params: dict, stream: bool, message: dict) -> None:
        """Start a good reply, then go wrong part-way (see the Gemini emulator's docstring)."""
        after = int(params.get("after", 1))
        error = _error_body(params.get("error_type", "overloaded_error"), "Overloaded")
        if stream:
            frames = [_chunk(_sse(event)) for event in stream_events(message)]
            if fault in SLOW_FAULTS:
                return self._send_slowly(self._STREAM_HEAD, [*frames, b"0\r\n\r\n"], fast=min(after, len(frames)),
                                         fault=fault, params=params)
            sent = frames[:after]
            if fault == "bad_chunk":
                sent.append(_chunk(b"event: content_block_delta\ndata: {\"type\": <html>Bad Gateway\n\n"))
            elif fault == "error_chunk":
                sent.append(_chunk(_sse(error)))
            self._send(self._STREAM_HEAD + b"".join(sent) + (b"" if fault == "cut" else b"0\r\n\r\n"))
            return self._drop() if fault == "cut" else None
        if fault in ("bad_chunk", "error_chunk"):  # a 200 whose body is not a message
            return self._send_json(200, _MALFORMED if fault == "bad_chunk" else error)
        body = json.dumps(message).encode("utf-8")
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        if fault == "cut":
            self._send(head + body[:len(body) // 2])
            return self._drop()
        half = [body[:len(body) // 2], body[len(body) // 2:]]
        self._send_slowly(head, half, fast=0 if fault == "drip" else 1, fault=fault, params=params)

    def _fail(self, fault: str, params: dict, stream: bool) -> None:
        """Answer with one of the injected faults instead of a reply."""
        if fault in _ERROR_FAULTS:
            code, kind, message = _ERROR_FAULTS[fault]
            headers: dict[str, str] = {}
            if fault == "rate_limit":
                delay = params.get("retry_delay", 2)
                header = delay if isinstance(delay, str) else params.get("retry_after", f"{float(delay):g}")
                headers = {} if header is None else {"retry-after": str(header)}
            return self._send_error(code, kind, message, headers=headers)
        if fault == "hang":  # an Event wait, so stop() wakes it at once
            self.server.emulator._stopping.wait(float(params.get("seconds", 60)))
        if fault in ("hang", "drop"):
            return self._drop()
        if fault == "malformed":
            return self._send_json(200, _MALFORMED)
        events = params["events"] if "events" in params else [params.get("body")]  # raw
        return self._send_sse(events) if stream else self._send_json(200, events[0])


class _Server(_GeminiServer):
    def __init__(self, address: tuple[str, int], emulator: AnthropicEmulator) -> None:
        super().__init__(address, emulator)
        self.RequestHandlerClass = _Handler  # socketserver builds one per connection from this


# --------------------------------------------------------------------------- public API
class AnthropicEmulator(GeminiEmulator):
    """Loopback Anthropic Messages API server with deterministic replies and injectable faults.

    Same public API as `GeminiEmulator` (start/stop, ``with``, base_url, request_count,
    requests, keys_seen, inject/set_steady_fault/clear_faults/reset, stats, deliveries,
    wait_delivery); ``requests`` entries also carry the ``anthropic-version`` sent.
    """

    server_class = _Server
    thread_name = "anthropic-emulator"
    faults = FAULTS


def main(argv: list[str] | None = None) -> None:
    run_standalone(AnthropicEmulator, "Anthropic", 8092, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
