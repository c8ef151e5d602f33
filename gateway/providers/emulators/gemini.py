"""A local stand-in for the Gemini Developer REST API (v1beta), standard library only.

Why: the gateway's tests, demo mode and benchmarks must drive the *real* google-genai
SDK and LangChain client without network, keys or cost. Mocking the SDK would hide the
bugs we care about (URLs, SSE parsing, error mapping, retries, timeouts), so this serves
the wire protocol on loopback: ``POST [prefix]/v1beta/models/{model}:generateContent``,
``:streamGenerateContent`` (always SSE) and ``:countTokens``.

Replies are deterministic and fit each task when prompts use the markers below:

* Classification: a line ``Categories (JSON array): ["a", "b | c"]`` (the first such line)
  and, after it, a line ``Text: ...`` (the text runs to the end of the prompt, so put it
  last). Reply: exactly one category as written (sentiment lexicon, else the first category
  named in the text, else a stable hash).
* Code: a line ``Task: generate code``, optionally ``Language: python`` and
  ``Request: ...`` (runs to the end, so last). Reply: one fenced block; for Python a
  valid function with a docstring, named after the request.
* Prompt processing (``POST /api/v1/process``): a line ``Task: process <type>`` and the text between
  ``-----BEGIN TEXT <boundary>-----`` / ``-----END TEXT <boundary>-----`` lines
  (``process_replies``): JSON for keywords, entities and sentiment, text otherwise.
* Anything else: a short paragraph starting ``Demo reply to: <first words>``.

Faults: ``inject()`` queues one-shot faults, ``set_steady_fault()`` fails every call
until ``clear_faults()``; ``/_emulator/*`` endpoints do the same for other processes.
Besides HTTP errors, hangs, drops and bad bodies, an upstream that misbehaves while it answers:

* ``drip``: the normal reply one byte every ``interval`` s (default 0.5); ``headers=True``
  drips the status line and headers too; a stream sends its first ``after`` chunks at once.
* ``pace``: a good reply whose frames (a stream's chunks; a plain body's two halves) are sent
  ``interval`` s apart (default 0.2), the first ``after`` at once (default 1): an upstream still
  producing while the gateway forwards what it has. It stops when the client closes the connection.
* ``cut``, ``bad_chunk``, ``error_chunk``, ``stall``: a stream sends ``after`` good chunks
  (default 1), then closes mid-stream, sends a chunk that is not JSON, sends an error object,
  or waits ``seconds`` (default 60) and closes. A plain call gets half its body then the close
  (cut) or the wait (stall); bad_chunk is then a malformed body, error_chunk a 200 error object.
* ``rate_limit``: a 429 with RetryInfo and Retry-After from ``retry_delay`` (seconds); a string
  ``retry_delay`` is sent verbatim (``"nans"``), with ``retry_after`` as the raw header if given.
* ``reply``: a normal, well-formed reply whose text is ``text`` (an answer the task cannot use).
* ``raw``: serve ``body`` (any JSON, or bytes sent verbatim) as a 200 reply, or ``events`` as a
  stream's chunks: off-contract replies, lying usage, numbers or nesting no encoder would write.
  With ``status`` (and ``headers``), ``body`` is sent with that status to plain and stream calls
  alike: error bodies that are not Google's envelope (a proxy's ``{"error": "Too Many Requests"}``).

Dripped, paced and stalled replies are recorded in ``deliveries`` (bytes and frames sent of the
total, when the first frame went out, and whether the client closed the connection first);
``wait_delivery()`` returns the next finished one.
Standalone: ``python gateway/providers/emulators/gemini.py --port 8090``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import keyword
import math
import queue
import re
import selectors
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from gateway.providers.emulators.process_replies import process_reply
from gateway.tasks.prompts import (  # the gateway's prompt markers: one definition for both sides
    CATEGORIES_PREFIX,
    CODE_MARKER,
    LANGUAGE_PREFIX,
    REQUEST_PREFIX,
    TEXT_PREFIX,
)

_ERROR_FAULTS = {  # fault -> (HTTP code, Google status, message)
    "rate_limit": (429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    "server_error": (500, "INTERNAL", "An internal error has occurred. Please retry."),
    "unavailable": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    "bad_request": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "permission_denied": (403, "PERMISSION_DENIED", "The caller does not have permission."),
}
_REPLY_FAULTS = frozenset({"drip", "pace", "cut", "bad_chunk", "error_chunk", "stall"})  # misbehave while answering
SLOW_FAULTS = ("drip", "pace", "stall")  # answered through `_send_slowly`
FAULTS = frozenset(_ERROR_FAULTS) | _REPLY_FAULTS | {
    "safety_block", "slow", "hang", "malformed", "drop", "empty", "no_usage", "raw", "reply"}
_TEXT_FAULTS = frozenset({"slow", "empty", "no_usage", "reply"})  # a normal reply is still sent

_SECRET_HEADERS = frozenset({"x-goog-api-key", "authorization"})  # recorded in keys_seen, never with the call
_MODEL_PATH = re.compile(
    r"/v1(?:beta|alpha)?/(?P<model>(?:models|tunedModels)/[^/:]+)"
    r":(?P<action>generateContent|streamGenerateContent|countTokens)$"
)
_POSITIVE = {"amazing", "great", "love", "loved", "excellent", "good", "fantastic", "wonderful",
             "awesome", "happy", "best", "nice", "perfect", "enjoyed", "brilliant"}
_NEGATIVE = {"terrible", "awful", "hate", "hated", "bad", "worst", "horrible", "poor", "broken",
             "disappointing", "disappointed", "useless", "sad", "angry", "slow"}
_NEGATIONS = {"not", "no", "never", "isn't", "wasn't", "don't", "didn't", "doesn't"}
_NAME_STOPWORDS = {"a", "an", "the", "write", "create", "implement", "make", "build", "generate",
                   "please", "python", "function", "code", "that", "which", "to", "for", "of",
                   "me", "program", "script", "method", "given", "takes", "and", "should"}


# --------------------------------------------------------------------------- replies
def _tokens(text: str) -> int:
    """Deterministic token estimate (about four characters per token, like Gemini)."""
    return math.ceil(len(text) / 4)


def _field(prompt: str, prefix: str, to_end: bool = False) -> str | None:
    """Value after the last line starting with ``prefix`` (to the prompt's end if asked)."""
    matches = list(re.finditer(rf"^[ \t]*{re.escape(prefix)}[ \t]*(.*)$", prompt, re.MULTILINE))
    if not matches:
        return None
    last = matches[-1]
    return (prompt[last.start(1):] if to_end else last.group(1)).strip()


def classify(text: str, categories: list[str]) -> str:
    """Pick one category deterministically: lexicon, then name match, then stable hash."""
    lowered = text.lower()
    score, previous = 0, ""
    for word in re.findall(r"[a-z']+", lowered):
        polarity = (word in _POSITIVE) - (word in _NEGATIVE)
        score += -polarity if previous in _NEGATIONS else polarity
        previous = word

    def named(tag: str) -> str | None:
        return next((c for c in categories if tag in c.lower()), None)

    positive, negative = named("positive"), named("negative")
    if positive or negative:  # a sentiment task
        choice = positive if score > 0 else negative if score < 0 else named("neutral")
        if choice:
            return choice
    for category in categories:
        if re.search(rf"(?<!\w){re.escape(category.lower())}(?!\w)", lowered):
            return category
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return categories[int.from_bytes(digest[:8], "big") % len(categories)]


def generate_code(request: str, language: str = "python") -> str:
    """A fenced block; for Python a valid function named after the request's first words."""
    words = [w for w in re.findall(r"[a-z][a-z0-9]*", request.lower())
             if w not in _NAME_STOPWORDS and not keyword.iskeyword(w)]
    name = "_".join(words[:3]) or "solution"
    doc = re.sub(r"[\"\\\s]+", " ", request).strip()[:72].rstrip(".") or "Solve the request"
    lang = (language.strip().split() or ["python"])[0].lower()
    if lang in ("python", "py"):
        body = (f'def {name}(data):\n    """{doc}."""\n'
                "    result = data\n    return result\n")
    else:  # JavaScript-like code is plausible enough for any other language tag
        camel = re.sub(r"_(\w)", lambda m: m.group(1).upper(), name)
        body = f"// {doc}.\nfunction {camel}(data) {{\n  return data;\n}}\n"
    return f"```{lang}\n{body}```"


def text_reply(prompt: str) -> str:
    """A deterministic paragraph that echoes the prompt's first words."""
    words = prompt.split()
    head = " ".join(words[:8]) + (" ..." if len(words) > 8 else "") or "(empty prompt)"
    ref = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return (f"Demo reply to: {head}. This answer comes from the local Gemini emulator, "
            f"so it is deterministic and free. The prompt had {len(words)} words "
            f"(reference {ref}).")


def reply_for_prompt(prompt: str, user_text: str | None = None) -> str:
    """Route a prompt to the process, code, classification or text reply by its markers."""
    processed = process_reply(prompt, classify)
    if processed is not None:
        return processed
    if re.search(rf"^[ \t]*{re.escape(CODE_MARKER)}[ \t]*$", prompt, re.MULTILINE):
        request = _field(prompt, REQUEST_PREFIX, to_end=True)
        if request is None:
            request = re.sub(rf"^[ \t]*({re.escape(CODE_MARKER)}|{LANGUAGE_PREFIX}.*)$", "",
                             prompt, flags=re.MULTILINE)
        return generate_code(request.strip(), _field(prompt, LANGUAGE_PREFIX) or "python")
    categories, text = _classification(prompt)
    if categories:
        return classify(prompt if text is None else text, categories)
    return text_reply(prompt if user_text is None else user_text)


_CATEGORIES_LINE = re.compile(rf"^[ \t]*{re.escape(CATEGORIES_PREFIX)}[ \t]*(.*)$", re.MULTILINE)


def _classification(prompt: str) -> tuple[list[str], str | None]:
    """(categories, text) of a classification prompt, or ([], None).

    The first categories line holds a JSON array; the text is what follows the first ``Text:``
    line after it, so a text that itself contains marker lines cannot change the categories."""
    found = _CATEGORIES_LINE.search(prompt)
    if found is None:
        return [], None
    try:
        categories = json.loads(found.group(1))
    except ValueError:
        return [], None
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        return [], None
    categories = [c for c in categories if c.strip()]
    rest = prompt[found.end():]
    text = re.search(rf"^[ \t]*{re.escape(TEXT_PREFIX)}[ \t]*", rest, re.MULTILINE)
    return categories, None if text is None else rest[text.end():].strip()


def _texts(content: Any) -> list[str]:
    """Text parts of a Content dict (or a list of them, or a bare string)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [t for item in content for t in _texts(item)]
    if isinstance(content, dict):
        return [p["text"] for p in content.get("parts") or []
                if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


# --------------------------------------------------------------------------- HTTP side
def _shutdown(sock: socket.socket) -> None:
    """Really close a socket now (FIN to the peer), even if another thread is reading it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    """Threaded server that knows its emulator and can cut every open connection."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], emulator: GeminiEmulator) -> None:
        self.emulator = emulator
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's socket.getfqdn(), a DNS lookup that can take seconds."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client goes away mid-reply; report real bugs."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down keep-alive and hanging connections so stop() is prompt."""
        with self.connections_lock:
            for conn in list(self.connections):
                _shutdown(conn)


class _Handler(BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive, TCP_NODELAY, no per-request logging."""

    protocol_version = "HTTP/1.1"
    server_version = "GeminiEmulator/1.0"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Without NODELAY a loopback round trip measured 44 ms (Nagle + delayed ACK).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    # -- plumbing
    def _send_json(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, code: int, status: str, message: str, details: list | None = None,
                    headers: dict[str, str] | None = None) -> None:
        """Google's error envelope, which the SDK maps to ClientError/ServerError."""
        error: dict[str, Any] = {"code": code, "message": message, "status": status}
        if details:
            error["details"] = details
        self._send_json(code, {"error": error}, headers)

    def _send_sse(self, events: list[dict]) -> None:
        """Server-sent events in HTTP/1.1 chunked encoding so the connection stays reusable."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            self.wfile.write(_chunk(_sse_event(event)))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _send_slowly(self, head: bytes, frames: list[bytes], *, fast: int, fault: str, params: dict) -> None:
        """Send `head` and the first `fast` frames at once, then the rest as the fault says
        (drip: one byte per `interval`; stall: wait `seconds`, then close), noting how far it got."""
        emu, rest = self.server.emulator, b"".join(frames[fast:])
        delivery = Delivery(fault, total=len(head) + sum(map(len, frames)))
        try:
            if fault == "pace":
                return self._send_paced(head, frames, fast, float(params.get("interval", 0.2)), delivery)
            if fault == "drip" and params.get("headers"):
                rest, head = head + b"".join(frames[:fast]) + rest, b""
            else:
                head += b"".join(frames[:fast])
            delivery.sent = self._send(head)
            if fault == "stall":
                delivery.client_closed = self._wait_for_close(float(params.get("seconds", 60)))
                self._drop()
                return
            interval = float(params.get("interval", 0.5))
            for index in range(len(rest)):
                if (index or head) and self._wait_for_close(interval):
                    delivery.client_closed = True
                    return
                delivery.sent += self._send(rest[index:index + 1])
        except OSError:
            delivery.client_closed = True
        finally:
            self.close_connection = delivery.sent < delivery.total  # a finished drip keeps the connection
            emu._delivered(delivery)

    def _send_paced(self, head: bytes, frames: list[bytes], fast: int, interval: float, delivery: Delivery) -> None:
        """`head` and the first `fast` frames at once, then one frame every `interval` s until the client leaves."""
        delivery.sent = self._send(head + b"".join(frames[:fast]))
        delivery.first_sent_at, delivery.frames_sent = time.perf_counter(), min(fast, len(frames))
        for frame in frames[fast:]:
            if self._wait_for_close(interval):
                delivery.client_closed = True
                return
            delivery.sent += self._send(frame)
            delivery.frames_sent += 1

    def _send(self, data: bytes) -> int:
        self.connection.sendall(data)
        return len(data)

    def _wait_for_close(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as the client closes the connection (or the emulator stops)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.connection, selectors.EVENT_READ)
            if not selector.select(seconds):
                return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _drop(self) -> None:
        """Close the socket without sending a single response byte."""
        self.close_connection = True
        _shutdown(self.connection)

    # -- routing
    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path = re.sub(r"/{2,}", "/", url.path)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return self._send_error(411, "INVALID_ARGUMENT", "Send a Content-Length body.")
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            body = None
        if path.startswith("/_emulator/"):
            return self._control(path, body)
        match = _MODEL_PATH.search(path)
        if self.command != "POST" or not match:
            return self._send_error(404, "NOT_FOUND", f"Method not found: {self.command} {path}")
        key = self.headers.get("x-goog-api-key") or parse_qs(url.query).get("key", [None])[0]
        self._model_call(match["model"].removeprefix("models/"), match["action"], path, body, key, url.query)

    def _control(self, path: str, body: Any) -> None:
        """Fault and config endpoints, so another process can drive the emulator."""
        emu, method = self.server.emulator, self.command
        if body is None or not isinstance(body, dict):
            return self._send_error(400, "INVALID_ARGUMENT", "Body must be a JSON object.")
        try:
            if path == "/_emulator/faults" and method == "POST":
                params = body.get("params") or {}
                if "steady" in body:
                    emu.set_steady_fault(body["steady"], **params)
                else:
                    emu.inject(body.get("fault"), int(body.get("times", 1)), **params)
            elif path == "/_emulator/faults" and method == "DELETE":
                emu.clear_faults()
            elif path == "/_emulator/config" and method == "POST":
                emu.reply_delay = float(body.get("reply_delay", emu.reply_delay))
            elif path == "/_emulator/reset" and method == "POST":
                emu.reset()
            elif path != "/_emulator/stats" or method != "GET":
                return self._send_error(404, "NOT_FOUND", f"Unknown control {method} {path}")
        except (TypeError, ValueError) as exc:
            return self._send_error(400, "INVALID_ARGUMENT", str(exc))
        self._send_json(200, emu.stats())

    def _model_call(self, model: str, action: str, path: str, body: Any, key: str | None, query: str = "") -> None:
        """Record the call (its headers without the key: that goes to `keys_seen`), check key and
        body, then fail as told or reply."""
        emu, stream = self.server.emulator, action == "streamGenerateContent"
        headers = {name.lower(): value for name, value in self.headers.items() if name.lower() not in _SECRET_HEADERS}
        number = emu._record({"method": self.command, "path": path, "query": query, "model": model,
                              "action": action, "json": body, "stream": stream,
                              "has_key": bool(key), "headers": headers}, key)
        if not key:
            return self._send_error(401, "UNAUTHENTICATED", "Method doesn't allow unregistered"
                                    " callers. Please use an API key.")
        if emu.required_key is not None and key != emu.required_key:
            return self._send_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a"
                                    " valid API key.", details=[{
                                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                        "reason": "API_KEY_INVALID", "domain": "googleapis.com"}])
        if not isinstance(body, dict):
            return self._send_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        contents = body.get("contents") or []
        system = _texts(body.get("systemInstruction") or body.get("system_instruction"))
        prompt = "\n".join(system + _texts(contents))
        meta = {"modelVersion": model, "responseId": f"emu-{number:06d}"}
        fault, params = emu._next_fault()
        if fault and fault not in _REPLY_FAULTS | _TEXT_FAULTS:
            return self._fail(fault, params, stream, _tokens(prompt), meta)
        delay = emu.reply_delay + (float(params.get("seconds", 1)) if fault == "slow" else 0)
        if delay > 0 and emu._stopping.wait(delay):
            return self._drop()  # the emulator is stopping
        if action == "countTokens":
            return self._send_json(200, {"totalTokens": _tokens(prompt)})
        user_turns = [c for c in contents if not isinstance(c, dict) or c.get("role") != "model"]
        text = "" if fault == "empty" else str(params.get("text", "")) if fault == "reply" else reply_for_prompt(
            prompt, "\n".join(_texts(user_turns[-1:])))
        events = _reply_events(text, stream, _tokens(prompt), meta, with_usage=fault != "no_usage")
        if fault in _REPLY_FAULTS:
            return self._misbehave(fault, params, stream, events)
        self._send_sse(events) if stream else self._send_json(200, events[0])

    def _misbehave(self, fault: str, params: dict, stream: bool, events: list[dict]) -> None:
        """Start a good reply, then go wrong part-way (see the module docstring)."""
        after = int(params.get("after", 1))
        if stream:
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
            frames = [_chunk(_sse_event(event)) for event in events]
            if fault in SLOW_FAULTS:
                return self._send_slowly(head, [*frames, b"0\r\n\r\n"], fast=after if fault == "drip" else
                                         min(after, len(frames)), fault=fault, params=params)
            sent = [*frames[:after]]
            if fault == "bad_chunk":
                sent.append(_chunk(b'data: {"candidates": [{"content": <html>Bad Gateway\r\n\r\n'))
            elif fault == "error_chunk":
                error = {"error": {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}}
                sent.append(_chunk(_sse_event(error)))
            if fault != "cut":
                sent.append(b"0\r\n\r\n")
            self._send(head + b"".join(sent))
            if fault == "cut":
                self._drop()
            return
        if fault == "bad_chunk":
            return self._send_json(200, b'{"candidates": [{"content": <html>Bad Gateway')
        if fault == "error_chunk":
            return self._send_json(200, {"error": {"code": 500, "message": "An internal error has occurred.",
                                                   "status": "INTERNAL"}})
        body = json.dumps(events[0]).encode("utf-8")
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=UTF-8\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        if fault == "cut":
            self._send(head + body[:len(body) // 2])
            return self._drop()
        half = [body[:len(body) // 2], body[len(body) // 2:]]
        self._send_slowly(head, half, fast=0 if fault == "drip" else 1, fault=fault, params=params)

    def _fail(self, fault: str, params: dict, stream: bool, prompt_tokens: int,
              meta: dict) -> None:
        """Answer with one of the injected faults instead of a reply."""
        if fault in _ERROR_FAULTS:
            code, status, message = _ERROR_FAULTS[fault]
            if fault != "rate_limit":
                return self._send_error(code, status, message)
            delay = params.get("retry_delay", 2)
            if isinstance(delay, str):  # a raw hint, as a misbehaving provider might send it ("nans")
                delay_text, header = delay, params.get("retry_after")
            else:
                delay_text, header = f"{float(delay):g}s", params.get("retry_after", str(math.ceil(delay)))
            return self._send_error(code, status, message, details=[
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay_text}
            ], headers={} if header is None else {"Retry-After": str(header)})
        if fault == "hang":  # an Event wait, so stop() wakes it at once
            self.server.emulator._stopping.wait(float(params.get("seconds", 60)))
        if fault in ("hang", "drop"):
            return self._drop()
        if fault == "malformed":
            return self._send_json(200, b'{"candidates": [{"content": <html>Bad Gateway')
        if fault == "raw":
            if "status" in params:
                return self._send_json(int(params["status"]), params.get("body"), params.get("headers"))
            events = params["events"] if "events" in params else [params.get("body")]
            return self._send_sse(events) if stream else self._send_json(200, events[0])
        usage = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
        blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage, **meta}
        return self._send_sse([blocked]) if stream else self._send_json(200, blocked)


def _reply_events(text: str, stream: bool, prompt_tokens: int, meta: dict, with_usage: bool = True) -> list[dict]:
    """A normal reply: one JSON body, or several SSE chunks with cumulative usage (unless `with_usage`
    is off: the "no_usage" fault, a reply that reports no token counts)."""
    pieces = _split(text) if stream else [text]
    events, so_far = [], ""
    for number, piece in enumerate(pieces, 1):
        so_far += piece
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}
        if number == len(pieces):
            candidate["finishReason"] = "STOP"
        reply_tokens = _tokens(so_far)  # cumulative, as Gemini reports while streaming
        usage = {"usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": reply_tokens,
                                   "totalTokenCount": prompt_tokens + reply_tokens}} if with_usage else {}
        events.append({"candidates": [candidate], **usage, **meta})
    return events


def _sse_event(event: Any) -> bytes:
    """One event; bytes are sent verbatim (JSON that Python's own encoder would not write)."""
    return b"data: " + (event if isinstance(event, bytes) else json.dumps(event).encode("utf-8")) + b"\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of a chunked body."""
    return b"%X\r\n%s\r\n" % (len(data), data)


def _split(text: str, pieces: int = 4) -> list[str]:
    """Split a reply into a few stream chunks (by words, or characters if too short)."""
    tokens = re.findall(r"\s*\S+\s*$|\s*\S+", text) if len(text.split()) >= pieces else list(text)
    if not tokens:
        return [text]
    size = math.ceil(len(tokens) / pieces)
    return ["".join(tokens[i:i + size]) for i in range(0, len(tokens), size)]


# --------------------------------------------------------------------------- public API
@dataclasses.dataclass
class Delivery:
    """How far a dripped, paced or stalled reply got: bytes `sent` of `total`, and whether the client hung up;
    for `pace`, the frames sent and when the first went out (`time.perf_counter()`, for time-to-first-byte)."""

    fault: str
    total: int
    sent: int = 0
    client_closed: bool = False
    frames_sent: int = 0
    first_sent_at: float | None = None


class GeminiEmulator:
    """Loopback Gemini API server with deterministic replies and injectable faults.

    ``start()`` returns self; ``with GeminiEmulator() as emu:`` starts it on entry if
    needed (so ``with GeminiEmulator().start() as emu:`` works too) and stops on exit.
    The other providers' emulators subclass it and set the three class attributes below.
    """

    server_class: type = _Server  # the HTTP server (its handler speaks the wire protocol)
    thread_name = "gemini-emulator"
    faults: frozenset[str] = FAULTS  # what inject() and set_steady_fault() accept

    def __init__(self, host: str = "127.0.0.1", port: int = 0, reply_delay: float = 0.0,
                 required_key: str | None = None) -> None:
        self.host = host
        self.required_key = required_key
        self.reply_delay = self._initial_delay = float(reply_delay)
        self.requests: list[dict[str, Any]] = []
        self.keys_seen: list[str] = []  # kept for assertions; never printed or served
        self._port = port
        self._lock = threading.Lock()
        self._count = 0
        self._faults: deque[tuple[str, dict]] = deque()
        self._steady: tuple[str, dict] | None = None
        self._stopping = threading.Event()
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, running={self._server is not None})"

    @property
    def port(self) -> int:
        """The bound port (the real one after start() with port=0)."""
        return self._port

    @property
    def base_url(self) -> str:
        """What to pass as the SDK's base_url, e.g. ``http://127.0.0.1:54321``."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self._port}"

    @property
    def request_count(self) -> int:
        """Model calls received, failed ones included (control calls excluded)."""
        with self._lock:
            return self._count

    def start(self) -> Self:
        """Bind (port 0 picks a free port) and serve from a daemon thread."""
        if self._server is None:
            self._stopping = threading.Event()
            self._server = self.server_class((self.host, self._port), self)
            self._port = self._server.server_address[1]
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name=f"{self.thread_name}-{self._port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake hanging/slow requests and close open connections."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- faults
    def inject(self, fault: str, times: int = 1, **params: Any) -> None:
        """Fail the next ``times`` model calls with ``fault`` (queued after earlier ones)."""
        self._check_fault(fault)
        with self._lock:
            self._faults.extend((fault, dict(params)) for _ in range(times))

    def set_steady_fault(self, fault: str, **params: Any) -> None:
        """Fail every model call with ``fault`` until clear_faults(); wins over the queue."""
        self._check_fault(fault)
        with self._lock:
            self._steady = (fault, dict(params))

    def _check_fault(self, fault: Any) -> None:
        if fault not in self.faults:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(self.faults)}")

    def clear_faults(self) -> None:
        """Drop queued and steady faults."""
        with self._lock:
            self._faults.clear()
            self._steady = None

    def reset(self) -> None:
        """Clear records, counters, faults and restore the constructor's reply_delay."""
        with self._lock:
            self.requests.clear()
            self.keys_seen.clear()
            self._count = 0
            self._faults.clear()
            self._steady = None
            self.reply_delay = self._initial_delay
            self.deliveries = queue.Queue()

    def stats(self) -> dict[str, Any]:
        """Counters for the /_emulator/stats endpoint (no keys, no bodies)."""
        with self._lock:
            return {"request_count": self._count, "queued_faults": len(self._faults),
                    "steady_fault": self._steady[0] if self._steady else None,
                    "reply_delay": self.reply_delay}

    def wait_delivery(self, timeout: float = 10.0) -> Delivery:
        """The next dripped or stalled reply to finish (the client hung up, or it was all sent)."""
        return self.deliveries.get(timeout=timeout)

    def _delivered(self, delivery: Delivery) -> None:
        self.deliveries.put(delivery)

    def _record(self, entry: dict[str, Any], key: str | None) -> int:
        with self._lock:
            self._count += 1
            self.requests.append(entry)
            if key:
                self.keys_seen.append(key)
            return self._count

    def _next_fault(self) -> tuple[str | None, dict]:
        with self._lock:
            if self._steady:
                return self._steady
            return self._faults.popleft() if self._faults else (None, {})


def run_standalone(emulator_class, label: str, default_port: int, description: str,
                   argv: list[str] | None = None) -> None:
    """Run an emulator standalone until Ctrl+C (demo mode, benchmarks, manual poking)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to each reply")
    args = parser.parse_args(argv)
    emulator = emulator_class(args.host, args.port, reply_delay=args.delay).start()
    print(f"{label} emulator listening on {emulator.base_url}", flush=True)
    try:
        while not emulator._stopping.wait(0.5):  # a timed wait lets Ctrl+C through on Windows
            pass
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()


def main(argv: list[str] | None = None) -> None:
    run_standalone(GeminiEmulator, "Gemini", 8090, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
