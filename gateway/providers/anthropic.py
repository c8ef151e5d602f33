"""The Anthropic provider: Claude models through the anthropic SDK client that LangChain builds.

Why it looks the way it does:
- LangChain's `ChatAnthropic` builds and configures the `anthropic.Anthropic` client (key,
  base URL, default headers, `max_retries=0`), once per provider. The client is then given our
  own HTTP client (`with_options(http_client=...)`), whose transport makes each call's timeout
  a deadline over the whole exchange (`httpx2_deadline`): a reply dripped a byte at a time or a
  stream that stalls ends when the time the retry policy gave the call runs out.
- No retries below ours: `max_retries=0`, so one `complete` is one HTTP request.
- The hot path calls the SDK client's public `post(..., cast_to=httpx2.Response)` (its auth,
  headers, timeout and status errors) and reads the JSON itself, rather than
  `ChatAnthropic.invoke` or `messages.create`. Client CPU per call (`python -m
  bench.anthropic_layers`; the emulator in another process; 12 interleaved rounds of 100 calls
  on a busy 2-core machine, min / median): invoke 3.5 / 4.3 ms, messages.create 1.5 / 2.9 ms,
  client.post 1.0 / 1.9 ms, this provider's `complete` (post, deadline transport, checks)
  1.2 / 1.9 ms; streams: the SDK's typed events 2.6 / 3.4 ms, `open_stream` 1.8 / 2.3 ms. The
  typed layer builds objects without validating them, so the reply would need checking anyway:
  checking the raw JSON (`anthropic_replies`) is simpler and cheaper.
- Every SDK or transport exception is translated in `translate_error`, the one place that
  knows Anthropic's errors; what a client is told is in our words, never the SDK's text.

Parameters: `system` messages become the top-level `system` field; `max_tokens` is required by
Anthropic (the constructor's `default_max_tokens` when the request has none); `stop` becomes
`stop_sequences` (whitespace-only ones dropped: Anthropic rejects them); `temperature` is
clamped to Anthropic's 0-1 (the gateway accepts 0-2, and a fallback from a model that took 1.5
should not fail on it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import anthropic
import httpx2
from langchain_anthropic import ChatAnthropic

from gateway.errors import (
    ContentBlocked,
    GatewayError,
    InvalidRequest,
    UpstreamBadAnswer,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    sane_retry_after,
)
from gateway.providers import httpx2_deadline
from gateway.providers.anthropic_replies import Reply, read_event, read_message
from gateway.providers.base import Chunk, Completion, ProviderRequest

log = logging.getLogger("gateway.anthropic")

DEFAULT_BASE_URL = "https://api.anthropic.com"
_BUILD_MODEL = "claude-sonnet-4-5"  # ChatAnthropic needs a model to build; every call names its own
_STATUS_OF_ERROR_TYPE = {  # an `error` event arrives inside a 200 stream: its type says what happened
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
    "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
    "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529,
}
_REFUSALS = frozenset({"refusal"})


class AnthropicProvider:
    """One Anthropic account (key, base URL): `complete` and `open_stream` make one attempt each."""

    name = "anthropic"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        default_max_tokens: int = 1024,
        max_connections: int = 100,
        default_headers: Mapping[str, str] | None = None,
        chat_model_factory: Callable[..., ChatAnthropic] = ChatAnthropic,
    ):
        if not api_key:
            raise ValueError("AnthropicProvider needs an api_key")
        if not 1 <= default_max_tokens <= 10**6:
            raise ValueError("default_max_tokens must be between 1 and 1,000,000")
        self.default_max_tokens = default_max_tokens
        chat_model = chat_model_factory(
            model=_BUILD_MODEL, api_key=api_key, base_url=base_url or DEFAULT_BASE_URL, max_retries=0,
            default_headers=dict(default_headers or {}))
        built = chat_model._client  # private: pinned by test_anthropic_provider.py::test_langchain_builds_the_client
        transport = httpx2_deadline.build_transport(base_url=str(built.base_url), max_connections=max_connections)
        self._http = anthropic.DefaultHttpxClient(transport=transport)
        self.client: anthropic.Anthropic = built.with_options(http_client=self._http, max_retries=0)

    def complete(self, request: ProviderRequest, seconds_left: float) -> Completion:
        """One Messages call, bounded by `seconds_left` from connect to the last body byte."""
        body = self._body(request, seconds_left)
        try:
            response = self.client.post("/v1/messages", body=body, cast_to=httpx2.Response,
                                        options={"timeout": seconds_left})
            reply = read_message(json.loads(response.content))
        except Exception as exc:  # noqa: BLE001 - every provider failure is translated here
            raise translate_error(exc) from exc
        return _completion(reply, request.model)

    def open_stream(self, request: ProviderRequest, seconds_left: float) -> AnthropicStream:
        """Open a stream and read up to its first text, so a failure before any text (an error
        status, an `error` event first) is raised here, where the retry policy can still retry."""
        body = {**self._body(request, seconds_left), "stream": True}
        try:
            response = self.client.post("/v1/messages", body=body, cast_to=httpx2.Response, stream=True,
                                        options={"timeout": seconds_left})
        except Exception as exc:  # noqa: BLE001
            raise translate_error(exc) from exc
        return AnthropicStream(response, request.model).prefetch()

    def close(self) -> None:
        self.client.close()

    def _body(self, request: ProviderRequest, seconds_left: float) -> dict[str, Any]:
        """The Messages request as Anthropic documents it."""
        if seconds_left <= 0:
            raise UpstreamTimeout("the provider call had no time left before it started")
        system = [m.content for m in request.messages if m.role == "system"]
        turns = [{"role": m.role, "content": m.content} for m in request.messages if m.role != "system"]
        if not turns or any(t["role"] not in ("user", "assistant") for t in turns):
            raise InvalidRequest("an Anthropic call needs user or assistant messages (and no other roles)")
        params = request.params
        max_tokens = self.default_max_tokens if params.max_tokens is None else params.max_tokens
        if type(max_tokens) is not int or max_tokens < 1:
            raise InvalidRequest("max_tokens must be a whole number of at least 1", details={"field": "max_tokens"})
        body: dict[str, Any] = {"model": request.model, "max_tokens": max_tokens, "messages": turns}
        if system:
            body["system"] = "\n\n".join(system)
        # Anthropic's newer models (Haiku 4.5, Sonnet 4.5, Opus 4.1 and later) refuse temperature and top_p
        # together; the task always has a temperature, so a request's own top_p is sent in its place.
        if params.top_p is not None:
            body["top_p"] = _fraction(params.top_p, "top_p", 1.0)
        elif params.temperature is not None:
            body["temperature"] = min(_fraction(params.temperature, "temperature", 2.0), 1.0)
        if not all(isinstance(s, str) for s in params.stop):
            raise InvalidRequest("stop must be a list of strings", details={"field": "stop"})
        stops = [s for s in params.stop if s.strip()]
        if stops:
            body["stop_sequences"] = stops
        return body


def _fraction(value: object, field: str, highest: float) -> float:
    """A sampling setting as a float within 0..`highest` (NaN, inf or a string is a clear 400, not a bad body)."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not 0.0 <= number <= highest:  # False for NaN too
        raise InvalidRequest(f"{field} must be a number from 0 to {highest:g}", details={"field": field})
    return float(number)


class AnthropicStream:
    """An open Messages stream: iterate for `Chunk`s (usage counts cumulative, as reported).

    Anthropic reports input tokens in `message_start` and the output count so far in
    `message_delta`; both travel in text-less chunks. Iteration raises GatewayError only."""

    def __init__(self, response: httpx2.Response, model: str):
        self._response, self._model = response, model
        self._chunks = self._read()
        self._ready: list[Chunk] = []

    def prefetch(self) -> AnthropicStream:
        """Read up to the first chunk with text (or the end); on failure release the connection."""
        try:
            for chunk in self._chunks:
                self._ready.append(chunk)
                if chunk.text:
                    break
        except BaseException:
            self.close()
            raise
        return self

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while self._ready:
                yield self._ready.pop(0)
            yield from self._chunks
        finally:
            self.close()

    def close(self) -> None:
        """Release the provider's connection now (the client went away, or the stream ended)."""
        with contextlib.suppress(ValueError):  # "generator already executing" in another thread:
            self._chunks.close()  # closing the response below ends that thread's read instead
        self._response.close()

    def _read(self) -> Iterator[Chunk]:
        has_text, stop_reason, stopped = False, None, False
        try:
            for event in anthropic.Stream.raw_events(self._response):
                if stopped or event.event == "ping" or not event.data:
                    continue  # after message_stop: read to the end, so the connection can be reused
                reply = read_event(json.loads(event.data))
                if reply.kind == "error" or event.event == "error":
                    raise anthropic.APIStatusError("error event in the stream", response=self._response,
                                                   body={"type": "error", "error": {"type": reply.error_type}})
                stopped = reply.kind == "message_stop"
                if reply.kind in ("message_stop", "other"):
                    continue
                has_text = has_text or bool(reply.text)
                stop_reason = reply.stop_reason or stop_reason
                yield Chunk(text=reply.text, model=reply.model, input_tokens=reply.input_tokens,
                            output_tokens=reply.output_tokens, finish_reason=reply.stop_reason)
        except GatewayError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failure mid-stream is translated like any other
            raise translate_error(exc) from exc
        if not stopped:
            raise UpstreamBadAnswer("the provider's stream ended before its message_stop event")
        if not has_text:
            raise _no_text(stop_reason)


def _completion(reply: Reply, model: str) -> Completion:
    """A usable answer from a checked reply: one without text is an error."""
    if not reply.text.strip():
        raise _no_text(reply.stop_reason)
    return Completion(text=reply.text, model=reply.model or model, input_tokens=reply.input_tokens,
                      output_tokens=reply.output_tokens, finish_reason=reply.stop_reason)


def _no_text(stop_reason: str | None) -> GatewayError:
    """A refusal without text is ContentBlocked; any other empty answer a bad one."""
    if stop_reason in _REFUSALS:
        return ContentBlocked("the provider's safety filter blocked this request", details={"reason": stop_reason})
    return UpstreamBadAnswer("the model returned an empty answer", details={"finish_reason": stop_reason})


def translate_error(exc: BaseException) -> GatewayError:
    """Map any exception from the anthropic SDK or its transport onto the gateway's errors.

    Messages and details are our own words (the provider's text could echo anything, our key
    included); the exception chain keeps the original for the logs."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        if not 400 <= status <= 599:  # an `error` event inside a 200 stream
            status = _STATUS_OF_ERROR_TYPE.get(exc.type if isinstance(exc.type, str) else "", 500)
        details: dict[str, Any] = {"provider_status": status}
        if status == 429:
            return UpstreamRateLimited("the provider is rate-limiting the gateway; try again later",
                                       details=details, retry_after=_retry_after(exc.response))
        if status == 408:
            return UpstreamTimeout("the provider did not answer in time", details=details)
        if status >= 500:  # 529 "overloaded" included; a retry hint, if sent, is kept for the policy
            return UpstreamUnavailable(f"the provider failed with HTTP {status}", details=details,
                                       retry_after=_retry_after(exc.response))
        if status in (401, 403):
            return UpstreamRejected("the provider refused the gateway's credentials", details=details)
        if status == 404:
            return UpstreamRejected("the provider does not know the requested model", details=details)
        return UpstreamRejected(f"the provider rejected the call with HTTP {status}", details=details)
    if isinstance(exc, (anthropic.APITimeoutError, httpx2.TimeoutException)):
        return UpstreamTimeout("the provider did not answer in time")
    if isinstance(exc, (anthropic.APIConnectionError, httpx2.TransportError)):
        return UpstreamUnavailable("the connection to the provider failed")
    if isinstance(exc, (ValueError, RecursionError, anthropic.APIResponseValidationError)):
        # JSON that cannot be read: malformed, undecodable, a number past Python's digit limit, too deep.
        return UpstreamBadAnswer("the provider's reply could not be read")
    log.error("unexpected provider failure: %s", type(exc).__name__)
    return UpstreamError("the provider call failed unexpectedly")


def _retry_after(response: httpx2.Response | None) -> float | None:
    """The wait the provider asked for: `retry-after-ms`, else `retry-after` (seconds), if sane."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if not isinstance(value, str) or len(value) > 32:
            continue
        try:
            seconds = sane_retry_after(float(value) / scale)
        except ValueError:
            continue
        if seconds is not None:
            return seconds
    return None
