"""The gateway's own ceilings on what it sends a provider: requests and tokens per minute.

A provider's quota (60 requests a minute, 40,000 tokens a minute, ...) is cheaper to respect
than to discover by 429s: a 429 costs a round trip, and the provider may answer it with a long
penalty. One `OutboundLimiter` holds the ceilings of one scope: a provider ("openai") or one
model; several models may share one limiter. The counting is the `limits` library's (the one
under Flask-Limiter), in a storage given by URI: `memory://` counts in this process;
`redis://...` (the same Redis as `RATELIMIT_STORAGE_URI`) shares the ceilings between every
worker and every gateway process, so N workers do not send N times the quota.

- Requests per minute: a moving window (exact: a 60-a-minute ceiling never lets a 61st
  request start within any 60 seconds; one stored timestamp per request, at most the ceiling).
- Tokens per minute: a sliding window COUNTER (two counters whatever the token count, where a
  moving window would store one entry per token). It weighs the previous minute by how much of
  it still overlaps the last 60 seconds: an approximation that assumes the previous minute's
  tokens were spread evenly.

Tokens are reserved BEFORE the call, as the providers count them: the prompt's estimate
(about 4 characters a token, `estimate_input_tokens`) plus `max_tokens` (or
`assumed_output_tokens` when the request leaves the length to the provider). OpenAI counts
max_tokens against its tokens-per-minute limit when a request starts, and Anthropic estimates
output from max_tokens and corrects at the end, so charging only actual usage after the call
would let a burst of concurrent requests through that the provider then refuses. After the call,
`settle` charges what the provider reported beyond the reservation; a reservation larger than
the real usage is NOT given back (the library has no refund): the gateway errs on the side of
staying under the quota. A single request larger than the whole ceiling is charged the whole
ceiling (it could never pass otherwise).

A request over a ceiling waits (injected `sleep`) when the window frees up soon enough: at most
`max_wait` seconds, and never so long that less than `min_call_seconds` of its deadline would be
left for the call. Otherwise it is refused with `UpstreamRateLimited` (429
`upstream_rate_limited`, `retry_after` = when the window frees up), whose message says it is the
gateway's own ceiling, not the provider's answer. The refusal is final for this request:
it is marked not retryable (on the instance), because the limiter already waited as long as it
should; a retry policy would otherwise sleep `retry_after` more for the same model, where a
fallback chain moves on to its next model at once.

If the storage fails (Redis down), the call is let through with a warning: the provider's own
429 still protects its quota, and a broken counter must not turn into an outage.

`limits` reads the wall clock (`time.time`) inside its storages; the waits here are computed
from its answers and spent through the injected `sleep`, so tests pass a fake sleep and clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from limits import RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from gateway.errors import UpstreamRateLimited

if TYPE_CHECKING:
    from gateway.providers.base import Completion, ProviderRequest

log = logging.getLogger("gateway.outbound")

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English with BPE tokenizers; an estimate only
MIN_WAIT_STEP = 0.05  # a refused request whose window "frees now" (a race) tries again after this
WINDOW_EDGE = 0.001  # `limits` still counts an entry exactly one period old: wait just past the edge
NAMESPACE = "outbound"  # in the storage keys: apart from Flask-Limiter's own counters


REDIS_TIMEOUT_SECONDS = 1.0  # a Redis that does not answer must not hold a request past its deadline


def outbound_storage(uri: str = "memory://") -> Storage:
    """The `limits` storage for a URI (`memory://`, `redis://host:port/db`, ...): one per process,
    shared by every limiter. Storage errors surface as `limits.errors.StorageError`.

    Redis gets 1 s connect and read timeouts unless the URI sets its own (`?socket_timeout=`):
    redis-py waits forever by default, and a stalled Redis would hang every provider call."""
    if uri.startswith("memory://"):
        return MemoryStorage(wrap_exceptions=True)
    options: dict = {"wrap_exceptions": True}
    if uri.split(":", 1)[0] in ("redis", "rediss", "valkey", "valkeys"):
        options.update(socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
    return storage_from_string(uri, **options)  # type: ignore[return-value]


def estimate_input_tokens(request: ProviderRequest) -> int:
    """About 4 characters a token, over every message: good enough to reserve, never to bill."""
    characters = sum(len(message.content) for message in request.messages)
    return math.ceil(characters / CHARS_PER_TOKEN) + len(request.messages)


@dataclass(frozen=True)
class Reservation:
    """What `acquire` took: hand it to `settle` once the provider reported usage."""

    scope: str
    tokens: int  # reserved against tokens per minute (0 without such a ceiling)
    waited: float  # seconds spent waiting for the window


class OutboundLimiter:
    """Requests- and tokens-per-minute ceilings of one scope. Thread-safe (the storage is)."""

    def __init__(self, scope: str, *, requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
                 storage: Storage | None = None, max_wait: float = 5.0, min_call_seconds: float = 1.0,
                 assumed_output_tokens: int = 512, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1 (or None for no ceiling)")
        if not (max_wait >= 0 and min_call_seconds >= 0 and assumed_output_tokens >= 0):
            raise ValueError("max_wait, min_call_seconds and assumed_output_tokens cannot be negative")
        self.scope = scope
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.max_wait, self.min_call_seconds = max_wait, min_call_seconds
        self.assumed_output_tokens = assumed_output_tokens
        self._sleep, self._clock = sleep, clock
        self._storage = storage if storage is not None else MemoryStorage(wrap_exceptions=True)
        self._requests = MovingWindowRateLimiter(self._storage) if requests_per_minute else None
        self._tokens = SlidingWindowCounterRateLimiter(self._storage) if tokens_per_minute else None
        self._request_item = RateLimitItemPerMinute(requests_per_minute or 1)
        self._token_item = RateLimitItemPerMinute(tokens_per_minute or 1)
        self._ids = (NAMESPACE, scope)

    @property
    def enabled(self) -> bool:
        return bool(self._requests or self._tokens)

    def tokens_to_reserve(self, request: ProviderRequest) -> int:
        # At most `assumed_output_tokens` for the answer: what it really used is charged when it ends (`settle`),
        # so one request asking for a huge max_tokens cannot take the whole minute's ceiling from everyone.
        output = request.params.max_tokens
        assumed = self.assumed_output_tokens if output is None else min(max(0, output), self.assumed_output_tokens)
        return estimate_input_tokens(request) + assumed

    def acquire(self, request: ProviderRequest, seconds_left: float) -> Reservation:
        """Take one request and the request's tokens from the ceilings, waiting briefly if that
        lets it through; UpstreamRateLimited (429, retry_after) if it cannot go within its time."""
        if not self.enabled:
            return Reservation(self.scope, 0, 0.0)
        tokens = min(self.tokens_to_reserve(request), self.tokens_per_minute) if self._tokens else 0
        budget = max(0.0, min(self.max_wait, seconds_left - self.min_call_seconds))
        started, waited = self._clock(), 0.0
        while True:
            try:
                wait, ceiling = self._try(tokens)
            except StorageError as exc:
                log.warning("outbound limit storage failed (%s); %s goes through unlimited",
                            type(exc.storage_error).__name__, self.scope, extra={"scope": self.scope})
                return Reservation(self.scope, 0, waited)
            if ceiling is None:
                return Reservation(self.scope, tokens, waited)
            wait = max(wait + WINDOW_EDGE, MIN_WAIT_STEP)
            spent = max(self._clock() - started, waited)
            if spent + wait > budget:
                raise self._refusal(ceiling, wait)
            self._sleep(wait)
            waited += wait

    def settle(self, reservation: Reservation, completion: Completion | None = None, *,
               input_tokens: int | None = None, output_tokens: int | None = None) -> None:
        """Charge the usage the provider reported beyond the reservation (usage from `completion`,
        or given directly: a stream's peak counts). Missing usage: the reservation stands."""
        if not self._tokens or reservation.tokens == 0:
            return
        if completion is not None:
            input_tokens, output_tokens = completion.input_tokens, completion.output_tokens
        if input_tokens is None and output_tokens is None:
            return
        used = _count(input_tokens) + _count(output_tokens)
        excess = min(used - reservation.tokens, self.tokens_per_minute or 0)
        if excess <= 0:
            return
        try:
            if not self._tokens.hit(self._token_item, *self._ids, cost=excess):
                room = self._tokens.get_window_stats(self._token_item, *self._ids).remaining
                if room > 0:  # the window is (nearly) full anyway: charge what fits
                    self._tokens.hit(self._token_item, *self._ids, cost=min(room, excess))
        except StorageError as exc:
            log.warning("outbound limit storage failed (%s) while charging %s's usage",
                        type(exc.storage_error).__name__, self.scope, extra={"scope": self.scope})

    def snapshot(self) -> dict:
        """For /status: the ceilings and what is left of them now (None where no ceiling is set)."""
        view = {"scope": self.scope, "requests_per_minute": self.requests_per_minute,
                "tokens_per_minute": self.tokens_per_minute, "requests_left": None, "tokens_left": None}
        try:
            if self._requests:
                view["requests_left"] = self._requests.get_window_stats(self._request_item, *self._ids).remaining
            if self._tokens:
                view["tokens_left"] = self._tokens.get_window_stats(self._token_item, *self._ids).remaining
        except StorageError:
            view["storage"] = "unavailable"
        return view

    # --- one try ---------------------------------------------------------------------------

    def _try(self, tokens: int) -> tuple[float, str | None]:
        """(0, None) when the request went through, else (seconds until it may, the ceiling hit).

        Tokens are tested before a request slot is taken, so a request waiting for tokens does
        not use up request slots while it waits. Between that test and the hit another worker
        may take the tokens: the request slot is then spent without a call (errs on the safe side)."""
        if self._tokens and not self._tokens.test(self._token_item, *self._ids, cost=tokens):
            return self._tokens_free_in(tokens), "tokens_per_minute"
        if self._requests and not self._requests.hit(self._request_item, *self._ids):
            return self._request_free_in(), "requests_per_minute"
        if self._tokens and not self._tokens.hit(self._token_item, *self._ids, cost=tokens):
            return self._tokens_free_in(tokens), "tokens_per_minute"
        return 0.0, None

    def _request_free_in(self) -> float:
        """Until the oldest request in the moving window leaves it (`limits` counts in wall time)."""
        reset_at = self._requests.get_window_stats(self._request_item, *self._ids).reset_time
        return max(0.0, reset_at - time.time())

    def _tokens_free_in(self, tokens: int) -> float:
        """Until the sliding window has room for `tokens`.

        The window weighs the previous period's count by the share of it still inside the last
        minute: weight(t) = previous * (previous_ttl - t) / period + current, until the current
        period ends (`current_ttl - period` from now) and becomes the previous one."""
        period = self._token_item.get_expiry()
        key = self._token_item.key_for(*self._ids)
        previous, previous_ttl, current, current_ttl = self._storage.get_sliding_window(key, period)
        room = self.tokens_per_minute - tokens  # the weighted count must be at most this
        if current <= room:
            return 0.0 if previous == 0 else max(0.0, previous_ttl - (room - current) * period / previous)
        rollover = max(0.0, current_ttl - period)
        return rollover + period * (1 - room / current)

    def _refusal(self, ceiling: str, wait: float) -> UpstreamRateLimited:
        limit = self.requests_per_minute if ceiling == "requests_per_minute" else self.tokens_per_minute
        unit = "requests" if ceiling == "requests_per_minute" else "tokens"
        refusal = UpstreamRateLimited(
            f"the gateway's own ceiling of {limit} {unit} per minute for {self.scope} is reached "
            "(set to stay under the provider's quota); retry after the time in Retry-After",
            details={"scope": self.scope, "ceiling": ceiling, "limit": limit, "source": "gateway"},
            retry_after=math.ceil(wait * 1000) / 1000)
        refusal.retryable = False  # the wait was ours to make, and was made: no retry on top of it
        return refusal


def _count(value: int | None) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
