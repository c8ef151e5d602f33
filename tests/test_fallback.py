"""FallbackChain: model order, retries per model, breakers, outbound ceilings, one shared deadline.

The providers here are scripted stand-ins at the I/O boundary (the Provider protocol: one
attempt per call, GatewayErrors only); the chain, the retry policy, the breakers and the
limiters above them are the real ones, on a FakeClock.
"""

from __future__ import annotations

import time

import pytest

from gateway.errors import (
    CircuitOpen,
    ContentBlocked,
    InvalidRequest,
    UpstreamBadAnswer,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers.base import Chunk, Completion, GenerationParams, Message, ProviderRequest
from gateway.providers.circuit_breaker import CircuitBreaker, CircuitState
from gateway.providers.fallback import Candidate, ChainAnswer, FailedModel, FallbackChain, falls_back
from gateway.providers.outbound_limits import OutboundLimiter
from gateway.providers.retry_policy import RetryPolicy
from tests.fakes import FakeClock


class ScriptedStream:
    def __init__(self, items):
        self.items = list(items)
        self.closed = False

    def __iter__(self):
        for item in self.items:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self.closed = True


class ScriptedProvider:
    """Answers or fails as scripted, one outcome per call (the last one repeats)."""

    def __init__(self, name: str, *outcomes, clock: FakeClock | None = None, takes: float = 0.0):
        self.name = name
        self.outcomes = list(outcomes) or ["ok"]
        self.clock, self.takes = clock, takes
        self.calls: list[tuple[ProviderRequest, float]] = []
        self.streams: list[ScriptedStream] = []

    def _next(self, request, seconds_left):
        self.calls.append((request, seconds_left))
        if self.clock:
            self.clock.advance(min(self.takes, seconds_left))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, type):
            outcome = outcome(f"scripted {outcome.__name__}")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def complete(self, request, seconds_left):
        text = self._next(request, seconds_left)
        return Completion(text=text, model=request.model, input_tokens=10, output_tokens=20)

    def open_stream(self, request, seconds_left):
        stream = ScriptedStream(self._next(request, seconds_left))
        self.streams.append(stream)
        return stream

    def close(self):
        pass


def make_policy(clock: FakeClock, **overrides) -> RetryPolicy:
    options = {"max_attempts": 3, "min_wait": 1.0, "max_wait": 60.0, "deadline": 30.0,
               "sleep": clock.sleep, "clock": clock.now, "jitter": lambda: 0.0}
    options.update(overrides)
    return RetryPolicy(**options)


def build(candidate: Candidate) -> ProviderRequest:
    return ProviderRequest(model=candidate.upstream, messages=(Message("user", "hello"),),
                           params=GenerationParams(max_tokens=100))


def candidate(model_id: str, provider: ScriptedProvider, **parts) -> Candidate:
    return Candidate(model_id, provider, upstream=f"{model_id}-upstream", **parts)


def test_the_first_model_answers_without_fallback():
    clock = FakeClock()
    first, second = ScriptedProvider("gemini", "first answer"), ScriptedProvider("openai")
    answer = FallbackChain(make_policy(clock)).complete(
        [candidate("gemini-flash", first), candidate("gpt-mini", second)], build)
    assert answer == ChainAnswer(Completion("first answer", "gemini-flash-upstream", 10, 20),
                                 "gemini-flash", "gemini", ())
    assert answer.fallback_used is False and second.calls == []
    assert first.calls[0][0].model == "gemini-flash-upstream"


def test_retries_are_spent_on_a_model_before_the_next_is_asked():
    clock = FakeClock()
    failing = ScriptedProvider("gemini", UpstreamUnavailable)
    fallback = ScriptedProvider("openai", "from the fallback")
    answer = FallbackChain(make_policy(clock)).complete(
        [candidate("gemini-flash", failing), candidate("gpt-mini", fallback)], build)
    assert len(failing.calls) == 3 and clock.sleeps == [1.0, 2.0]
    assert answer.model_id == "gpt-mini" and answer.provider == "openai" and answer.fallback_used
    assert answer.completion.text == "from the fallback" and answer.completion.model == "gpt-mini-upstream"
    assert answer.failed == (FailedModel("gemini-flash", "upstream_unavailable", 502),)


def test_models_are_tried_in_order_until_one_answers():
    clock = FakeClock()
    providers = [ScriptedProvider("a", UpstreamRateLimited("429", retry_after=120)),
                 ScriptedProvider("b", UpstreamTimeout), ScriptedProvider("c", UpstreamBadAnswer),
                 ScriptedProvider("d", "d answers"), ScriptedProvider("e", "never asked")]
    chain = FallbackChain(make_policy(clock, max_attempts=1))
    answer = chain.complete([candidate(p.name, p) for p in providers], build)
    assert answer.model_id == "d" and providers[4].calls == []
    assert [(f.model_id, f.code) for f in answer.failed] == [
        ("a", "upstream_rate_limited"), ("b", "upstream_timeout"), ("c", "upstream_bad_answer")]


def test_a_bad_answer_is_not_retried_on_the_same_model_but_falls_back():
    clock = FakeClock()
    garbled, fine = ScriptedProvider("a", UpstreamBadAnswer), ScriptedProvider("b", "fine")
    answer = FallbackChain(make_policy(clock)).complete([candidate("a", garbled), candidate("b", fine)], build)
    assert len(garbled.calls) == 1 and answer.model_id == "b"


@pytest.mark.parametrize("stopper", [
    UpstreamRejected("HTTP 400"), UpstreamRejected("HTTP 401"), ContentBlocked("safety"),
    InvalidRequest("max_tokens too large for this model"),
])
def test_a_request_or_account_problem_stops_the_chain(stopper):
    clock = FakeClock()
    first, second = ScriptedProvider("a", UpstreamUnavailable), ScriptedProvider("b", stopper)
    third = ScriptedProvider("c", "never asked")
    with pytest.raises(type(stopper)) as stopped:
        FallbackChain(make_policy(clock, max_attempts=1)).complete(
            [candidate("a", first), candidate("b", second), candidate("c", third)], build)
    assert stopped.value is stopper and len(second.calls) == 1 and third.calls == []
    assert stopped.value.details["failed_models"] == [{"model": "a", "code": "upstream_unavailable"}]


def test_which_errors_fall_back():
    assert all(falls_back(e("x")) for e in (UpstreamRateLimited, UpstreamUnavailable, UpstreamTimeout,
                                             CircuitOpen, UpstreamBadAnswer, UpstreamError))
    assert not any(falls_back(e("x")) for e in (UpstreamRejected, ContentBlocked, InvalidRequest))
    assert not falls_back(ValueError("not ours"))


def test_an_open_breaker_skips_its_model_without_calling_it():
    clock = FakeClock()
    breaker = CircuitBreaker("a", failure_threshold=1, cool_down=30, clock=clock.now)
    breaker.acquire().failed(UpstreamUnavailable("503"))
    skipped, fallback = ScriptedProvider("a", "never asked"), ScriptedProvider("b", "b answers")
    answer = FallbackChain(make_policy(clock)).complete(
        [candidate("a", skipped, breaker=breaker), candidate("b", fallback)], build)
    assert skipped.calls == [] and clock.sleeps == []
    assert answer.failed == (FailedModel("a", "circuit_open", 503),) and answer.model_id == "b"


def test_the_breaker_hears_one_verdict_per_request_not_one_per_retry():
    clock = FakeClock()
    breaker = CircuitBreaker("a", failure_threshold=2, cool_down=30, clock=clock.now)
    failing, fallback = ScriptedProvider("a", UpstreamUnavailable), ScriptedProvider("b", "b answers")
    chain = FallbackChain(make_policy(clock, max_attempts=3))
    answer = chain.complete([candidate("a", failing, breaker=breaker), candidate("b", fallback)], build)
    # one request's three failed attempts are one failure: a blip retried by one request opens nothing
    assert len(failing.calls) == 3 and breaker.state is CircuitState.CLOSED
    assert answer.failed == (FailedModel("a", "upstream_unavailable", 502),)
    chain.complete([candidate("a", failing, breaker=breaker), candidate("b", fallback)], build)
    assert len(failing.calls) == 6 and breaker.state is CircuitState.OPEN  # the second failed request opens it
    answer = chain.complete([candidate("a", failing, breaker=breaker), candidate("b", fallback)], build)
    assert len(failing.calls) == 6 and answer.failed == (FailedModel("a", "circuit_open", 503),)  # skipped
    clock.advance(30)  # cool-down over: the next request's first attempt is the probe
    failing.outcomes = ["recovered"]
    answer = chain.complete([candidate("a", failing, breaker=breaker), candidate("b", fallback)], build)
    assert answer.model_id == "a" and breaker.state is CircuitState.CLOSED


def test_a_stopping_error_is_neutral_for_the_breaker():
    clock = FakeClock()
    breaker = CircuitBreaker("a", failure_threshold=1, cool_down=30, clock=clock.now)
    rejecting = ScriptedProvider("a", UpstreamRejected)
    with pytest.raises(UpstreamRejected):
        FallbackChain(make_policy(clock)).complete([candidate("a", rejecting, breaker=breaker)], build)
    assert breaker.state is CircuitState.CLOSED


def test_the_gateways_own_ceiling_falls_back_at_once_and_is_not_the_upstreams_failure():
    clock = FakeClock()
    breaker = CircuitBreaker("a", failure_threshold=1, cool_down=30, clock=clock.now)
    limiter = OutboundLimiter("a", requests_per_minute=1, max_wait=0, sleep=clock.sleep, clock=clock.now)
    limited, fallback = ScriptedProvider("a", "a answers"), ScriptedProvider("b", "b answers")
    chain = FallbackChain(make_policy(clock))
    models = [candidate("a", limited, breaker=breaker, limiter=limiter), candidate("b", fallback)]
    assert chain.complete(models, build).model_id == "a"
    answer = chain.complete(models, build)  # a's one request a minute is spent
    assert answer.model_id == "b" and answer.failed == (FailedModel("a", "upstream_rate_limited", 429),)
    assert len(limited.calls) == 1 and clock.sleeps == []  # no retry sleeping on top of the limiter's refusal
    assert breaker.state is CircuitState.CLOSED and breaker.snapshot()["consecutive_failures"] == 0


def test_a_limiter_refusal_releases_a_half_open_probe():
    clock = FakeClock()
    breaker = CircuitBreaker("a", failure_threshold=1, cool_down=30, clock=clock.now)
    breaker.acquire().failed(UpstreamUnavailable("503"))
    clock.advance(30)
    limiter = OutboundLimiter("a", requests_per_minute=1, max_wait=0, sleep=clock.sleep, clock=clock.now)
    limiter.acquire(build(candidate("a", ScriptedProvider("a"))), seconds_left=30)  # the ceiling is reached
    with pytest.raises(UpstreamRateLimited):
        FallbackChain(make_policy(clock)).complete(
            [candidate("a", ScriptedProvider("a"), breaker=breaker, limiter=limiter)], build)
    assert breaker.acquire().probe is True  # the probe slot was given back, not stuck "in flight"


def test_usage_is_charged_to_the_ceiling_after_the_answer():
    clock = FakeClock()
    limiter = OutboundLimiter("a", tokens_per_minute=10_000, max_wait=0, sleep=clock.sleep, clock=clock.now)
    provider = ScriptedProvider("a", "answer")
    provider.complete = lambda request, seconds_left: Completion("answer", "a", input_tokens=500, output_tokens=900)
    FallbackChain(make_policy(clock)).complete([candidate("a", provider, limiter=limiter)], build)
    assert limiter.snapshot()["tokens_left"] == 10_000 - 1400  # reserved 3 + 100, then charged the rest


def test_one_deadline_for_the_whole_chain_each_model_gets_what_is_left():
    clock = FakeClock()
    slow = ScriptedProvider("a", UpstreamUnavailable, clock=clock, takes=12.0)
    fallback = ScriptedProvider("b", "b answers", clock=clock, takes=1.0)
    answer = FallbackChain(make_policy(clock, max_attempts=2)).complete(
        [candidate("a", slow), candidate("b", fallback)], build)
    # a gets half of the 30 s (two models): 12 s, a 1 s wait, the 2 s left; b gets the other 15
    assert [seconds for _, seconds in slow.calls] == [15.0, 2.0]
    assert [seconds for _, seconds in fallback.calls] == [15.0]
    assert answer.model_id == "b" and answer.failed == (FailedModel("a", "upstream_unavailable", 502),)


def test_a_first_model_that_hangs_leaves_the_fallbacks_their_share_of_the_deadline():
    clock = FakeClock()
    hanging = ScriptedProvider("a", UpstreamTimeout, clock=clock, takes=100.0)  # each attempt uses all it gets
    fallback = ScriptedProvider("b", "b answers", clock=clock, takes=1.0)
    started = clock.now()
    answer = FallbackChain(make_policy(clock, max_attempts=5)).complete(
        [candidate("a", hanging), candidate("b", fallback)], build)
    assert answer.model_id == "b" and answer.failed == (FailedModel("a", "upstream_timeout", 504),)
    assert hanging.calls[0][1] == 15.0 and fallback.calls[0][1] == pytest.approx(15.0)
    assert clock.now() - started == pytest.approx(16.0)


def test_the_chain_never_waits_past_its_deadline_and_names_the_failed_models():
    clock = FakeClock()
    providers = [ScriptedProvider(name, UpstreamUnavailable, clock=clock, takes=9.0) for name in "abcde"]
    started = clock.now()
    with pytest.raises(UpstreamError) as failed:
        FallbackChain(make_policy(clock, max_attempts=1)).complete([candidate(p.name, p) for p in providers], build)
    assert clock.now() - started <= 30.0
    assert [len(p.calls) for p in providers] == [1, 1, 1, 1, 1]  # a fair share each: 6 s of the 30
    assert [p.calls[0][1] for p in providers] == pytest.approx([6.0] * 5)
    assert failed.value.code == "upstream_unavailable"
    assert failed.value.details["failed_models"] == [{"model": m, "code": "upstream_unavailable"} for m in "abcde"]


def test_per_model_deadline_keeps_time_for_the_fallbacks():
    clock = FakeClock()
    hanging = ScriptedProvider("a", UpstreamTimeout, clock=clock, takes=100.0)  # each attempt uses all it gets
    fallback = ScriptedProvider("b", "b answers", clock=clock, takes=1.0)
    chain = FallbackChain(make_policy(clock, deadline=30.0), per_model_deadline=10.0)
    answer = chain.complete([candidate("a", hanging), candidate("b", fallback)], build)
    assert hanging.calls[0][1] == 10.0 and fallback.calls[0][1] == 10.0  # each model: at most 10 s
    assert answer.model_id == "b"


def test_a_deadline_shorter_than_the_fallback_minimum_still_calls_the_first_model():
    """GEMINI_DEADLINE_SECONDS=0.3 is a valid setting: the first model is called with it (it used to be
    skipped, every request a 504 without a call); only fallbacks need `min_seconds_per_model` left."""
    clock = FakeClock()
    first = ScriptedProvider("a", "a answers")
    answer = FallbackChain(make_policy(clock), deadline=0.1).complete([candidate("a", first)], build)
    assert answer.model_id == "a" and len(first.calls) == 1


def test_a_fallback_is_not_started_without_time_to_answer():
    clock = FakeClock()
    failing, fallback = ScriptedProvider("a", UpstreamUnavailable), ScriptedProvider("b", "b answers")
    with pytest.raises(UpstreamError):
        FallbackChain(make_policy(clock, max_attempts=1), deadline=0.1).complete(
            [candidate("a", failing), candidate("b", fallback)], build)
    assert len(failing.calls) == 1 and fallback.calls == []


def test_an_empty_chain_is_a_programming_error():
    with pytest.raises(ValueError):
        FallbackChain(make_policy(FakeClock())).complete([], build)


# --- streams ---------------------------------------------------------------------------------

def test_a_stream_falls_back_while_no_text_has_arrived():
    clock = FakeClock()
    failing = ScriptedProvider("a", UpstreamUnavailable)
    streaming = ScriptedProvider("b", [Chunk(""), Chunk("Hel"), Chunk("lo", output_tokens=2, finish_reason="stop")])
    stream = FallbackChain(make_policy(clock)).open_stream([candidate("a", failing), candidate("b", streaming)], build)
    assert stream.model_id == "b" and stream.provider == "b" and stream.fallback_used
    assert stream.failed == (FailedModel("a", "upstream_unavailable", 502),)
    assert [chunk.text for chunk in stream] == ["", "Hel", "lo"]


def test_a_stream_that_fails_before_its_first_text_is_closed_and_falls_back():
    clock = FakeClock()
    cut = ScriptedProvider("a", [Chunk(""), UpstreamUnavailable("cut before any text")])
    silent = ScriptedProvider("c", [Chunk("", input_tokens=3)])  # ends without text: a bad answer
    streaming = ScriptedProvider("b", [Chunk("answer")])
    stream = FallbackChain(make_policy(clock, max_attempts=1)).open_stream(
        [candidate("a", cut), candidate("c", silent), candidate("b", streaming)], build)
    assert [chunk.text for chunk in stream] == ["answer"]
    assert [f.code for f in stream.failed] == ["upstream_unavailable", "upstream_bad_answer"]
    assert cut.streams[0].closed and silent.streams[0].closed


def test_after_the_first_text_a_failure_goes_to_the_client_not_to_a_fallback():
    clock = FakeClock()
    breaker = CircuitBreaker("a", failure_threshold=1, cool_down=30, clock=clock.now)
    dropping = ScriptedProvider("a", [Chunk("Hel"), UpstreamUnavailable("dropped mid-stream")])
    fallback = ScriptedProvider("b", [Chunk("never")])
    stream = FallbackChain(make_policy(clock)).open_stream(
        [candidate("a", dropping, breaker=breaker), candidate("b", fallback)], build)
    received = []
    with pytest.raises(UpstreamUnavailable):
        for chunk in stream:
            received.append(chunk.text)
    assert received == ["Hel"] and fallback.calls == [] and len(dropping.calls) == 1
    assert breaker.state is CircuitState.CLOSED  # the verdict was given at the first text


def test_a_streams_tokens_are_charged_when_it_ends_or_is_closed():
    clock = FakeClock()
    limiter = OutboundLimiter("a", tokens_per_minute=10_000, max_wait=0, sleep=clock.sleep, clock=clock.now)
    chunks = [Chunk("a", input_tokens=400, output_tokens=1), Chunk("b", output_tokens=800), Chunk("", output_tokens=5)]
    provider = ScriptedProvider("a", chunks)
    chain = FallbackChain(make_policy(clock))
    list(chain.open_stream([candidate("a", provider, limiter=limiter)], build))
    assert limiter.snapshot()["tokens_left"] == 10_000 - 1200  # the largest counts seen: 400 in, 800 out
    stream = chain.open_stream([candidate("a", provider, limiter=limiter)], build)
    stream.close()  # the client went away at once: the reservation (3 + 100) stands
    assert provider.streams[-1].closed and limiter.snapshot()["tokens_left"] == 10_000 - 1200 - 103


def test_breaker_probe_for_a_stream_is_settled_by_its_first_text():
    clock = FakeClock()
    breaker = CircuitBreaker("a", failure_threshold=1, cool_down=30, clock=clock.now)
    breaker.acquire().failed(UpstreamUnavailable("503"))
    clock.advance(30)
    provider = ScriptedProvider("a", [Chunk("back")])
    stream = FallbackChain(make_policy(clock)).open_stream([candidate("a", provider, breaker=breaker)], build)
    assert breaker.state is CircuitState.CLOSED
    stream.close()


def test_no_real_sleep_anywhere(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail(f"slept {seconds} s for real"))
    clock = FakeClock()
    failing = ScriptedProvider("a", UpstreamUnavailable)
    answer = FallbackChain(make_policy(clock)).complete(
        [candidate("a", failing), candidate("b", ScriptedProvider("b"))], build)
    assert answer.model_id == "b"


# --- the real Gemini provider, through google-genai over loopback, as the failing model -------

def gemini_provider_for(emulator):
    import gemini_wrapper

    provider_class = getattr(gemini_wrapper, "GeminiProvider", None)
    if provider_class is None:  # only before the branch has the Provider-protocol Gemini from main
        pytest.skip("gemini_wrapper.GeminiProvider (the Gemini Provider) is not on this branch yet")
    return provider_class(api_key="test-key-not-a-secret", base_url=emulator.base_url, pool_shards=1)


def test_a_steadily_failing_gemini_opens_its_breaker_and_the_fallback_answers(emulator):
    emulator.set_steady_fault("server_error")
    gemini = gemini_provider_for(emulator)
    try:
        clock = FakeClock()
        breaker = CircuitBreaker("gemini-flash", failure_threshold=2, cool_down=30, clock=clock.now)
        fallback = ScriptedProvider("openai", "from the fallback")
        models = [Candidate("gemini-flash", gemini, "gemini-2.0-flash", breaker=breaker),
                  candidate("gpt-mini", fallback)]
        chain = FallbackChain(make_policy(clock, max_attempts=3))

        answer = chain.complete(models, build)
        assert answer.model_id == "gpt-mini" and answer.fallback_used
        assert answer.failed == (FailedModel("gemini-flash", "upstream_unavailable", 502),)
        assert emulator.stats()["request_count"] == 3 and breaker.state is CircuitState.CLOSED  # one request: 1 failure
        assert chain.complete(models, build).model_id == "gpt-mini"
        assert emulator.stats()["request_count"] == 6  # the second request that failed on it opened it
        assert breaker.state is CircuitState.OPEN

        answer = chain.complete(models, build)
        assert answer.failed == (FailedModel("gemini-flash", "circuit_open", 503),)
        assert emulator.stats()["request_count"] == 6  # skipped during the cool-down: no call at all

        emulator.clear_faults()
        clock.advance(30)  # the cool-down is over: the next request's attempt is the probe
        answer = chain.complete(models, build)
        assert answer.model_id == "gemini-flash" and answer.completion.text and not answer.fallback_used
        assert breaker.state is CircuitState.CLOSED and emulator.stats()["request_count"] == 7
    finally:
        gemini.close()


def test_a_gemini_stream_that_cannot_open_falls_back_before_any_text(emulator):
    emulator.set_steady_fault("server_error")
    gemini = gemini_provider_for(emulator)
    try:
        clock = FakeClock()
        fallback = ScriptedProvider("openai", [Chunk("streamed "), Chunk("by the fallback")])
        stream = FallbackChain(make_policy(clock, max_attempts=2)).open_stream(
            [Candidate("gemini-flash", gemini, "gemini-2.0-flash"), candidate("gpt-mini", fallback)], build)
        assert "".join(chunk.text for chunk in stream) == "streamed by the fallback"
        assert stream.failed == (FailedModel("gemini-flash", "upstream_unavailable", 502),)
        assert emulator.stats()["request_count"] == 2
    finally:
        gemini.close()
