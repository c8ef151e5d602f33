"""Stop calling a model that keeps failing, and find out cheaply when it has recovered.

One `CircuitBreaker` per model (or per provider: the registry decides what a name covers).

    closed ──(N consecutive retryable failures)──> open ──(cool-down over)──> half-open
      ^                                             ^                           │
      └──────────── the probe succeeds ─────────────┼──── the probe fails ──────┘

- closed: every call goes through; a retryable failure (`GatewayError.retryable`: 429, 5xx,
  dropped connection, timeout) adds one to a count of consecutive failures, a success resets it.
- open: no call goes through; callers get `CircuitOpen` (503, `retry_after` = time until the
  cool-down ends) at once, so a fallback chain moves on without waiting for a dead upstream.
- half-open: exactly ONE probe call is let through; concurrent callers are refused while it is
  in flight. Its success closes the circuit, its retryable failure re-opens it for a new cool-down.

Decided (and why):
- Only retryable failures count. A 400, a provider's 4xx rejection, a safety block or a
  malformed answer say something about THIS request (or our configuration), not about whether
  the upstream serves requests; opening the circuit on them would turn one client's bad input
  into an outage for everyone.
- Such a non-retryable outcome is NEUTRAL: it neither counts as a failure nor resets the count.
  Resetting on it would let a trickle of bad requests hide an outage in which every good request
  fails. A probe that ends neutrally (or without any outcome: the outbound limiter refused it,
  the client went away) frees the probe slot and the circuit stays half-open: the next caller probes.
- Outcomes of calls admitted BEFORE the state last changed are ignored: a slow call that fails
  after the circuit opened does not extend the cool-down, and one that succeeds late does not
  close the circuit without a probe. A `Permit` remembers the state generation it was issued in.
- Each state change is logged once (logger "gateway.circuit", with the model name and the new
  state); `state` and `snapshot()` are cheap reads for /status.

The clock is injectable (`clock=`), so tests walk through the states without waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

from gateway.errors import CircuitOpen, GatewayError

log = logging.getLogger("gateway.circuit")
T = TypeVar("T")

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_COOL_DOWN_SECONDS = 30.0
MIN_FAILING_SOURCES = 2  # distinct callers whose requests failed before the circuit opens
PROBE_BUSY_RETRY_AFTER = 1.0  # refused during a probe: the probe settles within one call


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Permit:
    """Leave to make one call, issued by `CircuitBreaker.acquire`. Report its outcome exactly once
    with `succeeded()`, `failed(error)` or `released()` (no outcome); later reports are ignored."""

    __slots__ = ("_breaker", "_generation", "probe", "_settled", "source")

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: bool, source: str | None = None):
        self._breaker, self._generation, self.probe, self.source = breaker, generation, probe, source
        self._settled = False

    def succeeded(self) -> None:
        self._settle("success")

    def failed(self, error: BaseException) -> None:
        """Counts only if `error` is a retryable GatewayError; anything else is neutral."""
        retryable = isinstance(error, GatewayError) and error.retryable
        self._settle("failure" if retryable else "neutral")

    def released(self) -> None:
        self._settle("neutral")

    def _settle(self, outcome: str) -> None:
        if not self._settled:
            self._settled = True
            self._breaker._settle(self._generation, self.probe, outcome, self.source)


class CircuitBreaker:
    """Thread-safe: one lock guards the state; no call is made while holding it."""

    def __init__(self, name: str, *, failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
                 cool_down: float = DEFAULT_COOL_DOWN_SECONDS, clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not cool_down > 0:
            raise ValueError("cool_down must be a positive number of seconds")
        self.name = name
        self.failure_threshold = failure_threshold
        self.cool_down = cool_down
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._generation = 0  # bumped on every state change: stale permits are recognised by it
        self._failures = 0  # consecutive retryable failures while closed
        self._sources: set = set()  # the callers those failures came from
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        """The state now (an open circuit whose cool-down is over reads, and becomes, half-open)."""
        with self._lock:
            self._refresh(self._clock())
            return self._state

    def snapshot(self) -> dict:
        """For /status: state, consecutive failures, seconds until a probe is let through."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            return {"state": self._state.value, "consecutive_failures": self._failures,
                    "retry_after": round(self._retry_after(now), 3) if self._state is not CircuitState.CLOSED else 0.0}

    def acquire(self, source: str | None = None) -> Permit:
        """A permit for one call, or CircuitOpen (with retry_after) if the circuit refuses it. `source` names
        the caller (an API key id or a client address): the circuit opens only on failures seen by at least
        MIN_FAILING_SOURCES callers, so one client whose own requests fail (a prompt that makes the upstream
        500, answers too long for the deadline) cannot switch a model off for everyone."""
        with self._lock:
            now = self._clock()
            self._refresh(now)
            if self._state is CircuitState.CLOSED:
                return Permit(self, self._generation, probe=False, source=source)
            if self._state is CircuitState.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return Permit(self, self._generation, probe=True, source=source)
            retry_after, state = self._retry_after(now), self._state
        raise CircuitOpen(
            f"model {self.name} is failing; the gateway is not calling it for a while",
            details={"model": self.name, "circuit": state.value}, retry_after=retry_after)

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` under a permit, its outcome reported: the simple way when nothing sits in between."""
        permit = self.acquire()
        try:
            result = fn()
        except GatewayError as error:
            permit.failed(error)
            raise
        except BaseException:  # not a provider outcome (a bug, KeyboardInterrupt): no verdict
            permit.released()
            raise
        permit.succeeded()
        return result

    # --- inside the lock -------------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        if self._state is CircuitState.OPEN and now >= self._opened_at + self.cool_down:
            self._change(CircuitState.HALF_OPEN)

    def _retry_after(self, now: float) -> float:
        if self._state is CircuitState.OPEN:
            return max(0.0, self._opened_at + self.cool_down - now)
        if self._state is CircuitState.HALF_OPEN:
            return PROBE_BUSY_RETRY_AFTER
        return 0.0

    def _settle(self, generation: int, probe: bool, outcome: str, source: str | None = None) -> None:
        with self._lock:
            if generation != self._generation:
                return  # admitted under an earlier state: proves nothing about this one
            if probe:
                self._probe_in_flight = False
                if outcome == "success":
                    self._change(CircuitState.CLOSED)
                elif outcome == "failure":
                    self._open()
                return  # neutral: stay half-open, the next caller probes
            if self._state is not CircuitState.CLOSED:
                return
            if outcome == "success":
                self._failures = 0
                self._sources.clear()
            elif outcome == "failure":
                self._failures += 1
                self._sources.add(source if source is not None else ("unnamed", self._failures))
                if self._failures >= self.failure_threshold and \
                        len(self._sources) >= min(MIN_FAILING_SOURCES, self.failure_threshold):
                    self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._change(CircuitState.OPEN)

    def _change(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        self._generation += 1
        self._probe_in_flight = False
        failures = self._failures
        if new is CircuitState.CLOSED:
            self._failures = 0
            self._sources.clear()
        level = logging.WARNING if new is CircuitState.OPEN else logging.INFO
        log.log(level, "circuit for model %s: %s -> %s", self.name, old.value, new.value,
                extra={"model": self.name, "circuit_state": new.value, "previous_state": old.value,
                       "consecutive_failures": failures,
                       "cool_down_seconds": self.cool_down if new is CircuitState.OPEN else None})
