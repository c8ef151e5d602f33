"""The seam between the task layer and every LLM vendor: one protocol, plain data both ways.

A provider turns a `ProviderRequest` into a `Completion` (or a stream of `Chunk`s) for one
vendor's wire protocol, through that vendor's own SDK client as LangChain builds it. It makes
exactly ONE attempt per call: retries, deadlines across attempts, fallbacks, circuit breaking
and outbound limits live above it (gateway/providers/retry_policy.py, fallback.py, ...). It
translates every failure of its SDK into the gateway's error tree (gateway/errors.py) in one
place, so nothing above it ever sees an SDK exception. It knows nothing of HTTP or of tasks:
prompts arrive built, answers leave as plain text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.errors import ContentBlocked, GatewayError, UpstreamBadAnswer


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one call; None = the provider's own default."""

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProviderRequest:
    model: str  # the upstream model name (the registry's `upstream`, not the public id)
    messages: tuple[Message, ...]
    params: GenerationParams = GenerationParams()


@dataclass(frozen=True)
class Completion:
    """A whole answer and the usage the provider reported (None = not reported: we estimate)."""

    text: str
    model: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed answer. Usage fields are CUMULATIVE counts as far as the provider
    reported them in this chunk (None = not in this chunk); the stream keeps the largest seen."""

    text: str
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None


class ChunkStream(Protocol):
    """An open provider stream. Iteration raises only GatewayError (translated)."""

    def __iter__(self) -> Iterator[Chunk]: ...
    def close(self) -> None: ...  # release the connection now (client went away)


class Provider(Protocol):
    name: str  # "gemini", "openai", "anthropic": what answers and logs call the provider

    def complete(self, request: ProviderRequest, seconds_left: float) -> Completion:
        """One attempt, bounded by `seconds_left` over the whole exchange (connect, send, read).
        Raises GatewayError only: UpstreamRateLimited (with retry_after), UpstreamUnavailable (5xx,
        connection), UpstreamTimeout, UpstreamRejected (400/401/403/404), UpstreamBadAnswer
        (malformed reply), ContentBlocked (safety refusal), all via the provider's one translate
        function."""

    def open_stream(self, request: ProviderRequest, seconds_left: float) -> ChunkStream:
        """Open a stream; the deadline bounds the whole stream. Same errors as `complete`."""

    def close(self) -> None:
        """Close pooled connections (shutdown, tests)."""


def user_prompt(prompt: str, params: GenerationParams = GenerationParams(), *, model: str) -> ProviderRequest:
    """The request of a one-turn task: the whole prompt as one user message."""
    return ProviderRequest(model=model, messages=(Message("user", prompt),), params=params)


class TextStream:
    """An open provider stream, as the task layer sees it: iterate for text; afterwards `completion`
    holds the whole answer and its usage. Works over any provider's `ChunkStream`.

    Usage counts are kept as the largest seen in any chunk: every provider here reports cumulative
    counts (Gemini in every chunk, OpenAI in the last, Anthropic input at the start and output at
    the end), and a chunk reporting less (1000 then 1) is not believed, or a provider could stream
    a long answer and bill it from a last tiny count."""

    def __init__(self, chunks: ChunkStream, model: str):
        self._chunks = chunks
        self._model = model
        self._parts: list[str] = []
        self._peak = Chunk(text="")
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for chunk in self._chunks:
            self._peak = _peak(self._peak, chunk)
            if chunk.text:
                self._parts.append(chunk.text)
                yield chunk.text
        text = "".join(self._parts)
        if not text.strip():  # the chain opened it at a chunk with text, but that text may be blank
            if self._peak.finish_reason in BLOCKED_FINISH_REASONS:
                raise ContentBlocked("the provider's safety filter blocked this request",
                                     details={"reason": self._peak.finish_reason})
            raise UpstreamBadAnswer("the model returned an empty answer",
                                    details={"finish_reason": self._peak.finish_reason})
        self.completion = self.received()

    def received(self) -> Completion:
        """What arrived so far (all of it after a finished stream), with the usage reported so far."""
        peak = self._peak
        return Completion(text="".join(self._parts), model=peak.model or self._model, input_tokens=peak.input_tokens,
                          output_tokens=peak.output_tokens, finish_reason=peak.finish_reason)

    def close(self) -> None:
        """Release the provider's connection now, not when the garbage collector gets to it."""
        self._chunks.close()


# Finish reasons that mean "refused for safety", across providers (Gemini, OpenAI, Anthropic).
BLOCKED_FINISH_REASONS = frozenset({"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "content_filter", "refusal"})


def _peak(previous: Chunk, chunk: Chunk) -> Chunk:
    return replace(previous, model=chunk.model or previous.model,
                   input_tokens=larger(previous.input_tokens, chunk.input_tokens),
                   output_tokens=larger(previous.output_tokens, chunk.output_tokens),
                   finish_reason=chunk.finish_reason or previous.finish_reason)


def larger(a: int | None, b: int | None) -> int | None:
    """The larger of two reported counts, either of which may be missing."""
    return b if a is None else a if b is None else max(a, b)


__all__ = ["BLOCKED_FINISH_REASONS", "Chunk", "ChunkStream", "Completion", "GatewayError", "GenerationParams",
           "Message", "Provider", "ProviderRequest", "TextStream", "user_prompt"]
