"""Try the request's models in order until one answers: retries, circuit breakers, outbound limits.

A `FallbackChain` takes an ordered list of `Candidate`s (a public model id, its Provider, the
upstream model name, and optionally its CircuitBreaker and OutboundLimiter) and a function that
builds each model's `ProviderRequest`. For each model in turn it runs the retry policy over
single attempts; each attempt asks the breaker for a permit (an open circuit refuses at once
with CircuitOpen), takes its place under the outbound ceilings (which may wait briefly or
refuse with the gateway's own 429), calls the provider once with what is left of the deadline,
and reports the outcome to the breaker. A refusal by the ceilings is not the upstream's failure:
the breaker hears nothing of it, and the chain moves on to the next model at once (the limiter
marks its refusal not retryable: it already waited as long as it should).

When to move on to the next model, decided here:
- on an upstream fault once the model's retries are spent: UpstreamRateLimited, UpstreamUnavailable,
  UpstreamTimeout, CircuitOpen (no call made: the model is skipped at once), AND UpstreamBadAnswer
  (a malformed or empty reply) and a bare UpstreamError. The request itself was valid; the fault is
  the upstream's, which is what a fallback is for. BadAnswer is not retried on the same model
  (it would likely answer the same), but another model may well answer properly.
- never on what says something about the request or our account with that provider:
  InvalidRequest and its ContentBlocked (a safety block is a verdict on the prompt: asking the next
  model would shop for a permissive one), UpstreamRejected (400/401/403/404: the request or our
  configuration is wrong; a fallback would hide it). These are raised at once.

One deadline for the whole chain (the policy's `deadline`, unless given): a client never waits
N times the deadline. Each model gets a fair share of what is left (what is left divided by the
models still to try, or `per_model_deadline` if set), so a model that hangs cannot eat its
fallbacks' time; a fallback is not tried with less than `min_seconds_per_model` left. When
every model failed, the last error is raised, its details naming the failed models.

The answer says which model answered and which failed before it (public id and error code),
so the HTTP layer can set `X-Model` and `X-Fallback-Used: true` and log the failures.

Streams fall back only until the first chunk with text: opening a stream (with retries) means
getting that chunk. After it, the client has part of an answer and a failure is the client's to
see. The breaker's verdict on a stream is given at its first text chunk; the tokens a stream used
are charged to the outbound ceilings when it ends (or is closed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from gateway.errors import (
    ContentBlocked,
    GatewayError,
    UpstreamBadAnswer,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from gateway.providers.base import BLOCKED_FINISH_REASONS, larger
from gateway.providers.retry_policy import RetryPolicy

if TYPE_CHECKING:
    from gateway.providers.base import Chunk, ChunkStream, Completion, Provider, ProviderRequest
    from gateway.providers.circuit_breaker import CircuitBreaker, Permit
    from gateway.providers.outbound_limits import OutboundLimiter, Reservation

log = logging.getLogger("gateway.fallback")
T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One model the chain may ask."""

    model_id: str  # the public id (registry key; what X-Model says)
    provider: Provider
    upstream: str  # the provider's own name for the model
    breaker: CircuitBreaker | None = None
    limiter: OutboundLimiter | None = None


@dataclass(frozen=True)
class FailedModel:
    """A model that did not answer, and why (for the log line and X-Fallback-Used)."""

    model_id: str
    code: str  # the gateway error code: upstream_unavailable, circuit_open, ...
    status: int


@dataclass(frozen=True)
class ChainAnswer:
    completion: Completion
    model_id: str  # the public id of the model that answered
    provider: str  # its provider's name
    failed: tuple[FailedModel, ...] = ()

    @property
    def fallback_used(self) -> bool:
        return bool(self.failed)


RequestBuilder = Callable[[Candidate], "ProviderRequest"]


def falls_back(error: BaseException) -> bool:
    """Whether the next model may be asked after `error` (see the module docstring)."""
    return isinstance(error, UpstreamError) and not isinstance(error, UpstreamRejected)


class FallbackChain:
    """Stateless between calls (breakers and limiters hold the state): one per gateway is enough."""

    def __init__(self, policy: RetryPolicy, *, deadline: float | None = None,
                 per_model_deadline: float | None = None, min_seconds_per_model: float = 0.5):
        self.policy = policy
        self.deadline = policy.deadline if deadline is None else deadline
        self.per_model_deadline = per_model_deadline
        self.min_seconds_per_model = min_seconds_per_model

    def complete(self, candidates: Sequence[Candidate], build: RequestBuilder, *,
                 caller: str | None = None) -> ChainAnswer:
        """The first answer of the candidates, in order; raises the stopping or the last error."""
        def attempt(candidate: Candidate, request: ProviderRequest, seconds_left: float) -> Completion:
            permit, reservation, seconds_left = self._admit(candidate, request, seconds_left)
            completion = _reported(permit, lambda: candidate.provider.complete(request, seconds_left))
            if candidate.limiter is not None:
                candidate.limiter.settle(reservation, completion)
            return completion

        completion, candidate, failed = self._first_success(candidates, build, attempt, "call", caller)
        return ChainAnswer(completion, candidate.model_id, candidate.provider.name, failed)

    def open_stream(self, candidates: Sequence[Candidate], build: RequestBuilder, *,
                    caller: str | None = None) -> ChainStream:
        """The first stream of the candidates to deliver text; fallbacks only before that text."""
        def attempt(candidate: Candidate, request: ProviderRequest, seconds_left: float) -> ChainStream:
            permit, reservation, seconds_left = self._admit(candidate, request, seconds_left)
            stream, chunks, head = _reported(permit, lambda: _open_until_text(candidate, request, seconds_left))
            return ChainStream(stream, chunks, head, candidate, reservation)

        stream, _, failed = self._first_success(candidates, build, attempt, "stream", caller)
        stream.failed = failed
        return stream

    # --- the chain -------------------------------------------------------------------------

    def _first_success(self, candidates: Sequence[Candidate], build: RequestBuilder,
                       attempt: Callable[[Candidate, ProviderRequest, float], T],
                       what: str, caller: str | None = None) -> tuple[T, Candidate, tuple[FailedModel, ...]]:
        if not candidates:
            raise ValueError("a fallback chain needs at least one model")
        clock = self.policy.clock
        deadline_at = clock() + self.deadline
        failed: list[FailedModel] = []
        last_error: GatewayError | None = None
        for index, candidate in enumerate(candidates):
            left = deadline_at - clock()
            if index and left < self.min_seconds_per_model:  # a fallback needs time to be worth starting;
                break  # the first model always gets the whole deadline, however short it was configured
            # A fair share of what is left, so a model that hangs cannot eat its fallbacks' time: with two
            # models and 30 s the first gets 15 s (and the second what is then left); alone, a model gets it all.
            share = left / (len(candidates) - index)
            budget = min(left, self.per_model_deadline) if self.per_model_deadline else share
            request = build(candidate)
            policy = replace(self.policy, deadline=budget)
            try:
                # The breaker hears one verdict per request and model, after its retries: one request's
                # retries of a blip are not "5 failures in a row" (that would open the circuit for everyone).
                permit = candidate.breaker.acquire(caller) if candidate.breaker is not None else None
                result = _reported(permit, lambda c=candidate, r=request, p=policy: p.run(
                    lambda seconds_left: attempt(c, r, seconds_left), label=f"{c.model_id} {what}"))
            except GatewayError as error:
                if not falls_back(error):
                    if failed:
                        _name_failed(error, failed)
                    raise
                failed.append(FailedModel(candidate.model_id, error.code, error.status))
                last_error = error
                if index + 1 < len(candidates):
                    log.warning("model %s failed with %s; trying the next model", candidate.model_id, error.code,
                                extra={"model": candidate.model_id, "error_code": error.code})
                continue
            return result, candidate, tuple(failed)
        if last_error is None:
            raise UpstreamTimeout(f"no time was left to call a model within the {self.deadline:g} s deadline")
        if len(candidates) > 1:  # a request without fallbacks: its error says all there is
            _name_failed(last_error, failed)
        raise last_error

    def _admit(self, candidate: Candidate, request: ProviderRequest,
               seconds_left: float) -> tuple[Permit | None, Reservation | None, float]:
        """A place under the outbound ceilings (the breaker's permit is taken per model, in `_first_success`)."""
        permit = None
        if candidate.limiter is None:
            return permit, None, seconds_left
        started = self.policy.clock()
        try:
            reservation = candidate.limiter.acquire(request, seconds_left)
        except BaseException:
            if permit is not None:
                permit.released()
            raise
        return permit, reservation, seconds_left - (self.policy.clock() - started)


class ChainStream:
    """Iterate for the chunks (the first text chunk already arrived); `close()` when the client leaves."""

    def __init__(self, stream: ChunkStream, chunks: Iterator[Chunk], head: list[Chunk], candidate: Candidate,
                 reservation: Reservation | None):
        self._stream, self._chunks, self._head = stream, chunks, head
        self._candidate, self._reservation = candidate, reservation
        self.model_id = candidate.model_id
        self.provider = candidate.provider.name
        self.failed: tuple[FailedModel, ...] = ()
        self._input_tokens: int | None = None
        self._output_tokens: int | None = None
        self._settled = False

    @property
    def fallback_used(self) -> bool:
        return bool(self.failed)

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for chunk in self._head:
                yield self._seen(chunk)
            self._head = []
            for chunk in self._chunks:
                yield self._seen(chunk)
        finally:
            self._settle()

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._settle()

    def _seen(self, chunk: Chunk) -> Chunk:
        self._input_tokens = larger(self._input_tokens, chunk.input_tokens)
        self._output_tokens = larger(self._output_tokens, chunk.output_tokens)
        return chunk

    def _settle(self) -> None:
        if self._settled or self._candidate.limiter is None or self._reservation is None:
            return
        self._settled = True
        self._candidate.limiter.settle(self._reservation, input_tokens=self._input_tokens,
                                       output_tokens=self._output_tokens)


def _open_until_text(candidate: Candidate, request: ProviderRequest,
                     seconds_left: float) -> tuple[ChunkStream, Iterator[Chunk], list[Chunk]]:
    """Open the stream and read up to its first chunk with text (a role-only or usage-only chunk
    first is kept for the client). A stream that ends without text is a bad answer, or a safety
    block when a chunk said so (a verdict on the prompt: no fallback, billed $0 like a plain call)."""
    stream = candidate.provider.open_stream(request, seconds_left)
    try:
        chunks = iter(stream)
        head: list[Chunk] = []
        for chunk in chunks:
            head.append(chunk)
            if chunk.text:
                return stream, chunks, head
        blocked = [chunk.finish_reason for chunk in head if chunk.finish_reason in BLOCKED_FINISH_REASONS]
        if blocked:
            raise ContentBlocked("the provider's safety filter blocked this request", details={"reason": blocked[0]})
        raise UpstreamBadAnswer("the provider closed the stream without any text")
    except BaseException:
        stream.close()
        raise


def _reported(permit: Permit | None, call: Callable[[], T]) -> T:
    """`call()`, its outcome reported to the breaker's permit."""
    try:
        result = call()
    except GatewayError as error:
        if permit is not None:
            permit.failed(error)
        raise
    except BaseException:  # not an upstream outcome (a bug, an interrupt): no verdict
        if permit is not None:
            permit.released()
        raise
    if permit is not None:
        permit.succeeded()
    return result


def _name_failed(error: GatewayError, failed: list[FailedModel]) -> None:
    error.details = {**error.details, "failed_models": [{"model": f.model_id, "code": f.code} for f in failed]}

