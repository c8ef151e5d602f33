"""The Gemini wrapper against the emulator: real SDK calls, every fault mapped and retried right."""

from __future__ import annotations

import ast
import logging
import threading
import time

import pytest

import gemini_wrapper
from gateway.errors import (
    ContentBlocked,
    UpstreamBadAnswer,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.tasks.table import TASKS
from gemini_wrapper import GeminiClient, GeminiProvider, sdk_transport_of


def test_text_generation_reports_provider_usage(make_client, emulator):
    completion = make_client().generate_text("Write a short story about a robot")
    assert "robot" in completion.text
    assert completion.input_tokens > 0 and completion.output_tokens > 0
    assert completion.model == "gemini-2.0-flash"
    assert emulator.request_count == 1


def test_code_generation_returns_code_without_fences(make_client):
    completion = make_client().generate_code("Create a Python function to calculate fibonacci numbers")
    assert "```" not in completion.text
    tree = ast.parse(completion.text)
    assert any(isinstance(node, ast.FunctionDef) for node in ast.walk(tree))


def test_classification_is_one_of_the_categories(make_client):
    categories = ["positive", "negative", "neutral"]
    assert make_client().classify_text("This movie was amazing!", categories).text == "positive"
    assert make_client().classify_text("Terrible, the worst film", categories).text == "negative"


def test_each_task_sends_its_temperature(make_client, emulator):
    client = make_client()
    client.generate_text("hello there")
    client.generate_code("add two numbers")
    client.classify_text("good", ["positive", "negative"])
    sent = [record["json"]["generationConfig"]["temperature"] for record in emulator.requests]
    assert sent == [TASKS["text"].temperature, TASKS["code"].temperature, TASKS["classify"].temperature]


def test_chat_models_are_built_once_and_reused(make_config, clock, emulator):
    built = []

    def counting_factory(**options):
        model = gemini_wrapper.ChatGoogleGenerativeAI(**options)
        built.append(model)
        return model

    config = make_config()
    client = GeminiClient(api_key="k", model=config.gemini_model, base_url=config.gemini_base_url,
                          pool_shards=4, chat_model_factory=counting_factory)
    assert len(built) == 4  # one model (SDK client, connection pool) per shard, built up front

    def calls():
        for _ in range(3):
            client.generate_text("hi there")
            client.classify_text("good", ["positive", "negative"])

    threads = [threading.Thread(target=calls) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 4  # no model built per call or per thread
    assert emulator.request_count == 36


def test_rate_limit_twice_then_success_retries_with_the_servers_delay(make_client, emulator, clock, caplog):
    emulator.inject("rate_limit", times=2, retry_delay=3)
    with caplog.at_level(logging.WARNING, logger="gateway.retry"):
        completion = make_client().generate_text("hello after a quota blip")
    assert completion.text
    assert emulator.request_count == 3
    assert clock.sleeps == [3.0, 3.0]  # RetryInfo.retryDelay, not the exponential guess
    retries = [r for r in caplog.records if r.name == "gateway.retry"]
    assert [(r.attempt, r.wait_seconds) for r in retries] == [(1, 3.0), (2, 3.0)]


def test_steady_rate_limit_gives_429_with_retry_after(make_client, emulator, clock):
    emulator.set_steady_fault("rate_limit", retry_delay=2)
    with pytest.raises(UpstreamRateLimited) as caught:
        make_client().generate_text("hello")
    assert caught.value.status == 429
    assert caught.value.retry_after == 2.0
    assert emulator.request_count == 5  # RETRY_MAX_ATTEMPTS, and not 5 x the SDK's 6
    assert clock.now() - 1000.0 <= 30.0


@pytest.mark.parametrize("fault", ["server_error", "unavailable", "drop"])
def test_transient_faults_are_retried_then_succeed(make_client, emulator, fault):
    emulator.inject(fault, times=2)
    assert make_client().generate_text("hello").text
    assert emulator.request_count == 3


def test_steady_server_errors_end_in_502_after_all_attempts(make_client, emulator):
    emulator.set_steady_fault("server_error")
    with pytest.raises(UpstreamUnavailable) as caught:
        make_client().generate_text("hello")
    assert caught.value.status == 502
    assert emulator.request_count == 5


def test_dropped_connection_ends_in_502(make_client, emulator):
    emulator.set_steady_fault("drop")
    with pytest.raises(UpstreamUnavailable) as caught:
        make_client().generate_text("hello")
    assert caught.value.status == 502


def test_malformed_reply_is_a_502_without_retry(make_client, emulator):
    emulator.set_steady_fault("malformed")
    with pytest.raises(UpstreamBadAnswer) as caught:
        make_client().generate_text("hello")
    assert caught.value.status == 502
    assert emulator.request_count == 1


@pytest.mark.parametrize("fault, status", [("bad_request", 400), ("permission_denied", 403)])
def test_client_errors_from_the_provider_are_not_retried(make_client, emulator, fault, status):
    emulator.set_steady_fault(fault)
    with pytest.raises(UpstreamRejected) as caught:
        make_client().generate_text("hello")
    assert caught.value.details["provider_status"] == status
    assert emulator.request_count == 1


def test_a_wrong_key_is_reported_as_refused_credentials(make_config, emulator, clock):
    emulator.required_key = "the-right-key"
    try:
        client = GeminiClient.from_config(make_config(google_api_key="a-wrong-key"), sleep=clock.sleep)
        with pytest.raises(UpstreamRejected) as caught:
            client.generate_text("hello")
    finally:
        emulator.required_key = None
    assert "credentials" in caught.value.message
    assert "a-wrong-key" not in str(caught.value.details)


def test_safety_block_is_a_400_without_retry(make_client, emulator):
    emulator.set_steady_fault("safety_block")
    with pytest.raises(ContentBlocked) as caught:
        make_client().generate_text("something the filter dislikes")
    assert caught.value.status == 400
    assert caught.value.details["reason"] == "SAFETY"
    assert emulator.request_count == 1


def test_empty_answer_is_a_502(make_client, emulator):
    emulator.set_steady_fault("empty")
    with pytest.raises(UpstreamBadAnswer):
        make_client().generate_text("hello")


def test_a_hang_ends_in_504_within_the_deadline(make_config, emulator, clock):
    emulator.set_steady_fault("hang", seconds=10)
    client = GeminiClient.from_config(make_config(gemini_deadline_seconds=0.5), sleep=clock.sleep)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        client.generate_text("hello")
    elapsed = time.monotonic() - started
    assert caught.value.status == 504
    assert elapsed < 2.0  # the deadline (0.5 s) plus connection overhead, not the 10 s hang


def test_slow_reply_within_the_deadline_succeeds(make_config, emulator, clock):
    emulator.inject("slow", seconds=0.2)
    client = GeminiClient.from_config(make_config(gemini_deadline_seconds=5), sleep=clock.sleep)
    assert client.generate_text("hello").text
    assert emulator.request_count == 1


def test_module_level_functions_use_the_environment(monkeypatch, emulator):
    monkeypatch.setenv("GOOGLE_API_KEY", "env-key-not-secret")
    monkeypatch.setenv("GEMINI_BASE_URL", emulator.base_url)
    monkeypatch.setenv("APP_ENV", "testing")
    gemini_wrapper.default_client.cache_clear()
    try:
        assert gemini_wrapper.generate_text("hello module")
        assert "def " in gemini_wrapper.generate_code("reverse a string")
        assert gemini_wrapper.classify_text("I love it", ["positive", "negative"]) == "positive"
    finally:
        gemini_wrapper.default_client.cache_clear()
    assert emulator.request_count == 3


@pytest.mark.parametrize("exc, code", [
    (RuntimeError("boom: key=test-key-not-a-secret"), "upstream_error"),
    (ValueError("Failed to parse response as JSON. Raw response: <html>"), "upstream_bad_answer"),  # unreadable
    (RecursionError("maximum recursion depth exceeded while decoding a JSON array"), "upstream_bad_answer"),
    (KeyError("candidates"), "upstream_error"),
])
def test_unexpected_failures_are_reported_in_our_own_words(exc, code):
    error = gemini_wrapper.translate_provider_error(exc)
    told = f"{error.message} {error.details}"
    assert error.code == code and type(exc).__name__ not in told
    assert "key" not in told.lower() and "<html>" not in told


def test_the_shards_send_through_the_deadline_transport(make_client):
    from gateway.providers.deadline import DeadlineTransport

    client = make_client()
    assert all(isinstance(api._httpx_client._transport, DeadlineTransport) for api in client._transports)
    assert len({id(api._httpx_client._transport) for api in client._transports}) == len(client._transports)


def test_a_drip_ends_in_504_at_the_deadline_of_the_policy(make_config, emulator):
    emulator.inject("drip", interval=0.05)
    client = GeminiClient.from_config(make_config(gemini_deadline_seconds=0.5))
    with pytest.raises(UpstreamTimeout):
        client.generate_text("hello")
    delivery = emulator.wait_delivery()
    assert delivery.client_closed and delivery.sent < delivery.total
    assert emulator.request_count == 1


def test_the_provider_reaches_the_sdk_transport_through_one_private_attribute(emulator):
    """The private attribute of google-genai the provider reaches (`_api_client` under LangChain's
    chat model, with its httpx client, `request_streamed` for streams, and `_build_request` and
    `_request_once` for the lean call, whose wire tests/test_gemini_transport.py pins): an SDK
    upgrade that moves them fails here."""
    provider = GeminiProvider(api_key="test-key-not-a-secret", base_url=emulator.base_url, pool_shards=1)
    sdk = sdk_transport_of(provider.chat_models[0])
    assert callable(sdk.request_streamed) and callable(sdk._build_request) and callable(sdk._request_once)
    assert sdk._httpx_client._transport is not None
    from gateway.providers.base import user_prompt

    completion = provider.complete(user_prompt("hello there", model="gemini-2.0-flash"), 5.0)
    assert completion.text.startswith("Demo reply to: hello there") and completion.input_tokens > 0
