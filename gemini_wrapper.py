"""The three LLM tasks over Google Gemini, through LangChain's `ChatGoogleGenerativeAI`.

Why it looks the way it does:
- `GEMINI_POOL_SHARDS` `ChatGoogleGenerativeAI` instances, built once at start and shared by
  every request: LangChain builds and configures the google-genai SDK client (key, base URL,
  headers) and its HTTP connection pool. Building one per call (as the original snippets did)
  costs a TLS handshake and several milliseconds each time. Each task has a prebuilt generation
  config with its temperature (text 0.7, code 0.2, classify 0.0); calls go through the SDK
  client's transport (see `_call_once` for the measured reason).
- No retries below ours: the transport is called without retry options, so neither the SDK
  nor LangChain (whose default of 6 attempts, stacked under ours, would turn one request into
  up to 30 HTTP calls) retries. Retrying is `retry_policy.RetryPolicy`'s job, with a deadline
  over the whole call.
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
from dataclasses import dataclass, replace

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
from gateway.providers.gemini_replies import Reply, read_reply
from gateway.providers.retry_policy import RetryPolicy
from gateway.tasks import prompts as task_prompts

log = logging.getLogger("gateway.gemini")

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"  # the SDK's, when none is configured
TASK_TEMPERATURES = {"text": 0.7, "code": 0.2, "classify": 0.0}
_RATE_LIMIT_WORDS = re.compile(r"rate.?limit|quota exceeded|resource.?exhausted|too many requests", re.I)


def _transport_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(timeout, connection) exception classes of whichever httpx the SDK runs on."""
    timeouts, connections = [], []
    for name in ("httpx", "httpx2"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        timeouts.append(module.TimeoutException)
        connections.append(module.TransportError)
    return tuple(timeouts), tuple(connections)


_TIMEOUT_ERRORS, _CONNECTION_ERRORS = _transport_errors()


@dataclass(frozen=True)
class Completion:
    """A task's answer and what the provider reported about the call."""

    text: str
    model: str
    input_tokens: int | None = None
    output_tokens: int | None = None


class GeminiClient:
    """The task calls against one Gemini configuration (key, model, base URL, retry policy)."""

    def __init__(
        self,
        *,
        api_key: str,
        model: str = "gemini-2.0-flash",
        base_url: str | None = None,
        retry_policy: RetryPolicy | None = None,
        max_output_tokens: int | None = None,
        max_connections: int = 256,
        pool_shards: int = 8,
        chat_model_factory: Callable[..., ChatGoogleGenerativeAI] = ChatGoogleGenerativeAI,
    ):
        self.model = model
        self.max_output_tokens = max_output_tokens or None
        self.retry_policy = retry_policy or RetryPolicy()
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
        # LangChain builds and configures the SDK clients (key, base URL, headers); calls go through
        # their transports with our own generation configs and timeouts (see `_call_once`).
        self.chat_models = []
        for _ in range(pool_shards):
            transport = upstream_deadline.build_transport(base_url=base_url or DEFAULT_BASE_URL,
                                                          max_connections=per_shard, verify=tls)
            chat_model = chat_model_factory(**options, client_args={"transport": transport, "verify": tls})
            if chat_model.client._api_client._httpx_client._transport is not transport:
                raise RuntimeError("the google-genai client ignored our HTTP transport: check the SDK pin")
            self.chat_models.append(chat_model)
        self._transports = [chat_model.client._api_client for chat_model in self.chat_models]
        self._thread_shard = threading.local()
        self._next_shard = itertools.count()
        self._generation_configs = {
            task: {"temperature": temperature, **({"maxOutputTokens": max_output_tokens} if max_output_tokens else {})}
            for task, temperature in TASK_TEMPERATURES.items()
        }

    @classmethod
    def for_upstream(cls, config: Config, upstream, **policy_overrides) -> GeminiClient:
        """A client for `demo_mode.resolve_upstream(config)`: live Gemini, or the demo emulator and its key."""
        return cls.from_config(config.replace(google_api_key=upstream.api_key), base_url=upstream.base_url,
                               **policy_overrides)

    @classmethod
    def from_config(cls, config: Config, *, base_url: str | None = None, **policy_overrides) -> GeminiClient:
        policy = RetryPolicy(
            max_attempts=config.retry_max_attempts,
            min_wait=config.retry_min_wait_seconds,
            max_wait=config.retry_max_wait_seconds,
            deadline=config.gemini_deadline_seconds,
        )
        if policy_overrides:
            policy = replace(policy, **policy_overrides)
        return cls(
            api_key=config.google_api_key,
            model=config.gemini_model,
            base_url=base_url or config.gemini_base_url or None,
            retry_policy=policy,
            max_output_tokens=config.gemini_max_output_tokens or None,
            max_connections=config.gemini_max_connections,
            pool_shards=config.gemini_pool_shards,
        )

    def generate_text(self, prompt: str) -> Completion:
        return self.complete("text", task_prompts.text_prompt(prompt))

    def generate_code(self, prompt: str, language: str = "python") -> Completion:
        completion = self.complete("code", task_prompts.code_prompt(prompt, language))
        return replace(completion, text=task_prompts.extract_code(completion.text))

    def classify_text(self, text: str, categories: list[str]) -> Completion:
        completion = self.complete("classify", task_prompts.classification_prompt(text, categories))
        return replace(completion, text=task_prompts.match_category(completion.text, categories))

    def complete(self, task: str, prompt: str) -> Completion:
        """One task call with retries, within the policy's deadline."""
        return self.retry_policy.run(
            lambda seconds_left: self._call_once(task, prompt, seconds_left),
            label=f"gemini {task} call",
        )

    def stream_text(self, prompt: str) -> TextStream:
        """Text generation as it is produced. Retries cover opening the stream (until the first chunk)."""
        def open_stream(seconds_left: float):
            try:
                chunks = self._transport.request_streamed(
                    "post", f"models/{self.model}:streamGenerateContent?alt=sse",
                    self._body("text", task_prompts.text_prompt(prompt)), {"timeout": _milliseconds(seconds_left)})
                return next(chunks, None), chunks
            except Exception as exc:  # noqa: BLE001 - every provider failure is translated here
                raise translate_provider_error(exc) from exc

        first, rest = self.retry_policy.run(open_stream, label="gemini text stream")
        return TextStream(first, rest, self.model)

    @property
    def _transport(self):
        """This thread's SDK transport: threads are dealt round the shards as they first call."""
        try:
            return self._thread_shard.transport
        except AttributeError:
            transport = self._transports[next(self._next_shard) % len(self._transports)]
            self._thread_shard.transport = transport
            return transport

    def _body(self, task: str, prompt: str) -> dict:
        """The generateContent request, as the REST API documents it and the SDK would send it."""
        return {"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                "generationConfig": self._generation_configs[task]}

    def _call_once(self, task: str, prompt: str, seconds_left: float) -> Completion:
        """One generateContent call through the google-genai client that LangChain built.

        It goes through the SDK's transport (`request`: its auth header, base URL, timeout and
        `APIError`s) with the REST body, rather than `chat_model.invoke` or `models.generate_content`.
        Measured per call on this machine (bench/layers.py, CPU): invoke 3.0 ms, generate_content
        1.7 ms, the transport 0.9-1.1 ms, raw httpx 0.7 ms. The layers skipped convert a single
        prompt into typed objects and back (pydantic validation, 90 path lookups) and change
        nothing in the request or the answer. The private `_api_client` is pinned with
        google-genai in requirements.txt and covered by every wrapper test.
        """
        try:
            response = self._transport.request(
                "post", f"models/{self.model}:generateContent", self._body(task, prompt),
                {"timeout": _milliseconds(seconds_left)})
            answer = json.loads(response.body)
        except Exception as exc:  # noqa: BLE001 - every provider failure is translated here
            raise translate_provider_error(exc) from exc
        return _completion_from(read_reply(answer), self.model)


def _tls_context() -> ssl.SSLContext:
    """The context the SDK would build for itself (certifi, or SSL_CERT_FILE / SSL_CERT_DIR)."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE", certifi.where()),
                                      capath=os.environ.get("SSL_CERT_DIR"))


def _milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class TextStream:
    """Iterate for text chunks; afterwards `completion` holds the whole answer and its usage."""

    def __init__(self, first, rest: Iterator, model: str):
        self._first, self._rest, self._model = first, rest, model
        self._parts: list[str] = []
        self._last: Reply | None = None  # the latest chunk, with the largest (cumulative) usage seen so far
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            chunk = self._first
            while chunk is not None:
                reply = read_reply(json.loads(chunk.body))
                self._last = _with_peak_usage(self._last, reply)
                if reply.text:
                    self._parts.append(reply.text)
                    yield reply.text
                chunk = next(self._rest, None)
        except GatewayError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failure mid-stream is translated like any other
            raise translate_provider_error(exc) from exc
        if self._last is None:
            raise UpstreamBadAnswer("the provider closed the stream without an answer")
        self.completion = _completion_from(self._last, self._model, text="".join(self._parts))

    def received(self) -> Completion:
        """What arrived before the stream was cut short, with the usage the provider reported so far
        (Gemini's counts are cumulative: the largest seen in any chunk)."""
        last = self._last
        if last is None:
            return Completion(text="", model=self._model)
        return Completion(text="".join(self._parts), model=last.model or self._model,
                          input_tokens=last.input_tokens, output_tokens=last.output_tokens)

    def close(self) -> None:
        """Release the provider's connection now, not when the garbage collector gets to it."""
        close = getattr(self._rest, "close", None)
        if close is not None:
            close()


def _with_peak_usage(previous: Reply | None, reply: Reply) -> Reply:
    """`reply`, billed with the largest token counts reported so far in the stream.

    Gemini's counts are cumulative, so they never go down; a chunk reporting less (1000 then 1)
    is not believed, or a provider could stream a long answer and bill it from a last tiny count."""
    if previous is None:
        return reply
    return replace(reply, input_tokens=_larger(previous.input_tokens, reply.input_tokens),
                   output_tokens=_larger(previous.output_tokens, reply.output_tokens))


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _completion_from(reply: Reply, model: str, text: str | None = None) -> Completion:
    """A usable answer from a checked reply: blocked and empty answers are errors."""
    text = reply.text if text is None else text
    if not text.strip():
        if reply.block_reason or reply.finish_reason in ("SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII"):
            raise ContentBlocked("the provider's safety filter blocked this request",
                                 details={"reason": reply.block_reason or reply.finish_reason})
        raise UpstreamBadAnswer("the model returned an empty answer", details={"finish_reason": reply.finish_reason})
    return Completion(text=text, model=reply.model or model,
                      input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)


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
    if isinstance(exc, (ValueError, RecursionError, genai_errors.UnknownApiResponseError)):
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
    body = api_error.details if isinstance(api_error.details, dict) else {}
    for detail in (body.get("error") or body).get("details") or []:
        delay = isinstance(detail, dict) and detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s") and len(delay) <= 32:
            if (seconds := sane_retry_after(delay[:-1])) is not None:
                return seconds
    headers = getattr(api_error.response, "headers", None) or {}
    header = headers.get("retry-after")
    return sane_retry_after(header) if isinstance(header, str) and len(header) <= 32 else None


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
