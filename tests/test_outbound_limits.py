"""OutboundLimiter: the gateway's own requests/tokens-per-minute ceilings, through the real `limits` library.

`limits` reads `time.time()` inside its storages, so the tests that walk through a window put a
fake wall clock there (the `wall` fixture) and hand the limiter that clock's sleep: nothing
really waits. The thread tests run on real time with no waiting at all.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid

import pytest

from gateway.errors import UpstreamRateLimited
from gateway.providers.base import Completion, GenerationParams, Message, ProviderRequest
from gateway.providers.outbound_limits import OutboundLimiter, estimate_input_tokens, outbound_storage
from tests.fakes import FakeClock
from tests.support.marks import require_redis


@pytest.fixture
def wall(monkeypatch) -> FakeClock:
    """A fake wall clock, at the start of a minute, read by `limits` and advanced by the limiter's sleep."""
    clock = FakeClock(start=1_700_000_040.0)  # a multiple of 60: the sliding window's period starts here
    monkeypatch.setattr(time, "time", clock.now)
    return clock


def request(prompt_chars: int = 396, max_tokens: int | None = 300) -> ProviderRequest:
    return ProviderRequest(model="m", messages=(Message("user", "x" * prompt_chars),),
                           params=GenerationParams(max_tokens=max_tokens))


def limiter(clock: FakeClock, **options) -> OutboundLimiter:
    options.setdefault("max_wait", 0.0)
    return OutboundLimiter("openai", sleep=clock.sleep, clock=clock.now, **options)


def test_estimate_is_about_four_characters_a_token():
    assert estimate_input_tokens(request(prompt_chars=396)) == 99 + 1  # plus one per message
    two = ProviderRequest(model="m", messages=(Message("system", "abcd"), Message("user", "abcdefgh")))
    assert estimate_input_tokens(two) == 3 + 2


def test_requests_per_minute_ceiling_refuses_with_the_gateways_own_429(wall):
    outbound = limiter(wall, requests_per_minute=3)
    for _ in range(3):
        outbound.acquire(request(), seconds_left=30)
    wall.advance(20)
    with pytest.raises(UpstreamRateLimited) as refused:
        outbound.acquire(request(), seconds_left=30)
    error = refused.value
    assert error.status == 429 and error.code == "upstream_rate_limited"
    assert error.retryable is False  # final for this request: the limiter did the waiting
    assert error.retry_after == pytest.approx(40.0, abs=0.01)  # when the first of the three leaves the minute
    assert "gateway's own ceiling of 3 requests per minute for openai" in error.message
    assert error.details == {"scope": "openai", "ceiling": "requests_per_minute", "limit": 3, "source": "gateway"}
    assert wall.sleeps == []


def test_a_request_waits_when_the_window_frees_within_its_budget(wall):
    outbound = limiter(wall, requests_per_minute=2, max_wait=15.0)
    outbound.acquire(request(), seconds_left=30)
    wall.advance(50)
    outbound.acquire(request(), seconds_left=30)
    reservation = outbound.acquire(request(), seconds_left=30)  # the first leaves the window in 10 s
    assert wall.sleeps == [pytest.approx(10.0, abs=0.01)] and reservation.waited == pytest.approx(10.0, abs=0.01)


def test_no_wait_that_would_leave_the_call_too_little_of_its_deadline(wall):
    outbound = limiter(wall, requests_per_minute=1, max_wait=15.0, min_call_seconds=1.0)
    outbound.acquire(request(), seconds_left=30)
    wall.advance(50)  # the window frees in 10 s; only 10.5 - 1 = 9.5 s may be spent waiting
    with pytest.raises(UpstreamRateLimited) as refused:
        outbound.acquire(request(), seconds_left=10.5)
    assert refused.value.retry_after == pytest.approx(10.0, abs=0.01) and wall.sleeps == []
    outbound.acquire(request(), seconds_left=11.5)  # 10.5 s to wait in: it waits
    assert wall.sleeps == [pytest.approx(10.0, abs=0.01)]


def test_waits_are_bounded_by_max_wait(wall):
    outbound = limiter(wall, requests_per_minute=1, max_wait=5.0)
    outbound.acquire(request(), seconds_left=30)
    with pytest.raises(UpstreamRateLimited) as refused:
        outbound.acquire(request(), seconds_left=300)
    assert refused.value.retry_after == pytest.approx(60.0, abs=0.01) and wall.sleeps == []


def test_tokens_are_reserved_before_the_call_prompt_estimate_plus_max_tokens_up_to_the_assumed_answer(wall):
    outbound = limiter(wall, tokens_per_minute=1000)
    assert outbound.tokens_to_reserve(request(max_tokens=300)) == 100 + 300
    assert outbound.tokens_to_reserve(request(max_tokens=None)) == 100 + 512  # assumed_output_tokens
    # a huge max_tokens reserves no more than the assumed answer: one request cannot take the minute's ceiling
    assert outbound.tokens_to_reserve(request(max_tokens=1_000_000)) == 100 + 512
    first = outbound.acquire(request(), seconds_left=30)
    outbound.acquire(request(), seconds_left=30)
    assert first.tokens == 400 and outbound.snapshot()["tokens_left"] == 200
    with pytest.raises(UpstreamRateLimited) as refused:
        outbound.acquire(request(), seconds_left=30)
    assert refused.value.details["ceiling"] == "tokens_per_minute"
    # The 800 tokens move to the previous period in 60 s and fade out of the sliding minute:
    # room for 400 when 800 * (60 - t) / 60 <= 600, i.e. 15 s into the next period.
    assert refused.value.retry_after == pytest.approx(75.0, abs=0.01)
    assert "1000 tokens per minute" in refused.value.message


def test_the_computed_token_wait_is_what_the_library_agrees_to(wall):
    outbound = limiter(wall, tokens_per_minute=1000)
    outbound.acquire(request(), seconds_left=30)
    outbound.acquire(request(), seconds_left=30)
    wall.advance(74.9)
    with pytest.raises(UpstreamRateLimited) as refused:
        outbound.acquire(request(), seconds_left=30)
    assert refused.value.retry_after == pytest.approx(0.1, abs=0.01)
    wall.advance(0.11)
    outbound.acquire(request(), seconds_left=30)


def test_a_request_waiting_for_tokens_waits_the_computed_time_then_goes(wall):
    outbound = limiter(wall, tokens_per_minute=1000, max_wait=80.0)
    outbound.acquire(request(), seconds_left=30)
    outbound.acquire(request(), seconds_left=30)
    reservation = outbound.acquire(request(), seconds_left=100)
    assert wall.sleeps == [pytest.approx(75.0, abs=0.01)] and reservation.tokens == 400


def test_waiting_for_tokens_does_not_use_up_request_slots(wall):
    outbound = limiter(wall, requests_per_minute=10, tokens_per_minute=1000)
    outbound.acquire(request(), seconds_left=30)
    outbound.acquire(request(), seconds_left=30)
    for _ in range(5):
        with pytest.raises(UpstreamRateLimited):
            outbound.acquire(request(), seconds_left=30)
    assert outbound.snapshot()["requests_left"] == 8


def test_a_request_larger_than_the_whole_ceiling_is_charged_the_ceiling(wall):
    outbound = limiter(wall, tokens_per_minute=1000)
    assert outbound.acquire(request(prompt_chars=40_000, max_tokens=10**12), seconds_left=30).tokens == 1000
    with pytest.raises(UpstreamRateLimited):
        outbound.acquire(request(prompt_chars=0, max_tokens=0), seconds_left=30)


def test_settle_charges_usage_beyond_the_reservation_and_refunds_nothing(wall):
    outbound = limiter(wall, tokens_per_minute=1000)
    reservation = outbound.acquire(request(), seconds_left=30)  # 400
    outbound.settle(reservation, Completion(text="long", model="m", input_tokens=150, output_tokens=450))
    assert outbound.snapshot()["tokens_left"] == 400  # 1000 - 400 reserved - 200 beyond it
    small = outbound.acquire(request(), seconds_left=30)
    outbound.settle(small, Completion(text="short", model="m", input_tokens=20, output_tokens=5))
    assert outbound.snapshot()["tokens_left"] == 0  # not given back: errs on the side of the quota
    outbound.settle(small, Completion(text="?", model="m"))  # no usage reported: the reservation stands
    outbound.settle(small, input_tokens=-5, output_tokens=True)  # nonsense usage is not believed
    assert outbound.snapshot()["tokens_left"] == 0


def test_an_excess_that_does_not_fit_is_charged_as_far_as_it_fits(wall):
    outbound = limiter(wall, tokens_per_minute=1000)
    reservation = outbound.acquire(request(), seconds_left=30)
    outbound.settle(reservation, input_tokens=10**9, output_tokens=10**9)  # a lying usage report
    assert outbound.snapshot()["tokens_left"] == 0


def test_without_ceilings_nothing_is_counted_or_refused(wall):
    outbound = limiter(wall)
    assert outbound.enabled is False
    for _ in range(1000):
        assert outbound.acquire(request(), seconds_left=30).tokens == 0
    assert outbound.snapshot() == {"scope": "openai", "requests_per_minute": None, "tokens_per_minute": None,
                                   "requests_left": None, "tokens_left": None}


@pytest.mark.parametrize("options", [
    {"requests_per_minute": 0}, {"tokens_per_minute": -1}, {"requests_per_minute": 2.5},
    {"requests_per_minute": True}, {"max_wait": -1}, {"max_wait": float("nan")},
])
def test_nonsense_settings_are_refused(options):
    with pytest.raises(ValueError):
        OutboundLimiter("openai", **options)


def test_scopes_count_apart_on_one_storage(wall):
    storage = outbound_storage("memory://")
    openai = OutboundLimiter("openai", requests_per_minute=1, storage=storage, max_wait=0)
    anthropic = OutboundLimiter("anthropic", requests_per_minute=1, storage=storage, max_wait=0)
    openai.acquire(request(), seconds_left=30)
    anthropic.acquire(request(), seconds_left=30)
    with pytest.raises(UpstreamRateLimited):
        openai.acquire(request(), seconds_left=30)


def run_in_threads(outbound_limiters, threads: int, tries: int) -> tuple[int, int]:
    start = threading.Barrier(threads)
    counts = {"through": 0, "refused": 0}
    lock = threading.Lock()

    def worker(index):
        outbound = outbound_limiters[index % len(outbound_limiters)]
        start.wait()
        for _ in range(tries):
            try:
                outbound.acquire(request(), seconds_left=30)
                outcome = "through"
            except UpstreamRateLimited:
                outcome = "refused"
            with lock:
                counts[outcome] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=30)
    return counts["through"], counts["refused"]


def never_sleep(seconds: float) -> None:
    raise AssertionError(f"the limiter slept {seconds} s with max_wait=0")


def test_requests_per_minute_is_exact_under_threads():
    outbound = OutboundLimiter("openai", requests_per_minute=25, max_wait=0, sleep=never_sleep)
    assert run_in_threads([outbound], threads=8, tries=10) == (25, 55)


def test_tokens_per_minute_never_lets_more_through_under_threads():
    outbound = OutboundLimiter("openai", tokens_per_minute=4000, max_wait=0, sleep=never_sleep)  # 10 x 400
    through, refused = run_in_threads([outbound], threads=8, tries=10)
    assert through + refused == 80 and 8 <= through <= 10  # a lost race refuses, it never over-admits


def test_a_storage_that_fails_lets_the_call_through_with_a_warning(caplog):
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]  # closed again below: nothing listens there
    storage = outbound_storage(f"redis://127.0.0.1:{port}")
    outbound = OutboundLimiter("openai", requests_per_minute=1, storage=storage, max_wait=0)
    caplog.set_level(logging.WARNING, logger="gateway.outbound")
    for _ in range(3):
        assert outbound.acquire(request(), seconds_left=30).tokens == 0
    assert len(caplog.records) == 3 and "goes through unlimited" in caplog.records[0].getMessage()
    assert outbound.snapshot()["storage"] == "unavailable"


def test_a_redis_that_never_answers_costs_at_most_its_timeout(caplog):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections (backlog), never answers
        storage = outbound_storage(f"redis://127.0.0.1:{silent.getsockname()[1]}?socket_timeout=0.2")
        outbound = OutboundLimiter("openai", requests_per_minute=1, storage=storage, max_wait=0)
        started = time.monotonic()
        assert outbound.acquire(request(), seconds_left=30).tokens == 0  # let through, unlimited
        assert time.monotonic() - started < 5
    assert "goes through unlimited" in caplog.text


@pytest.fixture
def redis_uri():
    return require_redis("the shared-ceiling tests")


def test_two_workers_share_one_ceiling_through_redis(redis_uri):
    scope = f"test-{uuid.uuid4().hex}"  # Redis outlives the test: fresh counters for each run
    first = OutboundLimiter(scope, requests_per_minute=3, tokens_per_minute=1000,
                            storage=outbound_storage(redis_uri), max_wait=0, sleep=never_sleep)
    second = OutboundLimiter(scope, requests_per_minute=3, tokens_per_minute=1000,
                             storage=outbound_storage(redis_uri), max_wait=0, sleep=never_sleep)
    first.acquire(request(), seconds_left=30)
    second.acquire(request(), seconds_left=30)  # 800 of the 1000 tokens are now taken, by both workers
    with pytest.raises(UpstreamRateLimited) as refused:
        first.acquire(request(), seconds_left=30)
    assert refused.value.details["ceiling"] == "tokens_per_minute" and 0 < refused.value.retry_after <= 120
    first.acquire(request(prompt_chars=0, max_tokens=150), seconds_left=30)  # 151 tokens still fit
    with pytest.raises(UpstreamRateLimited) as refused:
        second.acquire(request(prompt_chars=0, max_tokens=0), seconds_left=30)
    assert refused.value.details["ceiling"] == "requests_per_minute" and 0 < refused.value.retry_after <= 60
    assert second.snapshot()["requests_left"] == 0


def test_requests_per_minute_is_exact_across_workers_and_threads_through_redis(redis_uri):
    scope = f"test-{uuid.uuid4().hex}"
    workers = [OutboundLimiter(scope, requests_per_minute=20, storage=outbound_storage(redis_uri),
                               max_wait=0, sleep=never_sleep) for _ in range(2)]
    assert run_in_threads(workers, threads=6, tries=6) == (20, 16)
