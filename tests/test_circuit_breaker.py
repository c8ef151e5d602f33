"""CircuitBreaker: closed -> open -> half-open (one probe) -> closed or open again, on a fake clock."""

from __future__ import annotations

import logging
import threading

import pytest

from gateway.errors import (
    CircuitOpen,
    ContentBlocked,
    InvalidRequest,
    UpstreamBadAnswer,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers.circuit_breaker import CircuitBreaker, CircuitState
from tests.fakes import FakeClock


def make_breaker(clock: FakeClock, **overrides) -> CircuitBreaker:
    options = {"failure_threshold": 3, "cool_down": 30.0, "clock": clock.now}
    options.update(overrides)
    return CircuitBreaker("gemini-flash", **options)


def fail(breaker: CircuitBreaker, error: Exception | None = None) -> None:
    breaker.acquire().failed(error or UpstreamUnavailable("HTTP 503"))


def succeed(breaker: CircuitBreaker) -> None:
    breaker.acquire().succeeded()


def test_opens_after_the_threshold_of_consecutive_retryable_failures():
    clock = FakeClock()
    breaker = make_breaker(clock)
    fail(breaker, UpstreamUnavailable("503"))
    fail(breaker, UpstreamRateLimited("429"))
    assert breaker.state is CircuitState.CLOSED
    fail(breaker, UpstreamTimeout("slow"))
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.status == 503 and refused.value.code == "circuit_open"
    assert refused.value.retryable is False
    assert refused.value.retry_after == pytest.approx(30.0)
    assert refused.value.details == {"model": "gemini-flash", "circuit": "open"}


def test_a_success_resets_the_count_of_consecutive_failures():
    clock = FakeClock()
    breaker = make_breaker(clock)
    fail(breaker)
    fail(breaker)
    succeed(breaker)
    fail(breaker)
    fail(breaker)
    assert breaker.state is CircuitState.CLOSED
    fail(breaker)
    assert breaker.state is CircuitState.OPEN


@pytest.mark.parametrize("error", [
    InvalidRequest("bad field"), ContentBlocked("safety"), UpstreamRejected("HTTP 400"),
    UpstreamBadAnswer("garbled"), ValueError("not even ours"),
])
def test_non_retryable_outcomes_neither_count_nor_reset(error):
    clock = FakeClock()
    breaker = make_breaker(clock)
    fail(breaker)
    fail(breaker)
    for _ in range(10):
        fail(breaker, error)
    assert breaker.state is CircuitState.CLOSED and breaker.snapshot()["consecutive_failures"] == 2
    fail(breaker)  # the third retryable failure in a row: the 400s in between did not reset the count
    assert breaker.state is CircuitState.OPEN


def test_retry_after_counts_down_and_the_cool_down_leads_to_half_open():
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(3):
        fail(breaker)
    clock.advance(20.0)
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_after == pytest.approx(10.0)
    assert breaker.snapshot() == {"state": "open", "consecutive_failures": 3, "retry_after": 10.0}
    clock.advance(10.0)
    assert breaker.state is CircuitState.HALF_OPEN


def test_half_open_lets_exactly_one_probe_through_and_its_success_closes():
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(3):
        fail(breaker)
    clock.advance(30.0)
    probe = breaker.acquire()
    assert probe.probe is True
    with pytest.raises(CircuitOpen) as refused:  # a second caller while the probe is in flight
        breaker.acquire()
    assert refused.value.details["circuit"] == "half_open" and refused.value.retry_after > 0
    probe.succeeded()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.snapshot() == {"state": "closed", "consecutive_failures": 0, "retry_after": 0.0}
    assert breaker.acquire().probe is False


def test_a_failed_probe_reopens_for_a_whole_new_cool_down():
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(3):
        fail(breaker)
    clock.advance(31.0)
    breaker.acquire().failed(UpstreamUnavailable("still down"))
    assert breaker.state is CircuitState.OPEN
    clock.advance(29.0)
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_after == pytest.approx(1.0)
    clock.advance(1.0)
    assert breaker.acquire().probe is True


def test_a_probe_without_verdict_frees_the_slot_for_the_next_caller():
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(3):
        fail(breaker)
    clock.advance(30.0)
    breaker.acquire().failed(UpstreamRejected("HTTP 400"))  # neutral: says nothing about the upstream
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.acquire().released()  # e.g. the outbound limiter refused before the call
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.acquire().succeeded()
    assert breaker.state is CircuitState.CLOSED


def test_outcomes_of_calls_admitted_before_the_state_changed_are_ignored():
    clock = FakeClock()
    breaker = make_breaker(clock)
    slow_ok, slow_failing = breaker.acquire(), breaker.acquire()
    for _ in range(3):
        fail(breaker)
    slow_ok.succeeded()  # a late success does not close an open circuit without a probe
    assert breaker.state is CircuitState.OPEN
    clock.advance(30.0)
    probe = breaker.acquire()
    slow_failing.failed(UpstreamUnavailable("late"))  # nor does a late failure settle the probe
    assert breaker.state is CircuitState.HALF_OPEN
    probe.succeeded()
    assert breaker.state is CircuitState.CLOSED


def test_a_permit_reports_once():
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=2)
    permit = breaker.acquire()
    permit.failed(UpstreamUnavailable("503"))
    permit.failed(UpstreamUnavailable("503"))  # ignored: one call, one outcome
    assert breaker.state is CircuitState.CLOSED


def test_call_reports_the_outcome_of_the_function():
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=1)
    assert breaker.call(lambda: "answer") == "answer"

    def boom():
        raise RuntimeError("a bug, not an upstream failure")

    with pytest.raises(RuntimeError):
        breaker.call(boom)
    assert breaker.state is CircuitState.CLOSED

    def unavailable():
        raise UpstreamUnavailable("503")

    with pytest.raises(UpstreamUnavailable):
        breaker.call(unavailable)
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpen):
        breaker.call(lambda: "never called")


def test_each_state_change_is_logged_once_with_model_and_state(caplog):
    clock = FakeClock()
    breaker = make_breaker(clock)
    caplog.set_level(logging.INFO, logger="gateway.circuit")
    for permit in [breaker.acquire() for _ in range(5)]:  # two failures more than needed: one "open" line
        permit.failed(UpstreamUnavailable("503"))
    for _ in range(3):
        with pytest.raises(CircuitOpen):
            breaker.acquire()
    clock.advance(30.0)
    for _ in range(3):
        assert breaker.state is CircuitState.HALF_OPEN  # read many times: logged once
    breaker.acquire().failed(UpstreamUnavailable("still down"))
    clock.advance(30.0)
    breaker.acquire().succeeded()
    succeed(breaker)
    changes = [(r.model, r.previous_state, r.circuit_state, r.levelname) for r in caplog.records]
    assert changes == [
        ("gemini-flash", "closed", "open", "WARNING"),
        ("gemini-flash", "open", "half_open", "INFO"),
        ("gemini-flash", "half_open", "open", "WARNING"),
        ("gemini-flash", "open", "half_open", "INFO"),
        ("gemini-flash", "half_open", "closed", "INFO"),
    ]
    assert "gemini-flash" in caplog.records[0].getMessage() and "open" in caplog.records[0].getMessage()


def test_concurrent_callers_in_half_open_get_exactly_one_probe():
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(3):
        fail(breaker)
    clock.advance(30.0)
    start = threading.Barrier(16)
    permits, refusals = [], []
    lock = threading.Lock()

    def caller():
        start.wait()
        try:
            permit = breaker.acquire()
        except CircuitOpen as refused:
            with lock:
                refusals.append(refused)
        else:
            with lock:
                permits.append(permit)

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(permits) == 1 and permits[0].probe is True and len(refusals) == 15
    permits[0].succeeded()
    assert breaker.state is CircuitState.CLOSED


def test_concurrent_failures_open_the_circuit_once(caplog):
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=50)
    caplog.set_level(logging.INFO, logger="gateway.circuit")
    permits = [breaker.acquire() for _ in range(200)]
    start = threading.Barrier(8)

    def report(share):
        start.wait()
        for permit in share:
            permit.failed(UpstreamUnavailable("503"))

    threads = [threading.Thread(target=report, args=(permits[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert breaker.state is CircuitState.OPEN
    assert [r.circuit_state for r in caplog.records] == ["open"]


@pytest.mark.parametrize("options", [{"failure_threshold": 0}, {"cool_down": 0}, {"cool_down": float("nan")}])
def test_nonsense_settings_are_refused(options):
    with pytest.raises(ValueError):
        make_breaker(FakeClock(), **options)


def test_one_callers_failures_alone_never_open_the_circuit():
    """A client whose own requests fail (a prompt that makes the upstream 500, answers too long for the
    deadline) must not switch the model off for everyone: the circuit opens only when the failures in a row
    came from at least two callers."""
    from gateway.errors import UpstreamTimeout

    clock = FakeClock()
    breaker = CircuitBreaker("m", failure_threshold=3, cool_down=30, clock=clock.now)
    for _ in range(10):
        breaker.acquire("key:attacker").failed(UpstreamTimeout("too long"))
    assert breaker.state is CircuitState.CLOSED
    breaker.acquire("key:someone-else").failed(UpstreamTimeout("the model is down"))
    assert breaker.state is CircuitState.OPEN
