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
from dataclasses import dataclass
from typing import Protocol


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
