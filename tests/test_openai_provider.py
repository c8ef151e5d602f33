"""The OpenAI-compatible provider through the real openai SDK (as LangChain's ChatOpenAI builds it)
over loopback HTTP against the OpenAI emulator: answers, usage, streams, parameters on the wire,
every failure translated into the gateway's errors, and the deadline over hostile upstreams.

Only the upstream is faked (the emulator is a real HTTP server); retry waits go to a recorder.
The deadline tests run on the real clock, as in production: their bound is the deadline itself.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from email.utils import formatdate

import pytest

from gateway.errors import (
    ContentBlocked,
    InvalidRequest,
    UpstreamBadAnswer,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers.base import GenerationParams, Message, ProviderRequest
from gateway.providers.emulators.openai_compat import OpenAIEmulator
from gateway.providers.openai_compat import OpenAICompatProvider, retry_after_of
from gateway.providers.retry_policy import RetryPolicy
from gateway.tasks.prompts import classification_prompt

KEY = "sk-test-not-a-secret"
MODEL = "gpt-4o-mini"
DEADLINE = 0.6  # seconds: the hostile-upstream tests end at this, on the real clock
SLOW_DRIP = 0.2  # seconds per byte: each read gets a byte well inside DEADLINE, so only a deadline ends it


@pytest.fixture(scope="module")
def server():
    with OpenAIEmulator(required_key=KEY) as emu:
        yield emu


@pytest.fixture
def emu(server):
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def make_provider(emu):
    providers = []

    def build(**options) -> OpenAICompatProvider:
        options.setdefault("base_url", emu.base_url)
        options.setdefault("pool_shards", 1)
        provider = OpenAICompatProvider(api_key=options.pop("api_key", KEY), **options)
        providers.append(provider)
        return provider

    yield build
    for provider in providers:
        provider.close()


@pytest.fixture
def provider(make_provider):
    return make_provider()


def ask(prompt: str = "Tell me about owls in winter", system: str | None = "Be brief.", **params) -> ProviderRequest:
    messages = ((Message("system", system),) if system else ()) + (Message("user", prompt),)
    return ProviderRequest(model=MODEL, messages=messages, params=GenerationParams(**params))


def stream_all(provider, request, seconds_left: float = 5.0):
    stream = provider.open_stream(request, seconds_left)
    try:
        return list(stream)
    finally:
        stream.close()


# ------------------------------------------------------------------ answers and usage
def test_complete_returns_the_text_its_usage_and_the_model(emu, provider):
    completion = provider.complete(ask(), 5.0)
    assert completion.text.startswith("Demo reply to: Tell me about owls in winter")
    assert completion.input_tokens == math.ceil(len("Be brief.\nTell me about owls in winter") / 4)
    assert completion.output_tokens == math.ceil(len(completion.text) / 4)
    assert completion.model == MODEL and completion.finish_reason == "stop"
    record = emu.requests[0]
    assert record["path"] == "/v1/chat/completions" and record["stream"] is False
    assert record["json"] == {"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about owls in winter"}]}
    assert emu.keys_seen == [KEY]


def test_a_classification_prompt_gets_one_of_its_categories(provider):
    prompt = classification_prompt("I love this, it is amazing!", ["positive", "negative", "neutral"])
    assert provider.complete(ask(prompt, system=None, temperature=0.0), 5.0).text == "positive"


def test_generation_parameters_reach_the_wire_and_shape_the_answer(emu, provider):
    completion = provider.complete(ask(temperature=0.3, max_tokens=50, top_p=0.9, stop=("zebra", "owls")), 5.0)
    sent = emu.requests[0]["json"]
    assert (sent["temperature"], sent["max_tokens"], sent["top_p"], sent["stop"]) == (0.3, 50, 0.9, ["zebra", "owls"])
    assert completion.text == "Demo reply to: Tell me about "  # cut at the first stop string
    completion = provider.complete(ask(max_tokens=3), 5.0)
    assert completion.finish_reason == "length" and completion.output_tokens == 3


def test_default_headers_reach_the_wire_and_the_sdk_does_not_retry(emu, make_provider):
    make_provider(default_headers={"X-Team": "search"}).complete(ask(), 5.0)
    headers = emu.requests[0]["headers"]
    assert headers["x-team"] == "search" and headers["x-stainless-retry-count"] == "0"


def test_a_reply_without_usage_leaves_the_counts_to_our_estimate(emu, provider):
    emu.inject("no_usage")
    completion = provider.complete(ask(), 5.0)
    assert completion.text and completion.input_tokens is None and completion.output_tokens is None


# ------------------------------------------------------------------ streams
def test_a_stream_yields_text_pieces_then_the_usage(emu, provider):
    whole = provider.complete(ask("one two three four five six seven eight"), 5.0)
    chunks = stream_all(provider, ask("one two three four five six seven eight"))
    assert "".join(chunk.text for chunk in chunks) == whole.text
    assert sum(1 for chunk in chunks if chunk.text) > 1
    usage = chunks[-1]
    assert (usage.text, usage.input_tokens, usage.output_tokens) == ("", whole.input_tokens, whole.output_tokens)
    assert any(chunk.finish_reason == "stop" for chunk in chunks)
    sent = emu.requests[1]["json"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_a_stream_without_usage_for_servers_that_refuse_stream_options(emu, make_provider):
    chunks = stream_all(make_provider(stream_usage=False), ask())
    assert "stream_options" not in emu.requests[0]["json"]
    assert all(chunk.input_tokens is None and chunk.output_tokens is None for chunk in chunks)


def test_closing_a_stream_early_releases_it(emu, provider):
    stream = provider.open_stream(ask("one two three four five six seven eight"), 5.0)
    first = next(iter(stream))
    stream.close()
    assert first.text
    assert provider.complete(ask(), 5.0).text  # the pool still serves


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("params, expected", [
    ({"retry_delay": 1.5}, 1.5),  # retry-after-ms wins over the rounded-up retry-after
    ({"retry_delay": 3, "retry_after_ms": None}, 3.0),
    ({"retry_delay": "nans"}, None),
    ({"retry_delay": "1e999"}, None),
    ({"retry_delay": "-5"}, None),
    ({"retry_delay": 10**9, "retry_after_ms": None}, 86400.0),  # clamped to a day
    ({"retry_delay": 10**6}, 86400.0),  # retry-after-ms 10**9: also a day, not 10**9 ms clamped first
    ({"retry_after": None, "retry_after_ms": None}, None),
])
def test_a_429_is_rate_limited_with_the_providers_delay(emu, provider, params, expected):
    emu.inject("rate_limit", **params)
    with pytest.raises(UpstreamRateLimited) as caught:
        provider.complete(ask(), 5.0)
    assert caught.value.retry_after == expected
    assert caught.value.details["provider_status"] == 429
    assert emu.request_count == 1  # no SDK retry


def test_retry_after_as_an_http_date():
    now = 1_800_000_000.0
    assert retry_after_of({"retry-after": formatdate(now + 30, usegmt=True)}, now=lambda: now) == 30.0
    assert retry_after_of({"retry-after": formatdate(now - 30, usegmt=True)}, now=lambda: now) == 0.0
    assert retry_after_of({"retry-after": "Fri, 99 Foo 0000"}, now=lambda: now) is None


def test_a_429_for_an_exhausted_account_is_not_retried(emu, provider):
    emu.inject("rate_limit", code="insufficient_quota")
    with pytest.raises(UpstreamRejected) as caught:
        provider.complete(ask(), 5.0)
    assert caught.value.details["provider_code"] == "insufficient_quota"


@pytest.mark.parametrize("fault, params, error, status", [
    ("server_error", {}, UpstreamUnavailable, 500),
    ("unavailable", {}, UpstreamUnavailable, 503),
    ("bad_request", {}, UpstreamRejected, 400),
    ("bad_request", {"status": 404}, UpstreamRejected, 404),
    ("bad_request", {"status": 422}, UpstreamRejected, 422),
    ("permission_denied", {}, UpstreamRejected, 403),
    ("permission_denied", {"status": 401}, UpstreamRejected, 401),
])
@pytest.mark.parametrize("stream", [False, True])
def test_http_errors_are_translated(emu, provider, fault, params, error, status, stream):
    emu.inject(fault, **params)
    with pytest.raises(error) as caught:
        stream_all(provider, ask()) if stream else provider.complete(ask(), 5.0)
    assert type(caught.value) is error and caught.value.details["provider_status"] == status
    assert emu.request_count == 1  # no SDK retry, even on a 5xx


def test_a_wrong_key_is_rejected_without_echoing_it(emu, make_provider):
    with pytest.raises(UpstreamRejected) as caught:
        make_provider(api_key="sk-wrong-key-1234").complete(ask(), 5.0)
    error = caught.value
    assert error.details == {"provider_status": 401, "provider_code": "invalid_api_key"}
    assert "sk-wrong" not in str(error) and "sk-wrong" not in repr(error.details)


def test_the_providers_param_is_named_in_a_400(emu, provider):
    with pytest.raises(UpstreamRejected) as caught:
        provider.complete(ask(temperature=7.0), 5.0)  # the emulator checks ranges as OpenAI does
    assert caught.value.details == {"provider_status": 400, "provider_param": "temperature"}


@pytest.mark.parametrize("fault, error", [
    ("drop", UpstreamUnavailable),
    ("cut", UpstreamUnavailable),
    ("malformed", UpstreamBadAnswer),
    ("bad_chunk", UpstreamBadAnswer),
    ("error_chunk", UpstreamBadAnswer),  # a 200 whose body is an error object, not a completion
    ("empty", UpstreamBadAnswer),
    ("safety_block", ContentBlocked),
])
def test_bad_plain_answers_are_translated(emu, provider, fault, error):
    emu.inject(fault)
    with pytest.raises(error):
        provider.complete(ask(), 5.0)


@pytest.mark.parametrize("fault, error, chunks_before", [
    ("cut", UpstreamUnavailable, 1),
    ("bad_chunk", UpstreamBadAnswer, 1),
    ("error_chunk", UpstreamUnavailable, 1),
    ("malformed", UpstreamBadAnswer, 0),
    ("empty", UpstreamBadAnswer, 0),
    ("safety_block", ContentBlocked, 0),
    ("drop", UpstreamUnavailable, 0),
])
def test_bad_streams_are_translated(emu, provider, fault, error, chunks_before):
    emu.inject(fault, after=2)  # the role chunk and one text chunk, then the fault
    received = []
    with pytest.raises(error):
        stream = provider.open_stream(ask("one two three four five six seven eight"), 5.0)
        received.extend(stream)
    assert len(received) == chunks_before


@pytest.mark.parametrize("events, error", [
    ([{"choices": [{"delta": {"content": "half an answer"}}]}], UpstreamUnavailable),  # closed before the end
    ([{"choices": "nope"}, b"[DONE]"], UpstreamBadAnswer),
    ([{"choices": [{"delta": {"content": 5}}]}, b"[DONE]"], UpstreamBadAnswer),
    ([b"[DONE]"], UpstreamBadAnswer),  # no answer at all
    ([{"choices": [{"delta": {"content": "x" * (2 << 20)}}]}, b"[DONE]"], UpstreamBadAnswer),  # an event over 1 MiB
])
def test_off_contract_streams_are_errors(emu, provider, events, error):
    emu.inject("raw", events=events)
    with pytest.raises(error):
        stream_all(provider, ask())


def test_a_stream_that_ends_with_a_finish_reason_but_no_done_is_accepted(emu, provider):
    emu.inject("raw", events=[{"choices": [{"delta": {"content": "fine"}, "finish_reason": "stop"}]}])
    assert [chunk.text for chunk in stream_all(provider, ask())] == ["fine"]


# ------------------------------------------------------------------ hostile numbers and shapes
def reply(content="fine", usage=None, **extra) -> dict:
    return {"choices": [{"message": {"content": content}, "finish_reason": "stop"}], "usage": usage, **extra}


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -5, "completion_tokens": 3},
    {"prompt_tokens": 10**30, "completion_tokens": 3},
    {"prompt_tokens": "12", "completion_tokens": 3},
    {"prompt_tokens": 1.5, "completion_tokens": 3},
    {"prompt_tokens": True, "completion_tokens": 3},
    "lots",
])
def test_unbelievable_usage_keeps_the_answer_and_drops_the_counts(emu, provider, usage):
    emu.inject("raw", body=reply(usage=usage))
    completion = provider.complete(ask(), 5.0)
    assert completion.text == "fine" and completion.input_tokens is None and completion.output_tokens is None


@pytest.mark.parametrize("body", [
    b'{"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 1' + b"0" * 5000 + b"}}",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"choices": [{"message": {"content": "\xff\xfe"}}]}',
    b"NaN",
    b"",
])
def test_unreadable_bodies_are_bad_answers(emu, provider, body):
    emu.inject("raw", body=body)
    with pytest.raises(UpstreamBadAnswer):
        provider.complete(ask(), 5.0)


@pytest.mark.parametrize("body", [
    reply(content=5), {"choices": "x"}, {"choices": [1]}, {"choices": [{"message": "hi"}]},
    {"choices": [{"message": {"content": "x"}, "finish_reason": 7}]}, [1, 2],
])
def test_off_contract_replies_are_bad_answers(emu, provider, body):
    emu.inject("raw", body=body)
    with pytest.raises(UpstreamBadAnswer):
        provider.complete(ask(), 5.0)


def test_a_huge_model_name_is_not_believed(emu, provider):
    emu.inject("raw", body=reply(model="m" * 10_000))
    assert provider.complete(ask(), 5.0).model == MODEL


# ------------------------------------------------------------------ the deadline
def ends_at_the_deadline(call, error=UpstreamTimeout):
    start = time.monotonic()
    with pytest.raises(error):
        call()
    elapsed = time.monotonic() - start
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + 1.0, elapsed


def test_a_hanging_upstream_ends_at_the_deadline(emu, provider):
    emu.inject("hang", seconds=30)
    ends_at_the_deadline(lambda: provider.complete(ask(), DEADLINE))


@pytest.mark.parametrize("headers", [False, True])
def test_a_dripping_body_ends_at_the_deadline(emu, provider, headers):
    emu.inject("drip", interval=SLOW_DRIP, headers=headers)
    ends_at_the_deadline(lambda: provider.complete(ask(), DEADLINE))
    delivery = emu.wait_delivery()
    assert delivery.client_closed and delivery.sent < delivery.total


def test_a_stalled_plain_reply_ends_at_the_deadline(emu, provider):
    emu.inject("stall", seconds=30)
    ends_at_the_deadline(lambda: provider.complete(ask(), DEADLINE))
    assert emu.wait_delivery().client_closed


@pytest.mark.parametrize("fault, params", [
    ("drip", {"after": 2, "interval": SLOW_DRIP}),  # two chunks at once, then one byte at a time
    ("stall", {"after": 2, "seconds": 30}),  # two chunks, then nothing
    ("drip", {"after": 0, "interval": SLOW_DRIP}),  # never even opens
])
def test_a_stream_that_slows_or_stalls_ends_at_the_deadline(emu, provider, fault, params):
    emu.inject(fault, **params)
    ends_at_the_deadline(lambda: stream_all(provider, ask("one two three four five six seven eight"), DEADLINE))
    delivery = emu.wait_delivery()
    assert delivery.client_closed and delivery.sent < delivery.total


@pytest.mark.parametrize("seconds_left", [0.0, -1.0, float("nan")])
def test_no_time_left_is_a_timeout_without_a_call(emu, provider, seconds_left):
    with pytest.raises(UpstreamTimeout):
        provider.complete(ask(), seconds_left)
    assert emu.request_count == 0


def test_an_endless_deadline_is_not_a_crash(provider):
    assert provider.complete(ask(), float("inf")).text
    assert provider.complete(ask(), 1e300).text


# ------------------------------------------------------------------ under the retry policy
def test_a_429_then_success_takes_two_calls_and_the_providers_wait(emu, provider):
    sleeps = []
    policy = RetryPolicy(max_attempts=3, deadline=30, sleep=sleeps.append)
    emu.inject("rate_limit", retry_delay=2)
    completion = policy.run(lambda seconds_left: provider.complete(ask(), seconds_left))
    assert completion.text.startswith("Demo reply to:")
    assert emu.request_count == 2 and sleeps == [2.0]
    assert [r["headers"]["x-stainless-retry-count"] for r in emu.requests] == ["0", "0"]


# ------------------------------------------------------------------ inputs and configurations
def test_an_unknown_role_is_an_invalid_request(emu, provider):
    with pytest.raises(InvalidRequest):
        provider.complete(ProviderRequest(model=MODEL, messages=(Message("tool", "x"),)), 5.0)
    assert emu.request_count == 0


def test_an_empty_key_is_refused_at_construction():
    with pytest.raises(ValueError, match="API key"):
        OpenAICompatProvider(api_key="", base_url="http://127.0.0.1:9/v1")


def test_azure_deployments_through_azure_chat_openai(emu, make_provider):
    provider = make_provider(base_url=emu.root_url, azure_api_version="2024-10-21")
    completion = provider.complete(ask(), 5.0)
    assert completion.text.startswith("Demo reply to:")
    record = emu.requests[0]
    assert record["path"] == f"/openai/deployments/{MODEL}/chat/completions"
    assert emu.keys_seen == [KEY]


def test_threads_share_the_provider(emu, make_provider):
    provider = make_provider(pool_shards=2, max_connections=4)
    emu.reply_delay = 0.05
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda n: provider.complete(ask(f"question {n}"), 5.0).text, range(16)))
    assert all(text.startswith("Demo reply to: question") for text in texts) and emu.request_count == 16
