"""RetryPolicy: which failures are retried, how long it waits, and the deadline over it all."""

from __future__ import annotations

import logging

import pytest

from gateway.errors import (
    ContentBlocked,
    UpstreamBadAnswer,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers.retry_policy import RetryPolicy
from tests.fakes import FakeClock


def make_policy(clock: FakeClock, **overrides) -> RetryPolicy:
    options = {"max_attempts": 5, "min_wait": 1.0, "max_wait": 60.0, "deadline": 30.0,
               "sleep": clock.sleep, "clock": clock.now, "jitter": lambda: 0.5}
    options.update(overrides)
    return RetryPolicy(**options)


class Script:
    """A provider call that fails with the given errors in turn, then answers."""

    def __init__(self, *failures, answer="ok", clock: FakeClock | None = None, takes: float = 0.0):
        self.failures = list(failures)
        self.answer = answer
        self.calls: list[float] = []
        self.clock, self.takes = clock, takes

    def __call__(self, seconds_left: float):
        self.calls.append(seconds_left)
        if self.clock:
            self.clock.advance(self.takes)
        if self.failures:
            failure = self.failures.pop(0)
            raise failure() if isinstance(failure, type) else failure
        return self.answer


def test_rate_limit_twice_then_success_waits_exponentially():
    clock = FakeClock()
    call = Script(UpstreamRateLimited("slow down"), UpstreamRateLimited("slow down"))
    assert make_policy(clock).run(call) == "ok"
    assert len(call.calls) == 3
    assert clock.sleeps == [1.5, 2.5]  # 1 s, 2 s, each plus jitter (0.5 x min_wait)


@pytest.mark.parametrize("error", [UpstreamUnavailable("500"), UpstreamTimeout("slow")])
def test_transient_faults_are_retried(error):
    clock = FakeClock()
    call = Script(error)
    assert make_policy(clock).run(call) == "ok"
    assert len(call.calls) == 2


@pytest.mark.parametrize("error", [
    UpstreamRejected("400"), UpstreamRejected("401"), UpstreamRejected("404"),
    ContentBlocked("safety"), UpstreamBadAnswer("not json"),
])
def test_permanent_failures_are_not_retried(error):
    clock = FakeClock()
    call = Script(error)
    with pytest.raises(type(error)):
        make_policy(clock).run(call)
    assert len(call.calls) == 1
    assert clock.sleeps == []


def test_gives_up_after_max_attempts_with_the_last_error():
    clock = FakeClock()
    call = Script(*[UpstreamUnavailable("HTTP 503")] * 10)
    with pytest.raises(UpstreamUnavailable):
        make_policy(clock, deadline=1000).run(call)
    assert len(call.calls) == 5
    assert clock.sleeps == [1.5, 2.5, 4.5, 8.5]


def test_waits_are_capped_at_max_wait():
    clock = FakeClock()
    policy = make_policy(clock, max_wait=3.0)
    assert [policy.wait_before(n, None) for n in (1, 2, 3, 4, 5)] == [1.5, 2.5, 3.0, 3.0, 3.0]


def test_jitter_stays_within_one_min_wait():
    policy = RetryPolicy(min_wait=1.0, max_wait=60.0)
    waits = [policy.wait_before(3, None) for _ in range(200)]
    assert all(4.0 <= wait <= 5.0 for wait in waits)
    assert len(set(waits)) > 1


def test_server_retry_delay_replaces_the_exponential_wait():
    clock = FakeClock()
    call = Script(UpstreamRateLimited("quota", retry_after=7.0))
    assert make_policy(clock).run(call) == "ok"
    assert clock.sleeps == [7.0]


def test_server_retry_delay_is_capped_by_max_wait():
    clock = FakeClock()
    call = Script(UpstreamRateLimited("quota", retry_after=600))
    make_policy(clock, deadline=1000).run(call)
    assert clock.sleeps == [60.0]


def test_steady_rate_limit_ends_with_429_within_the_deadline():
    clock = FakeClock()
    start = clock.now()
    call = Script(*[UpstreamRateLimited("quota", retry_after=4.0)] * 20, clock=clock, takes=0.1)
    with pytest.raises(UpstreamRateLimited) as caught:
        make_policy(clock, deadline=10.0, max_attempts=50).run(call)
    assert clock.now() - start <= 10.0
    assert caught.value.retry_after == 4.0
    assert len(call.calls) == 3  # 0.1 + 4 + 0.1 + 4 + 0.1 = 8.3 s; one more wait would pass 10 s


def test_rate_limit_without_a_hint_still_tells_the_client_when_to_retry():
    clock = FakeClock()
    call = Script(*[UpstreamRateLimited("quota")] * 5)
    with pytest.raises(UpstreamRateLimited) as caught:
        make_policy(clock, deadline=1000).run(call)
    assert caught.value.retry_after and caught.value.retry_after > 0


def test_deadline_turns_a_run_of_server_errors_into_a_timeout():
    clock = FakeClock()
    call = Script(*[UpstreamUnavailable("HTTP 500")] * 20, clock=clock, takes=2.0)
    with pytest.raises(UpstreamTimeout) as caught:
        make_policy(clock, deadline=10.0).run(call)
    assert caught.value.status == 504
    assert isinstance(caught.value.__cause__, UpstreamUnavailable)
    assert clock.now() - 1000.0 <= 10.0


def test_each_attempt_gets_only_the_time_left():
    clock = FakeClock()
    call = Script(UpstreamTimeout("t"), UpstreamTimeout("t"), clock=clock, takes=3.0)
    make_policy(clock, deadline=20.0).run(call)
    # attempt 1 at t=0 (20 s left), attempt 2 at 3 + 1.5 = 4.5, attempt 3 at 4.5 + 3 + 2.5 = 10
    assert call.calls == [20.0, 15.5, 10.0]


def test_each_retry_is_logged_with_attempt_and_wait(caplog):
    clock = FakeClock()
    call = Script(UpstreamRateLimited("quota"), UpstreamUnavailable("HTTP 500"))
    with caplog.at_level(logging.WARNING, logger="gateway.retry"):
        make_policy(clock).run(call, label="gemini text call")
    retries = [record for record in caplog.records if record.name == "gateway.retry"]
    assert [record.attempt for record in retries] == [1, 2]
    assert [record.wait_seconds for record in retries] == [1.5, 2.5]
    assert "attempt 1 failed with UpstreamRateLimited" in retries[0].getMessage()
    assert "waiting 1.50 s" in retries[0].getMessage()


def test_a_first_attempt_that_succeeds_never_enters_tenacity(monkeypatch):
    """The common case stays off tenacity (its per-call setup measured 31 µs against 2 µs)."""
    from gateway.providers import retry_policy

    def no_tenacity(*args, **kwargs):
        raise AssertionError("tenacity was set up for a call that succeeded at once")

    monkeypatch.setattr(retry_policy, "Retrying", no_tenacity)
    clock = FakeClock()
    call = Script()
    assert make_policy(clock).run(call) == "ok"
    assert call.calls == [30.0] and clock.sleeps == []
    with pytest.raises(UpstreamRejected):  # a permanent failure does not need it either
        make_policy(clock).run(Script(UpstreamRejected("400")))


def test_a_failure_that_is_not_ours_is_raised_as_it_is_without_retry():
    clock = FakeClock()
    call = Script(KeyError("candidates"))
    with pytest.raises(KeyError):
        make_policy(clock).run(call)
    assert len(call.calls) == 1 and clock.sleeps == []


def test_one_attempt_gives_up_after_the_first_failure_and_still_says_when_to_retry():
    clock = FakeClock()
    call = Script(UpstreamRateLimited("quota"), UpstreamRateLimited("quota"))
    with pytest.raises(UpstreamRateLimited) as caught:
        make_policy(clock, max_attempts=1).run(call)
    assert len(call.calls) == 1 and clock.sleeps == []
    assert caught.value.retry_after == 1.5  # the wait we would have made: 1 s plus jitter


def test_a_deadline_spent_before_the_first_attempt_calls_nothing():
    clock = FakeClock()
    call = Script()
    with pytest.raises(UpstreamTimeout) as caught:
        make_policy(clock, deadline=0.0).run(call, label="gemini text call")
    assert call.calls == [] and clock.sleeps == []
    assert "gemini text call ran out of its 0 s deadline" in caught.value.message


def test_the_first_attempt_counts_as_attempt_one_of_the_retries():
    """The first failure happens before tenacity; tenacity still numbers, waits for and reports it as attempt 1."""
    clock = FakeClock()
    retried = []
    call = Script(UpstreamUnavailable("HTTP 503"), UpstreamUnavailable("HTTP 503"), UpstreamUnavailable("HTTP 503"))
    with pytest.raises(UpstreamUnavailable) as caught:
        make_policy(clock, max_attempts=3, on_retry=lambda attempt, wait: retried.append((attempt, wait))).run(call)
    assert len(call.calls) == 3 and retried == [(1, 1.5), (2, 2.5)] and clock.sleeps == [1.5, 2.5]
    assert caught.value.__context__ is None  # the last error is not chained to the first one
