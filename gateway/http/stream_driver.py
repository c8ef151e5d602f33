"""One streamed answer's life, whatever its wire format: send, account once, stop the upstream.

The task streams (`event: chunk` ... `event: done`, gateway/http/task_routes.py) and OpenAI's
chunks (`data: {...}` ... `data: [DONE]`, gateway/http/openai_routes.py) differ only in how a
piece, the end and a failure are written. What must be the same for both is here, once:

- the ledger row is written exactly once, before the last line leaves;
- a stream that fails mid-way ends with the format's error line, billed for what the provider
  sent until then;
- a client that leaves is recorded as 499 and the provider's stream is closed: seen between
  chunks through waitress's `waitress.client_disconnected` (gateway/serve.py turns on the
  lookahead it needs), or as GeneratorExit at a `yield` under servers that close the iterator;
- a replayed cache hit goes through the same path (its stream is the cached answer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from flask import Response, request, stream_with_context

from gateway.container import Gateway
from gateway.http.request_state import state
from gateway.http.routes import error_payload, request_info
from gateway.tasks.service import CacheControl, OpenStream, TaskOptions, TaskOutcome

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer was complete
# The WSGI environ entry (not an OS variable) waitress sets to a callable: True once the client has closed.
CLIENT_DISCONNECTED = "waitress.client_disconnected"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamFormat(Protocol):
    """How one wire format writes a stream's lines."""

    def opening(self) -> str | None: ...  # sent with the first piece (OpenAI's role chunk), or nothing
    def piece(self, text: str) -> str: ...
    def done(self, outcome: TaskOutcome, overall: float | None) -> str: ...  # after the ledger row
    def failed(self, body: dict, status: int) -> str: ...  # the gateway's error body and status


def client_gone() -> Callable[[], bool] | None:
    """Waitress's "has the client closed?" callable for this request (None under other servers)."""
    return request.environ.get(CLIENT_DISCONNECTED)


def stream_task(gateway: Gateway, task_name: str, inputs: dict, options: TaskOptions, control: CacheControl,
                wire_of: Callable[[OpenStream], StreamFormat]) -> Response:
    """Open the task's stream (a cached answer's replay, or the provider's: failures before its first chunk are
    plain errors) and answer with its lines in the format `wire_of(opened)`; the request is accounted for when
    the stream ends. A client that left while the request waited for a thread costs no provider call (499)."""
    gone = client_gone()
    if gone is not None and gone():
        return Response(status=CLIENT_CLOSED_REQUEST)
    started = time.perf_counter()
    opened = gateway.service.open_stream(task_name, inputs, options, control)
    open_ms = (time.perf_counter() - started) * 1000
    state().streaming = True
    lines = stream_lines(gateway, opened, open_ms, wire_of(opened), gone)
    return Response(stream_with_context(lines), mimetype="text/event-stream",
                    headers={**STREAM_HEADERS, "X-Cached": "true" if opened.cached is not None else "false"})


def stream_lines(gateway: Gateway, opened: OpenStream, open_ms: float, wire: StreamFormat,
                 gone: Callable[[], bool] | None) -> Iterator[str]:
    """The lines of one stream, accounted for exactly once (see the module's docstring)."""
    accounted = False
    stream = opened.stream
    service = gateway.service
    try:
        # The opening goes out with the first piece, not before it: a client that leaves at the first write
        # must find that piece (and its usage) already taken from the provider, and billed.
        opening = wire.opening() or ""
        try:
            for text in stream:
                if gone is not None and gone():
                    break
                yield opening + wire.piece(text)
                opening = ""
            if gone is not None and gone():
                accounted = True
                _account(gateway, CLIENT_CLOSED_REQUEST, service.partial_stream_outcome(opened, open_ms))
                return
            outcome = service.stream_outcome(opened, open_ms)
            status, failure = 200, None
        except Exception as exc:  # noqa: BLE001 - the 200 already went out: the failure becomes the last line
            body, status, _ = error_payload(exc)
            failure = body
            outcome = service.failed_stream_outcome(opened, exc, open_ms)
        accounted = True  # before recording: a failure inside it must not add a second, 499 record
        overall = _account(gateway, status, outcome)
        yield opening + (wire.done(outcome, overall) if failure is None else wire.failed(failure, status))
    except GeneratorExit:
        if not accounted:
            _account(gateway, CLIENT_CLOSED_REQUEST, service.partial_stream_outcome(opened, open_ms))
        raise
    finally:
        stream.close()


def _account(gateway: Gateway, status: int, outcome: TaskOutcome | None) -> float | None:
    elapsed_ms = (time.perf_counter() - state().started) * 1000
    return gateway.finish_request(request_info(), status, elapsed_ms, outcome, is_task=True)
