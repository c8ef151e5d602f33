"""The OpenAI-compatible provider: OpenAI, and any server speaking its Chat Completions API by base URL.

vLLM, Ollama (``http://localhost:11434/v1``), llama.cpp server, LM Studio and Azure OpenAI all
answer ``POST {base_url}/chat/completions`` with the same JSON and SSE shapes. Local servers
take any non-empty key. Azure OpenAI, either way:

* its v1 API: ``base_url="https://RESOURCE.openai.azure.com/openai/v1"`` and the Azure key as
  ``api_key`` (the model is the deployment name), as Microsoft's examples use the plain OpenAI
  client; ``default_headers={"api-key": KEY}`` if something in between wants Azure's header;
* the classic deployments API: ``base_url="https://RESOURCE.openai.azure.com"`` and
  ``azure_api_version="2024-10-21"``: LangChain's `AzureChatOpenAI` builds the `AzureOpenAI`
  client, which sends ``api-key`` and posts to ``/openai/deployments/{model}/chat/completions``.

Why it looks the way it does:
- LangChain's `ChatOpenAI` builds and configures the `openai` SDK client (key, base URL,
  headers, organisation), once per pool shard, shared by every request. SDK retries are off
  (`max_retries=0`): retrying is `RetryPolicy`'s job, above the provider, which makes ONE attempt.
- The hot path is the SDK client's public `post(path, body=..., cast_to=httpx2.Response)` (the
  SDK's documented way to call an endpoint without its typed models): its auth headers, base
  URL, Azure routing, per-request timeout and `APIStatusError`s, without the pydantic layers.
  Measured with `python -m bench.openai_layers` (CPU per call of the client thread, best of 3 x 300
  calls, the emulator in another process): bare httpx2 1.0 ms, `post` 1.7 ms, `with_raw_response.
  create` 1.9 ms, `chat.completions.create` 2.3 ms, `ChatOpenAI.invoke` 3.3 ms; this provider's
  `complete` (post, deadline transport, reply checks) 1.75 ms. Replies are checked by hand
  (`openai_replies`) instead of by the SDK's models.
- The timeout each call gets is a deadline over the whole exchange, a dripping body or a
  stalled stream included: the SDK runs on httpx2/httpcore2, and `deadline.DeadlineTransport`
  (written for httpx, and taking the httpx module as a parameter) bounds every socket
  operation of a request by the time left when it started.
- One httpx2 pool serialises requests on its lock (the Gemini provider measured it at 200
  calls in flight), so `pool_shards` clients each own a slice of `max_connections` and each
  thread keeps to one of them.
- Every SDK or transport exception becomes a gateway error in `translate_error`, in our words:
  a provider's error text could echo anything, even our key.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import logging
import math
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import httpcore2
import httpx2
import openai
from langchain_openai import AzureChatOpenAI, ChatOpenAI

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
from gateway.providers.base import Chunk, Completion, ProviderRequest
from gateway.providers.deadline import DeadlineTransport, environment_proxy
from gateway.providers.openai_replies import Reply, read_chunk, read_reply

log = logging.getLogger("gateway.openai")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_LONGEST_CALL = 86400.0  # seconds
_ROLES = frozenset({"system", "user", "assistant"})
_BLOCK_REASONS = frozenset({"content_filter"})
_IDENTIFIER = re.compile(r"[\w.\[\]-]{1,64}")  # a provider's error `code` / `param` is passed on only if this plain


class OpenAICompatProvider:
    """The `Provider` protocol over one OpenAI-compatible endpoint (key, base URL, headers)."""

    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        default_headers: Mapping[str, str] | None = None,
        azure_api_version: str | None = None,
        stream_usage: bool = True,
        max_connections: int = 64,
        pool_shards: int = 4,
        verify: bool | ssl.SSLContext = True,
    ):
        """`stream_usage=False` for a server that refuses `stream_options` (usage is then estimated);
        `verify` is httpx's (True, False or an `ssl.SSLContext`)."""
        if not api_key:
            raise ValueError("an OpenAI-compatible provider needs an API key (any non-empty value for local servers)")
        if pool_shards < 1 or max_connections < 1:
            raise ValueError("pool_shards and max_connections must be at least 1")
        self.base_url = base_url or DEFAULT_BASE_URL
        self.stream_usage = stream_usage
        per_shard = max(1, math.ceil(max_connections / pool_shards))
        tls = httpx2.create_ssl_context(verify=verify)  # one context for every shard
        self._http_clients = [self._http_client(per_shard, tls) for _ in range(pool_shards)]
        options = {"api_key": api_key, "max_retries": 0, "default_headers": dict(default_headers or {})}
        if azure_api_version:
            chat_models = [AzureChatOpenAI(azure_endpoint=self.base_url, api_version=azure_api_version,
                                           http_client=http, **options) for http in self._http_clients]
        else:
            chat_models = [ChatOpenAI(base_url=self.base_url, http_client=http, **options)
                           for http in self._http_clients]
        self._clients = [chat_model.root_client for chat_model in chat_models]  # the openai.OpenAI clients
        self._thread_shard = threading.local()
        self._next_shard = itertools.count()

    def _http_client(self, max_connections: int, tls) -> httpx2.Client:
        limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        inner = httpx2.HTTPTransport(verify=tls, limits=limits, proxy=environment_proxy(self.base_url))
        return httpx2.Client(transport=DeadlineTransport(inner, httpx2, httpcore2), follow_redirects=True)

    @property
    def _client(self) -> openai.OpenAI:
        """This thread's SDK client: threads are dealt round the shards as they first call."""
        try:
            return self._thread_shard.client
        except AttributeError:
            client = self._clients[next(self._next_shard) % len(self._clients)]
            self._thread_shard.client = client
            return client

    def complete(self, request: ProviderRequest, seconds_left: float) -> Completion:
        body = self._body(request, stream=False)
        try:
            response = self._client.post("/chat/completions", body=body, cast_to=httpx2.Response,
                                         options={"timeout": _timeout(seconds_left)})
            reply = read_reply(json.loads(response.content))
        except Exception as exc:  # noqa: BLE001 - every provider failure is translated here
            raise translate_error(exc) from exc
        text = _usable_text(reply.text, reply.finish_reason, reply.refusal)
        return Completion(text=text, model=reply.model or request.model, input_tokens=reply.input_tokens,
                          output_tokens=reply.output_tokens, finish_reason=reply.finish_reason)

    def open_stream(self, request: ProviderRequest, seconds_left: float) -> OpenAIChunkStream:
        """Open the stream and read up to its first chunk, so a failure to start is raised here
        (where the retry policy can try again), not half-way through the caller's answer."""
        body = self._body(request, stream=True)
        try:
            response = self._client.post("/chat/completions", body=body, cast_to=httpx2.Response, stream=True,
                                         options={"timeout": _timeout(seconds_left)})
        except Exception as exc:  # noqa: BLE001 - every provider failure is translated here
            raise translate_error(exc) from exc
        return OpenAIChunkStream(response, request.model)

    def close(self) -> None:
        for http in self._http_clients:
            http.close()

    def _body(self, request: ProviderRequest, *, stream: bool) -> dict:
        """The chat.completions request as OpenAI documents it; only the parameters that were set."""
        messages = []
        for message in request.messages:
            if message.role not in _ROLES:
                raise InvalidRequest("a message role must be system, user or assistant", details={"field": "role"})
            messages.append({"role": message.role, "content": message.content})
        body: dict = {"model": request.model, "messages": messages}
        params = request.params
        for name, value in (("temperature", params.temperature), ("max_tokens", params.max_tokens),
                            ("top_p", params.top_p)):
            if value is not None:
                body[name] = value
        if params.stop:
            body["stop"] = list(params.stop)
        if stream:
            body["stream"] = True
            if self.stream_usage:
                body["stream_options"] = {"include_usage": True}
        return body


class OpenAIChunkStream:
    """An open chat.completions stream: iterate for `Chunk`s (text pieces, then the usage chunk).

    Iteration raises only `GatewayError`. The stream ends at ``data: [DONE]``; a stream closed
    before it (and before any `finish_reason`) was cut short: `UpstreamUnavailable`.
    """

    def __init__(self, response: httpx2.Response, model: str):
        self._response, self._model = response, model
        self._chunks = self._read()
        self._first = next(self._chunks, None)

    def __iter__(self) -> Iterator[Chunk]:
        first, self._first = self._first, None
        if first is not None:
            yield first
            yield from self._chunks

    def close(self) -> None:
        """Release the provider's connection now, not when the garbage collector gets to it."""
        self._chunks.close()
        self._response.close()

    def _read(self) -> Iterator[Chunk]:
        """The chunks worth passing on. Those before the first text are held back, so a stream
        with no answer (empty, content filter) fails when it is opened, before any chunk is out."""
        held: list[Chunk] | None = []  # None once text has been seen
        finish_reason, done = None, False
        try:
            for event in httpx2.EventSource(self._response):
                if event.data.startswith("[DONE]"):
                    done = True
                    break
                if not event.data.strip():
                    continue
                reply: Reply = read_chunk(json.loads(event.data))
                finish_reason = reply.finish_reason or finish_reason
                if not (reply.text or reply.finish_reason or reply.input_tokens is not None
                        or reply.output_tokens is not None):
                    continue  # the role chunk, keep-alives
                chunk = Chunk(text=reply.text, model=reply.model or self._model, input_tokens=reply.input_tokens,
                              output_tokens=reply.output_tokens, finish_reason=reply.finish_reason)
                if held is not None and not reply.text.strip():
                    held.append(chunk)
                    continue
                if held is not None:
                    yield from held
                    held = None
                yield chunk
        except GatewayError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failure mid-stream is translated like any other
            raise translate_error(exc) from exc
        finally:
            self._response.close()
        if not done and finish_reason is None:
            raise UpstreamUnavailable("the provider closed the stream before the end of the answer")
        if held is not None:  # no text at all: a blocked or an empty answer
            _usable_text("", finish_reason, refusal=False)


def _timeout(seconds_left: float) -> float:
    """The SDK's per-request timeout: what the deadline transport turns into a deadline.
    At most a day: a socket refuses a timeout of inf or 1e300 (OverflowError)."""
    if not seconds_left > 0:  # also NaN
        raise UpstreamTimeout("no time was left for the provider call")
    return min(seconds_left, _LONGEST_CALL)


def _usable_text(text: str, finish_reason: str | None, refusal: bool) -> str:
    """`text`, unless it is empty: a safety block (content filter, refusal) or a bad answer."""
    if text.strip():
        return text
    if finish_reason in _BLOCK_REASONS or refusal:
        raise ContentBlocked("the provider's safety filter blocked this request",
                             details={"reason": finish_reason or "refusal"})
    raise UpstreamBadAnswer("the model returned an empty answer", details={"finish_reason": finish_reason})


def translate_error(exc: BaseException) -> GatewayError:
    """Map any exception from the openai SDK or httpx2 onto the gateway's errors.

    Messages are our own words; details carry the HTTP status and, when they are plain
    identifiers, the provider's error `code` and `param` ("context_length_exceeded", "temperature")."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, openai.APIStatusError):
        return _from_status(exc)
    if isinstance(exc, (openai.APITimeoutError, httpx2.TimeoutException)):
        return UpstreamTimeout("the provider did not answer in time")
    if isinstance(exc, (openai.APIResponseValidationError, httpx2.SSEError, httpx2.DecodingError,
                        ValueError, RecursionError)):
        # JSON that cannot be read (malformed, a number past Python's 4,300-digit limit, nesting past
        # the recursion limit, bytes that are not UTF-8), a stream that is not SSE or an event over 1 MiB.
        return UpstreamBadAnswer("the provider's reply could not be read")
    if isinstance(exc, (openai.APIConnectionError, httpx2.RequestError)):
        return UpstreamUnavailable("the connection to the provider failed")
    log.error("unexpected provider failure: %s", type(exc).__name__)
    return UpstreamError("the provider call failed unexpectedly")


def _from_status(exc: openai.APIStatusError) -> GatewayError:
    status = exc.status_code
    details: dict = {"provider_status": status}
    for name in ("code", "param"):
        value = getattr(exc, name, None)
        if isinstance(value, str) and _IDENTIFIER.fullmatch(value):
            details[f"provider_{name}"] = value
    if status == 429 and details.get("provider_code") == "insufficient_quota":  # billing: retrying won't help
        return UpstreamRejected("the provider account has no quota left", details=details)
    if status == 429:
        return UpstreamRateLimited("the provider is rate-limiting the gateway; try again later", details=details,
                                   retry_after=retry_after_of(exc.response.headers))
    if status == 408:
        return UpstreamTimeout("the provider did not answer in time", details=details)
    if status >= 500 or status == 409:  # the SDK's own retry list: 409 is a lock timeout on OpenAI's side
        return UpstreamUnavailable(f"the provider failed with HTTP {status}", details=details)
    if status in (401, 403):
        return UpstreamRejected("the provider refused the gateway's credentials", details=details)
    if status == 404:
        return UpstreamRejected("the provider does not know the model or the path", details=details)
    return UpstreamRejected(f"the provider rejected the call with HTTP {status}", details=details)


def retry_after_of(headers: Mapping[str, str], now: Callable[[], float] = time.time) -> float | None:
    """The wait a 429 asks for: `retry-after-ms`, else `retry-after` in seconds or as an HTTP date.

    Only finite, non-negative hints count, clamped to a day (`errors.sane_retry_after`)."""
    millis = headers.get("retry-after-ms")
    if millis and len(millis) <= 32 and (value := sane_retry_after(millis, math.inf)) is not None:
        return sane_retry_after(value / 1000)
    seconds = headers.get("retry-after")
    if not seconds or len(seconds) > 64:
        return None
    if (value := sane_retry_after(seconds)) is not None:
        return value
    try:
        when = email.utils.parsedate_to_datetime(seconds)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return sane_retry_after(max(0.0, when.timestamp() - now())) if when.tzinfo else None
