"""The Anthropic provider through the real anthropic SDK (and LangChain's ChatAnthropic) over
loopback HTTP against the Anthropic emulator: answers, usage, streams, the wire, every error
path, the deadline over hostile replies, and one run under the gateway's RetryPolicy."""

from __future__ import annotations

import math
import time

import anthropic
import pytest
from langchain_anthropic import ChatAnthropic

from gateway.errors import (
    ContentBlocked,
    InvalidRequest,
    UpstreamBadAnswer,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers.anthropic import AnthropicProvider, translate_error
from gateway.providers.base import GenerationParams, Message, ProviderRequest
from gateway.providers.emulators.anthropic import AnthropicEmulator
from gateway.providers.retry_policy import RetryPolicy
from tests.fakes import FakeClock

KEY = "sk-ant-test-not-a-secret"
MODEL = "claude-test-1"


@pytest.fixture(scope="module")
def emulator_server():
    with AnthropicEmulator() as server:
        yield server


@pytest.fixture
def emu(emulator_server):
    emulator_server.reset()
    yield emulator_server
    emulator_server.reset()


@pytest.fixture(scope="module")
def shared_provider(emulator_server):
    """One provider for the module, as in the gateway: each failure must leave it usable."""
    made = AnthropicProvider(api_key=KEY, base_url=emulator_server.base_url)
    yield made
    made.close()


@pytest.fixture
def provider(shared_provider, emu):
    return shared_provider


def ask(prompt: str = "Tell me about the sea", *, system: str | None = None, **params) -> ProviderRequest:
    messages = ((Message("system", system),) if system else ()) + (Message("user", prompt),)
    return ProviderRequest(model=MODEL, messages=messages, params=GenerationParams(**params))


def stream_all(provider, request, seconds_left: float = 5.0) -> list:
    return list(provider.open_stream(request, seconds_left))


# --------------------------------------------------------------------------- answers
def test_complete_returns_text_usage_and_stop_reason(provider, emu):
    completion = provider.complete(ask("Tell me about the sea"), 5.0)
    assert completion.text.startswith("Demo reply to: Tell me about the sea.")
    assert completion.model == MODEL and completion.finish_reason == "end_turn"
    assert completion.input_tokens == 6 and completion.output_tokens == math.ceil(len(completion.text) / 4)
    assert emu.request_count == 1 and emu.keys_seen == [KEY]


def test_system_and_params_reach_the_wire(provider, emu):
    provider.complete(ask("Hi there", system="Answer briefly.", temperature=0.3, max_tokens=77, top_p=0.9,
                          stop=("END", "  ")), 5.0)
    sent = emu.requests[-1]
    # top_p replaces temperature: Anthropic's newer models refuse both in one request
    assert sent["json"] == {"model": MODEL, "max_tokens": 77, "system": "Answer briefly.",
                            "top_p": 0.9, "stop_sequences": ["END"],
                            "messages": [{"role": "user", "content": "Hi there"}]}
    assert sent["version"] and sent["stream"] is False


def test_defaults_max_tokens_and_clamps_temperature_to_anthropics_range(emu):
    made = AnthropicProvider(api_key=KEY, base_url=emu.base_url, default_max_tokens=300)
    try:
        made.complete(ask(temperature=1.7), 5.0)
    finally:
        made.close()
    assert emu.requests[-1]["json"]["max_tokens"] == 300 and emu.requests[-1]["json"]["temperature"] == 1.0


def test_a_base_url_with_a_path_prefix_is_kept(emu):
    made = AnthropicProvider(api_key=KEY, base_url=f"{emu.base_url}/proxy/anthropic")
    try:
        assert made.complete(ask(), 5.0).text
    finally:
        made.close()
    assert emu.requests[-1]["path"] == "/proxy/anthropic/v1/messages"


def test_a_stop_sequence_cuts_the_answer(provider):
    completion = provider.complete(ask("Tell me about the sea", stop=("deterministic",)), 5.0)
    assert completion.finish_reason == "stop_sequence" and "deterministic" not in completion.text


def test_stream_yields_text_and_cumulative_usage(provider, emu):
    chunks = stream_all(provider, ask("Tell me about the sea"))
    text = "".join(c.text for c in chunks)
    assert text == provider.complete(ask("Tell me about the sea"), 5.0).text
    assert len([c for c in chunks if c.text]) > 1
    assert max(c.input_tokens or 0 for c in chunks) == 6
    assert max(c.output_tokens or 0 for c in chunks) == math.ceil(len(text) / 4)
    assert chunks[-1].finish_reason == "end_turn" and emu.requests[0]["json"]["stream"] is True


def test_a_reply_without_usage_is_still_served(provider, emu):
    emu.inject("no_usage")
    completion = provider.complete(ask(), 5.0)
    assert completion.text and completion.input_tokens is None and completion.output_tokens is None


def test_only_system_messages_is_a_clear_error(provider, emu):
    with pytest.raises(InvalidRequest):
        provider.complete(ProviderRequest(model=MODEL, messages=(Message("system", "x"),)), 5.0)
    assert emu.request_count == 0


@pytest.mark.parametrize(("params", "field"), [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": float("inf")}, "top_p"), ({"top_p": "0.5"}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"), ({"stop": (None,)}, "stop")])
def test_unusable_parameters_are_clear_errors_before_any_call(provider, emu, params, field):
    with pytest.raises(InvalidRequest) as caught:
        provider.complete(ask(**params), 5.0)
    assert caught.value.details == {"field": field} and emu.request_count == 0


def test_bad_constructor_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="api_key"):
        AnthropicProvider(api_key="")
    with pytest.raises(ValueError, match="default_max_tokens"):
        AnthropicProvider(api_key=KEY, default_max_tokens=0)


# --------------------------------------------------------------------------- LangChain
def test_langchain_builds_the_client(emu):
    """Pins the one private attribute used: ChatAnthropic._client, the anthropic client it builds."""
    chat = ChatAnthropic(model=MODEL, api_key=KEY, base_url=emu.base_url, max_retries=0)
    assert isinstance(chat._client, anthropic.Anthropic)
    assert chat._client.api_key == KEY and str(chat._client.base_url).startswith(emu.base_url)
    made = AnthropicProvider(api_key=KEY, base_url=emu.base_url)
    assert made.client.max_retries == 0 and made.client.api_key == KEY
    made.close()


def test_langchain_chat_anthropic_speaks_to_the_emulator(emu):
    chat = ChatAnthropic(model=MODEL, api_key=KEY, base_url=emu.base_url, max_retries=0, max_tokens=200)
    answer = chat.invoke([("system", "Be brief."), ("user", "Tell me about the sea")])
    assert answer.content.startswith("Demo reply to: Tell me about the sea.")
    assert answer.usage_metadata["input_tokens"] > 0 and answer.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.text for chunk in chat.stream("Tell me about the sea"))
    assert streamed.startswith("Demo reply to: Tell me about the sea.")
    assert emu.requests[0]["json"]["system"] == "Be brief."


# --------------------------------------------------------------------------- errors
def test_rate_limit_carries_the_retry_delay(provider, emu):
    emu.inject("rate_limit", retry_delay=3)
    with pytest.raises(UpstreamRateLimited) as caught:
        provider.complete(ask(), 5.0)
    assert caught.value.retry_after == 3.0 and caught.value.details == {"provider_status": 429}
    assert emu.request_count == 1  # no retry inside the SDK


@pytest.mark.parametrize(("hint", "expected"), [("nans", None), ("-5", None), ("1e400", None),
                                                 ("inf", None), ("9" * 40, None), ("99999999", 86400.0)])
def test_unusable_retry_hints_are_ignored_or_clamped(provider, emu, hint, expected):
    emu.inject("rate_limit", retry_delay=hint)
    with pytest.raises(UpstreamRateLimited) as caught:
        provider.complete(ask(), 5.0)
    assert caught.value.retry_after == expected


@pytest.mark.parametrize(("fault", "status"), [("overloaded", 529), ("server_error", 500)])
def test_server_failures_are_unavailable(provider, emu, fault, status):
    emu.inject(fault)
    with pytest.raises(UpstreamUnavailable) as caught:
        provider.complete(ask(), 5.0)
    assert caught.value.details == {"provider_status": status} and emu.request_count == 1


@pytest.mark.parametrize(("fault", "status"), [("bad_request", 400), ("auth", 401), ("permission_denied", 403),
                                               ("not_found", 404)])
def test_client_errors_are_rejected_in_our_words(provider, emu, fault, status):
    emu.inject(fault)
    with pytest.raises(UpstreamRejected) as caught:
        provider.complete(ask(), 5.0)
    assert caught.value.details == {"provider_status": status} and emu.request_count == 1
    assert "x-api-key" not in caught.value.message and "Error code" not in caught.value.message


def test_a_wrong_key_is_rejected_and_never_echoed(emu):
    with AnthropicEmulator(required_key="the-right-key") as strict:
        made = AnthropicProvider(api_key=KEY, base_url=strict.base_url)
        with pytest.raises(UpstreamRejected) as caught:
            made.complete(ask(), 5.0)
        made.close()
    assert caught.value.details == {"provider_status": 401} and KEY not in str(caught.value)


@pytest.mark.parametrize("fault", ["drop", "cut"])
def test_a_dropped_connection_is_unavailable(provider, emu, fault):
    emu.inject(fault)
    with pytest.raises(UpstreamUnavailable):
        provider.complete(ask(), 5.0)


@pytest.mark.parametrize("fault", ["malformed", "bad_chunk", "error_chunk"])
def test_a_body_that_is_not_a_message_is_a_bad_answer(provider, emu, fault):
    emu.inject(fault)
    with pytest.raises(UpstreamBadAnswer):
        provider.complete(ask(), 5.0)


def test_a_refusal_without_text_is_content_blocked(provider, emu):
    emu.inject("refusal")
    with pytest.raises(ContentBlocked):
        provider.complete(ask(), 5.0)
    emu.inject("refusal")
    with pytest.raises(ContentBlocked):
        stream_all(provider, ask())


def test_an_empty_answer_is_a_bad_answer(provider, emu):
    emu.inject("empty")
    with pytest.raises(UpstreamBadAnswer):
        provider.complete(ask(), 5.0)
    emu.inject("empty")
    with pytest.raises(UpstreamBadAnswer):
        stream_all(provider, ask())


# --------------------------------------------------------------------------- streams that go wrong
def test_an_error_event_before_any_text_fails_the_opening(provider, emu):
    emu.inject("error_chunk", after=1)
    with pytest.raises(UpstreamUnavailable) as caught:
        provider.open_stream(ask(), 5.0)  # raised here, where the retry policy can still retry
    assert caught.value.details == {"provider_status": 529}


def test_an_error_event_mid_stream_is_translated_by_its_type(provider, emu):
    emu.inject("error_chunk", after=4, error_type="rate_limit_error")
    stream = provider.open_stream(ask(), 5.0)
    received = []
    with pytest.raises(UpstreamRateLimited):
        for chunk in stream:
            received.append(chunk.text)
    assert "".join(received)  # the text that came first was delivered


@pytest.mark.parametrize(("fault", "error"), [("bad_chunk", UpstreamBadAnswer), ("cut", UpstreamUnavailable)])
def test_a_broken_stream_is_translated(provider, emu, fault, error):
    emu.inject(fault, after=4)
    with pytest.raises(error):
        stream_all(provider, ask())


def test_a_stream_that_ends_without_message_stop_is_a_bad_answer(provider, emu):
    emu.inject("raw", events=[
        {"type": "message_start", "message": {"model": MODEL, "usage": {"input_tokens": 3}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}])
    with pytest.raises(UpstreamBadAnswer):
        stream_all(provider, ask())


def test_closing_a_stream_early_releases_it(provider, emu):
    stream = provider.open_stream(ask(), 5.0)
    next(iter(stream))
    stream.close()
    assert provider.complete(ask(), 5.0).text  # the provider carries on


# --------------------------------------------------------------------------- the deadline
def _ends_by(deadline: float, call) -> BaseException:
    started = time.monotonic()
    with pytest.raises((UpstreamTimeout, UpstreamUnavailable)) as caught:
        call()
    assert time.monotonic() - started < deadline + 0.5
    return caught.value


def test_a_hang_ends_at_the_deadline(provider, emu):
    emu.inject("hang", seconds=30)
    assert isinstance(_ends_by(0.6, lambda: provider.complete(ask(), 0.6)), UpstreamTimeout)


@pytest.mark.parametrize("headers", [False, True])
def test_a_dripping_reply_ends_at_the_deadline(provider, emu, headers):
    emu.inject("drip", interval=0.5, headers=headers)  # a byte every 0.5 s: no read ever times out by itself
    assert isinstance(_ends_by(1.0, lambda: provider.complete(ask(), 1.0)), UpstreamTimeout)
    delivery = emu.wait_delivery(5)
    assert delivery.client_closed and delivery.sent < delivery.total


def test_a_dripping_stream_ends_at_the_deadline(provider, emu):
    emu.inject("drip", interval=0.5, after=3)
    assert isinstance(_ends_by(1.0, lambda: stream_all(provider, ask(), 1.0)), UpstreamTimeout)
    assert emu.wait_delivery(5).client_closed


def test_a_stalled_stream_ends_at_the_deadline(provider, emu):
    emu.inject("stall", after=4, seconds=30)  # the first text arrives, then nothing
    started = time.monotonic()
    stream = provider.open_stream(ask(), 1.0)
    with pytest.raises(UpstreamTimeout):
        list(stream)
    assert time.monotonic() - started < 1.5
    assert emu.wait_delivery(5).client_closed


def test_no_time_left_makes_no_call(provider, emu):
    with pytest.raises(UpstreamTimeout):
        provider.complete(ask(), 0.0)
    assert emu.request_count == 0


# --------------------------------------------------------------------------- hostile numbers
@pytest.mark.parametrize("usage", [{"input_tokens": -5, "output_tokens": 10**30},
                                   {"input_tokens": "12", "output_tokens": 1e308},
                                   {"input_tokens": True, "output_tokens": None}, "lots", [1, 2]])
def test_unbelievable_usage_is_dropped_not_billed(provider, emu, usage):
    emu.inject("raw", body={"type": "message", "model": MODEL, "stop_reason": "end_turn", "usage": usage,
                            "content": [{"type": "text", "text": "ok"}]})
    completion = provider.complete(ask(), 5.0)
    assert completion.text == "ok" and completion.input_tokens is None and completion.output_tokens is None


@pytest.mark.parametrize("body", [b'{"type": "message", "usage": {"input_tokens": ' + b"9" * 5000 + b"}}",
                                  b"[" * 100_000, b"\xff\xfe not utf-8", b'{"type": "message", "content": "x"}',
                                  b'{"type": "message", "content": [{"type": "text", "text": 5}]}', b"null"])
def test_unreadable_or_off_contract_bodies_are_bad_answers(provider, emu, body):
    emu.inject("raw", body=body)
    with pytest.raises(UpstreamBadAnswer):
        provider.complete(ask(), 5.0)


def test_hostile_numbers_in_a_stream_do_not_crash(provider, emu):
    emu.inject("raw", events=[
        {"type": "message_start", "message": {"model": "x" * 500, "usage": {"input_tokens": 10**40}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": 7}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": -1}},
        {"type": "future_event_kind", "anything": [1, 2]},
        {"type": "message_stop"}])
    chunks = stream_all(provider, ask())
    assert "".join(c.text for c in chunks) == "Hi"
    assert all(c.input_tokens is None and c.output_tokens is None and c.model is None for c in chunks)


def test_translate_error_never_passes_on_the_sdks_words():
    error = translate_error(RuntimeError(f"something odd with {KEY}"))
    assert KEY not in error.message and error.code == "upstream_error"


# --------------------------------------------------------------------------- under the retry policy
def test_retry_policy_retries_a_rate_limit_after_the_providers_delay(provider, emu):
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=3, deadline=30.0, sleep=clock.sleep, clock=clock.now)
    emu.inject("rate_limit", retry_delay=2)
    completion = policy.run(lambda seconds_left: provider.complete(ask(), seconds_left), label="anthropic call")
    assert completion.text and emu.request_count == 2 and clock.sleeps == [2.0]
