"""The three LLM tasks over Google Gemini, through LangChain's `ChatGoogleGenerativeAI`.

Why it looks the way it does:
- `GEMINI_POOL_SHARDS` `ChatGoogleGenerativeAI` instances, built once at start and shared by
  every request: LangChain builds and configures the google-genai SDK client (key, base URL,
  headers) and its HTTP connection pool. Building one per call (as the original snippets did)
  costs a TLS handshake and several milliseconds each time. Each task has a prebuilt generation
  config with its temperature (text 0.7, code 0.2, classify 0.0); calls send the SDK's own
  prebuilt request through its transport (`gemini_transport`; see `complete` for the measured reason).
- No retries below ours: the transport is called without retry options (and a client configured
  with them is refused at start), so neither the SDK nor LangChain (whose default of 6 attempts,
  stacked under ours, would turn one request into up to 30 HTTP calls) retries. Retrying is
  `retry_policy.RetryPolicy`'s job, with a deadline over the whole call.
- The timeout each call gets is a deadline over the whole HTTP exchange, body and stream
  included: the shards' httpx clients send through `upstream_deadline.DeadlineTransport`.
- Every reply and stream chunk is checked before use (`gemini_replies`): off-contract shapes
  are a 502, unbelievable token counts are replaced by our estimate.
- Every SDK or transport exception is translated into the gateway's own types in
  `translate_provider_error`, the one place that knows what the provider's errors look like;
  what a client is told is in our words, never a library's.

The module-level `generate_text`, `generate_code` and `classify_text` are the functions the
user's design names; they use a client built lazily from the environment on first use.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

import certifi
from google.genai import errors as genai_errors
from langchain_google_genai import ChatGoogleGenerativeAI

from gateway.config import Config
from gateway.errors import (
    ContentBlocked,
    GatewayError,
    UpstreamBadAnswer,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    sane_retry_after,
)
from gateway.providers import deadline as upstream_deadline
from gateway.providers.base import (
    BLOCKED_FINISH_REASONS,
    Chunk,
    ChunkStream,
    Completion,
    GenerationParams,
    Message,
    ProviderRequest,
    TextStream,
)
from gateway.providers.gemini_replies import Reply, read_reply
from gateway.providers.gemini_transport import GeminiTransport, milliseconds
from gateway.providers.retry_policy import RetryPolicy
from gateway.providers.router import ModelRoute, ModelRouter
from gateway.tasks.table import TASKS

log = logging.getLogger("gateway.gemini")

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"  # the SDK's, when none is configured
_RATE_LIMIT_WORDS = re.compile(r"rate.?limit|quota exceeded|resource.?exhausted|too many requests", re.I)


def _transport_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(timeout, connection, unreadable body) exception classes of whichever httpx the SDK runs on.

    An unreadable body is a bad encoding, or a reply over `deadline.MAX_REPLY_BYTES` or compressed."""
    timeouts, connections, decoding = [], [], []
    for name in ("httpx", "httpx2"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        timeouts.append(module.TimeoutException)
        connections.append(module.TransportError)
        decoding.append(module.DecodingError)
    return tuple(timeouts), tuple(connections), tuple(decoding)


_TIMEOUT_ERRORS, _CONNECTION_ERRORS, _DECODING_ERRORS = _transport_errors()


class GeminiProvider:
    """The Gemini provider (`gateway.providers.base.Provider`): one key and base URL, any Gemini model.

    One attempt per call; the retry policy, fallbacks and circuit breaker above it decide what
    happens after a failure (`gateway.providers.router`)."""

    name = "gemini"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        max_connections: int = 256,
        pool_shards: int = 8,
        model: str = "gemini-2.0-flash",
        chat_model_factory: Callable[..., ChatGoogleGenerativeAI] = ChatGoogleGenerativeAI,
    ):
        # One httpx pool serialises every request and response on one lock, and scans all its
        # connections under it: with 200 calls in flight, threads spent most of their time waiting
        # there (py-spy). `pool_shards` clients each own a slice of `max_connections`, and each
        # server thread keeps to one of them. They share one TLS context.
        # Each shard's httpx client sends through an `upstream_deadline.DeadlineTransport`, so the
        # timeout we give a call is a deadline over the whole exchange, body and stream included.
        per_shard = max(1, math.ceil(max_connections / pool_shards))
        tls = _tls_context()
        options = {"model": model, "google_api_key": api_key}
        if base_url:
            options["base_url"] = base_url
        # LangChain builds and configures the SDK clients (key, base URL, headers); calls send the
        # SDK's prebuilt requests through their transports, with our bodies and timeouts (`complete`).
        self.chat_models = []
        for _ in range(pool_shards):
            transport = upstream_deadline.build_transport(base_url=base_url or DEFAULT_BASE_URL,
                                                          max_connections=per_shard, verify=tls)
            # No redirects (the SDK follows them by default): httpx drops only Authorization on a redirect
            # to another origin, so our x-goog-api-key would go to whichever host a Location names.
            chat_model = chat_model_factory(**options, client_args={"transport": transport, "verify": tls,
                                                                    "follow_redirects": False})
            http = sdk_transport_of(chat_model)._httpx_client
            if http._transport is not transport or http.follow_redirects:
                raise RuntimeError("the google-genai client ignored our HTTP client settings: check the SDK pin")
            self.chat_models.append(chat_model)
        self._shards = [GeminiTransport(sdk_transport_of(chat_model), model=model) for chat_model in self.chat_models]
        self._transports = [shard.api for shard in self._shards]
        self._thread_shard = threading.local()
        self._next_shard = itertools.count()

    def complete(self, request: ProviderRequest, seconds_left: float) -> Completion:
        """One generateContent call through the google-genai client that LangChain built.

        The SDK builds the request once per model (URL, its headers, auth) and each call sends it
        with the REST body through the SDK's `_request_once` (`gemini_transport`), rather than
        `chat_model.invoke`, `models.generate_content` or the transport's `request()`. Measured per
        call on this machine (bench/layers.py, CPU of the calling thread, medians of 3 runs):
        LangChain invoke 2.29-2.42 ms, generate_content 1.24-1.35, request() 0.61-0.63,
        `_request_once` 0.51-0.53, raw httpx 0.47-0.48, this method 0.54-0.57 (0.61-0.67 through
        `request()`; the deadline transport and the reply check included). The layers skipped
        convert a single prompt into typed objects and back (pydantic validation, 90 path lookups)
        or rebuild the same request, and change nothing on the wire (tests/test_gemini_transport.py
        compares it with the SDK's own).
        The private `_api_client` is reached in one place, `sdk_transport_of`.
        """
        try:
            answer = self._shard.generate(request.model, _body(request), seconds_left)
        except Exception as exc:  # noqa: BLE001 - every provider failure is translated here
            raise translate_provider_error(exc) from exc
        return _completion_from(read_reply(answer), request.model)

    def open_stream(self, request: ProviderRequest, seconds_left: float) -> ChunkStream:
        """`:streamGenerateContent?alt=sse`, one chunk per SSE event; the deadline bounds the whole stream."""
        try:
            responses = self._shard.api.request_streamed(
                "post", f"models/{request.model}:streamGenerateContent?alt=sse", _body(request),
                {"timeout": milliseconds(seconds_left)})
        except Exception as exc:  # noqa: BLE001 - every provider failure is translated here
            raise translate_provider_error(exc) from exc
        return _GeminiChunks(responses)

    def close(self) -> None:
        for transport in self._transports:
            with contextlib.suppress(Exception):
                transport._httpx_client.close()

    @property
    def _shard(self) -> GeminiTransport:
        """This thread's shard (its SDK client): threads are dealt round the shards as they first call."""
        try:
            return self._thread_shard.shard
        except AttributeError:
            shard = self._shards[next(self._next_shard) % len(self._shards)]
            self._thread_shard.shard = shard
            return shard


def sdk_transport_of(chat_model: ChatGoogleGenerativeAI):
    """The google-genai `BaseApiClient` under LangChain's chat model: the one private attribute
    (`_api_client`) this provider depends on, pinned with google-genai in requirements.txt and
    by `test_the_provider_reaches_the_sdk_transport_through_one_private_attribute`."""
    return chat_model.client._api_client


class _GeminiChunks:
    """The SSE events of one stream as checked `Chunk`s; every failure translated."""

    def __init__(self, responses: Iterator):
        self._responses = responses

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for response in self._responses:
                reply = read_reply(json.loads(response.body))
                yield Chunk(text=reply.text, model=reply.model, input_tokens=reply.input_tokens,
                            output_tokens=reply.output_tokens, finish_reason=reply.block_reason or reply.finish_reason)
        except GatewayError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failure mid-stream is translated like any other
            raise translate_provider_error(exc) from exc

    def close(self) -> None:
        close = getattr(self._responses, "close", None)
        if close is not None:
            close()


def _body(request: ProviderRequest) -> dict:
    """The generateContent request, as the REST API documents it and the SDK sends it (the same
    JSON as `models.generate_content`, pinned by tests/test_gemini_transport.py)."""
    contents, system = [], []
    for message in request.messages:
        if message.role == "system":
            system.append({"text": message.content})
        else:
            contents.append({"role": "model" if message.role == "assistant" else "user",
                             "parts": [{"text": message.content}]})
    params = request.params
    config = {}
    if params.temperature is not None:
        config["temperature"] = params.temperature
    if params.max_tokens is not None:
        config["maxOutputTokens"] = params.max_tokens
    if params.top_p is not None:
        config["topP"] = params.top_p
    if params.stop:
        config["stopSequences"] = list(params.stop)
    body = {"contents": contents, "generationConfig": config}
    if system:
        body["systemInstruction"] = {"parts": system, "role": "user"}  # the SDK's role for it
    return body


def _tls_context() -> ssl.SSLContext:
    """The context the SDK would build for itself (certifi, or SSL_CERT_FILE / SSL_CERT_DIR)."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE", certifi.where()),
                                      capath=os.environ.get("SSL_CERT_DIR"))


def _completion_from(reply: Reply, model: str, text: str | None = None) -> Completion:
    """A usable answer from a checked reply: blocked and empty answers are errors."""
    text = reply.text if text is None else text
    if not text.strip():
        if reply.block_reason or reply.finish_reason in BLOCKED_FINISH_REASONS:
            raise ContentBlocked("the provider's safety filter blocked this request",
                                 details={"reason": reply.block_reason or reply.finish_reason})
        raise UpstreamBadAnswer("the model returned an empty answer", details={"finish_reason": reply.finish_reason})
    return Completion(text=text, model=reply.model or model, input_tokens=reply.input_tokens,
                      output_tokens=reply.output_tokens, finish_reason=reply.finish_reason)  # /v1 reports it


def translate_provider_error(exc: BaseException) -> GatewayError:
    """Map any exception from the SDK or its transport onto the gateway's errors.

    Messages and details are the gateway's own words: never a library's exception text or class
    name (the provider's reply could echo anything, even our key). The full exception chain goes
    to api_errors.log with the request that saw it (`routes.error_payload`)."""
    if isinstance(exc, GatewayError):
        return exc
    api_error = _api_error_of(exc)
    status = getattr(api_error, "code", None)
    provider = {"provider_status": status} if isinstance(status, int) else {}
    if status == 429 or _RATE_LIMIT_WORDS.search(str(exc)):
        return UpstreamRateLimited(
            "the provider is rate-limiting the gateway; try again later",
            details=provider, retry_after=_retry_delay(api_error),
        )
    if status == 408 or isinstance(exc, _TIMEOUT_ERRORS):
        return UpstreamTimeout("the provider did not answer in time", details=provider)
    if isinstance(status, int) and status >= 500:
        return UpstreamUnavailable(f"the provider failed with HTTP {status}", details=provider)
    if status in (401, 403) or "api key not valid" in str(exc).lower():
        return UpstreamRejected("the provider refused the gateway's credentials", details=provider)
    if status == 404:
        return UpstreamRejected("the provider does not know the configured model", details=provider)
    if isinstance(status, int):
        return UpstreamRejected(f"the provider rejected the call with HTTP {status}", details=provider)
    if isinstance(exc, _CONNECTION_ERRORS):
        return UpstreamUnavailable("the connection to the provider failed")
    if isinstance(exc, (ValueError, RecursionError, genai_errors.UnknownApiResponseError, *_DECODING_ERRORS)):
        # JSON (ours or the SDK's parse) that cannot be read: malformed, a number over Python's
        # 4,300-digit limit (ValueError), nesting deeper than the recursion limit, undecodable bytes.
        return UpstreamBadAnswer("the provider's reply could not be read")
    log.error("unexpected provider failure: %s", type(exc).__name__)
    return UpstreamError("the provider call failed unexpectedly")


def _api_error_of(exc: BaseException) -> genai_errors.APIError | None:
    """The SDK's APIError: the exception itself, or one it was raised from (its __cause__)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, genai_errors.APIError):
            return seen
        seen = seen.__cause__
    return None


def _retry_delay(api_error: genai_errors.APIError | None) -> float | None:
    """The wait the provider asked for: RetryInfo.retryDelay ("2s", "1.5s"), else Retry-After.

    Only finite, non-negative hints count, clamped to a day (`errors.sane_retry_after`)."""
    if api_error is None:
        return None
    # Google's envelope is {"error": {"details": [...]}}; a proxy's 429 may have any JSON there
    # ({"error": "Too Many Requests"}): what is not that shape holds no hint, and is not a 500.
    body = api_error.details if isinstance(api_error.details, dict) else {}
    envelope = body["error"] if isinstance(body.get("error"), dict) else body
    details = envelope.get("details")
    for detail in details if isinstance(details, list) else ():
        delay = isinstance(detail, dict) and detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s") and len(delay) <= 32:
            if (seconds := sane_retry_after(delay[:-1])) is not None:
                return seconds
    headers = getattr(api_error.response, "headers", None) or {}
    header = headers.get("retry-after")
    return sane_retry_after(header) if isinstance(header, str) and len(header) <= 32 else None


class GeminiClient:
    """The user's three task functions over one Gemini model: `GeminiProvider` under the retry
    policy, with the task table's prompts and parsers. No cache and no ledger: the gateway's
    `TaskService` adds those (and other providers, fallbacks); this is the plain-Python door."""

    def __init__(self, *, api_key: str, model: str = "gemini-2.0-flash", base_url: str | None = None,
                 retry_policy: RetryPolicy | None = None, max_output_tokens: int | None = None,
                 max_connections: int = 256, pool_shards: int = 8,
                 chat_model_factory: Callable[..., ChatGoogleGenerativeAI] = ChatGoogleGenerativeAI):
        self.model = model
        self.max_output_tokens = max_output_tokens or None
        self.retry_policy = retry_policy or RetryPolicy()
        self.provider = GeminiProvider(api_key=api_key, base_url=base_url, max_connections=max_connections,
                                       pool_shards=pool_shards, model=model, chat_model_factory=chat_model_factory)
        self.router = ModelRouter({model: ModelRoute(model, self.provider, model)}, self.retry_policy)

    @classmethod
    def for_upstream(cls, config: Config, upstream, **policy_overrides) -> GeminiClient:
        """A client for `demo_mode.resolve_upstream(config)`: live Gemini, or the demo emulator and its key."""
        return cls.from_config(config.replace(google_api_key=upstream.api_key), base_url=upstream.base_url,
                               **policy_overrides)

    @classmethod
    def from_config(cls, config: Config, *, base_url: str | None = None, **policy_overrides) -> GeminiClient:
        return cls(api_key=config.google_api_key, model=config.gemini_model,
                   base_url=base_url or config.gemini_base_url or None,
                   retry_policy=retry_policy_from(config, **policy_overrides),
                   max_output_tokens=config.gemini_max_output_tokens or None,
                   max_connections=config.gemini_max_connections, pool_shards=config.gemini_pool_shards)

    @property
    def chat_models(self) -> list[ChatGoogleGenerativeAI]:
        return self.provider.chat_models

    @property
    def _transports(self) -> list:
        return self.provider._transports

    def generate_text(self, prompt: str) -> Completion:
        return self.run("text", {"prompt": prompt})

    def generate_code(self, prompt: str, language: str = "python") -> Completion:
        return self.run("code", {"prompt": prompt, "language": language})

    def classify_text(self, text: str, categories: list[str]) -> Completion:
        return self.run("classify", {"text": text, "categories": categories})

    def run(self, task_name: str, inputs: dict) -> Completion:
        """One task call with retries, within the policy's deadline: prompt and parsing from the task table."""
        task = TASKS[task_name]
        routed = self.router.complete((self.model,), (Message("user", task.prompt(inputs)),), self._params(task))
        return replace(routed.completion, text=task.parse(routed.completion.text, inputs))

    def stream_text(self, prompt: str) -> TextStream:
        """Text generation as it is produced. Retries cover opening the stream (until the first chunk)."""
        stream, _ = self.router.open_stream((self.model,), (Message("user", prompt),), self._params(TASKS["text"]))
        return stream

    def _params(self, task) -> GenerationParams:
        return GenerationParams(temperature=task.temperature, max_tokens=self.max_output_tokens)


def retry_policy_from(config: Config, **overrides) -> RetryPolicy:
    """The retry policy the settings describe (RETRY_*, GEMINI_DEADLINE_SECONDS); tests override sleep and clock."""
    policy = RetryPolicy(max_attempts=config.retry_max_attempts, min_wait=config.retry_min_wait_seconds,
                         max_wait=config.retry_max_wait_seconds, deadline=config.gemini_deadline_seconds)
    return replace(policy, **overrides) if overrides else policy


@functools.cache
def default_client() -> GeminiClient:
    """The client behind the module-level functions, built from the environment once."""
    from gateway.providers import demo as demo_mode

    config = Config.load()
    return GeminiClient.for_upstream(config, demo_mode.resolve_upstream(config))


def generate_text(prompt: str) -> str:
    """Text generation (temperature 0.7)."""
    return default_client().generate_text(prompt).text


def generate_code(prompt: str, language: str = "python") -> str:
    """Code generation (temperature 0.2): the code itself, without markdown fences."""
    return default_client().generate_code(prompt, language).text


def classify_text(text: str, categories: list[str]) -> str:
    """Classification (temperature 0.0): always exactly one of `categories`."""
    return default_client().classify_text(text, categories).text
