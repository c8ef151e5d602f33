"""The OpenAI-compatible surface (/v1) driven by the official `openai` SDK and LangChain's ChatOpenAI.

A live gateway (waitress on loopback, AUTH on, a key made through the KeyStore) in front of the
Gemini emulator (and the OpenAI one for a fallback): answers in OpenAI's wire format, every request
in the ledger with its cost and key, OpenAI's error format for the gateway's refusals and failures.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests
from langchain_openai import ChatOpenAI

CHAT = "/v1/chat/completions"
MODEL = "gemini-2.0-flash"
USER = {"role": "user", "content": "Tell me about rivers"}




@pytest.fixture
def gateway_with_key(make_app, serve, openai_emulator):
    """start() -> (app, live server, key, secret): AUTH on, limits off unless asked, FALLBACKS_TEXT to gpt-4o-mini."""

    def start(key_settings: dict | None = None, **overrides):
        settings = {"auth_enabled": True, "ratelimit_enabled": False, "openai_api_key": "sk-test-not-a-secret",
                    "openai_base_url": openai_emulator.base_url, "fallbacks_text": ("gpt-4o-mini",), **overrides}
        app = make_app(**settings)
        key, secret = app.extensions["gateway"].keys.create(name="sdk", **(key_settings or {}))
        return app, serve(app), key, secret

    return start


def sdk(server, secret: str, **settings) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, timeout=30, **settings)


def records(app):
    return app.extensions["gateway"].tracker.records()


def price(app, model: str, input_tokens: int, output_tokens: int) -> float:
    return app.extensions["gateway"].service.price_of(model, input_tokens, output_tokens).total


def test_the_sdk_gets_a_chat_completion_priced_in_the_ledger_with_its_key(gateway_with_key, emulator):
    app, server, key, secret = gateway_with_key()
    answer = sdk(server, secret).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "Answer in one line."}, USER], temperature=0.3,
        max_tokens=200, stop=["###"], user="end-user-7")
    completion = answer.parse()
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL and completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.startswith("Demo reply to:")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    [record] = records(app)
    assert (record.endpoint, record.model, record.key_id, record.status) == (CHAT, MODEL, key.id, 200)
    assert (record.input_tokens, record.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert record.total_cost > 0
    assert record.total_cost == pytest.approx(price(app, MODEL, usage.prompt_tokens, usage.completion_tokens))
    assert answer.headers["X-Cost-Total"] == f"{record.total_cost:.10f}"
    assert completion.id == f"chatcmpl-{answer.headers['X-Request-ID']}" == f"chatcmpl-{record.request_id}"
    sent = emulator.requests[-1]["json"]  # the system message and the options reached the provider
    assert "Answer in one line." in json.dumps(sent["systemInstruction"])
    assert sent["generationConfig"]["temperature"] == 0.3 and sent["generationConfig"]["stopSequences"] == ["###"]
    assert "Answer in one line." not in json.dumps(sent["contents"])


def test_the_sdk_streams_with_usage_and_the_stream_is_in_the_ledger(gateway_with_key, emulator):
    app, server, key, secret = gateway_with_key()
    client = sdk(server, secret)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[USER], stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(texts) >= 2 and emulator.requests[-1]["stream"] is True
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0 and all(c.usage is None for c in chunks[:-1])
    assert len({chunk.id for chunk in chunks}) == 1 and {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    whole = client.chat.completions.create(model=MODEL, messages=[USER])
    assert "".join(texts) == whole.choices[0].message.content
    stream_record = records(app)[0]
    assert (stream_record.endpoint, stream_record.key_id, stream_record.status) == (CHAT, key.id, 200)
    assert stream_record.request_id == chunks[0].id.removeprefix("chatcmpl-")
    assert stream_record.output_tokens == last.usage.completion_tokens
    assert stream_record.total_cost > 0
    assert stream_record.total_cost == pytest.approx(
        price(app, MODEL, last.usage.prompt_tokens, last.usage.completion_tokens))


def test_a_stream_without_include_usage_sends_no_usage_chunk(gateway_with_key, emulator):
    _, server, _, secret = gateway_with_key()
    chunks = list(sdk(server, secret).chat.completions.create(model=MODEL, messages=[USER], stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop" and all(chunk.usage is None for chunk in chunks)


def test_a_repeated_request_is_a_cache_hit_at_no_cost_unless_no_cache(gateway_with_key, emulator):
    app, server, key, secret = gateway_with_key()
    client = sdk(server, secret)
    first = client.chat.completions.create(model=MODEL, messages=[USER])
    again = client.chat.completions.with_raw_response.create(model=MODEL, messages=[USER])
    assert again.parse().choices[0].message.content == first.choices[0].message.content
    assert again.headers["X-Cached"] == "true" and emulator.request_count == 1
    client.chat.completions.create(model=MODEL, messages=[USER], extra_headers={"Cache-Control": "no-cache"})
    assert emulator.request_count == 2
    hit = records(app)[1]
    assert (hit.cached, hit.total_cost, hit.key_id) == (True, 0.0, key.id) and hit.saved_cost > 0
    assert [r.cached for r in records(app)] == [False, True, False]


def test_a_conversation_differs_from_the_same_text_task_in_the_cache(gateway_with_key, emulator):
    app, server, _, secret = gateway_with_key()
    sdk(server, secret).chat.completions.create(model=MODEL, messages=[USER])
    text = requests.post(f"{server.url}/api/v1/generate/text", json={"prompt": USER["content"]},
                         headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert text.status_code == 200 and text.headers["X-Cached"] == "false" and emulator.request_count == 2


def test_a_failing_model_is_answered_by_the_text_fallback_and_priced_for_it(gateway_with_key, emulator,
                                                                            openai_emulator):
    app, server, _, secret = gateway_with_key()
    emulator.set_steady_fault("server_error")
    completion = sdk(server, secret).chat.completions.create(model=MODEL, messages=[USER])
    assert completion.model == "gpt-4o-mini" and openai_emulator.request_count == 1
    [record] = records(app)
    assert record.model == "gpt-4o-mini" and record.total_cost > 0
    assert record.total_cost == pytest.approx(price(app, "gpt-4o-mini", record.input_tokens, record.output_tokens))


def test_langchain_chat_openai_invokes_and_streams(gateway_with_key, emulator):
    app, server, key, secret = gateway_with_key()
    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key=secret, model=MODEL, timeout=30, max_retries=0)
    conversation = [("system", "Be brief."), ("human", "Tell me about lakes")]
    reply = chat.invoke(conversation)
    assert reply.content.startswith("Demo reply to: Tell me about lakes") and reply.usage_metadata["output_tokens"] > 0
    uncached = ChatOpenAI(base_url=f"{server.url}/v1", api_key=secret, model=MODEL, timeout=30, max_retries=0,
                          default_headers={"Cache-Control": "no-cache"})
    pieces = [piece.content for piece in uncached.stream(conversation)]
    assert "".join(pieces) == reply.content and len([piece for piece in pieces if piece]) >= 2
    assert emulator.request_count == 2
    assert [(r.endpoint, r.key_id, r.status, r.cached) for r in records(app)] == [(CHAT, key.id, 200, False)] * 2
    assert all(r.total_cost > 0 for r in records(app))


def test_a_completed_chat_stream_is_cached_and_a_repeat_is_replayed_as_a_stream(gateway_with_key, emulator):
    app, server, key, secret = gateway_with_key()
    client = sdk(server, secret)
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about rivers"}], "stream": True,
           "stream_options": {"include_usage": True}}
    first = list(client.chat.completions.create(**ask))
    again = list(client.chat.completions.create(**ask))
    text = lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # noqa: E731
    assert text(again) == text(first) and text(first).startswith("Demo reply to: Tell me about rivers")
    assert again[-1].usage.total_tokens == first[-1].usage.total_tokens > 0
    assert [c.choices[0].finish_reason for c in again if c.choices][-1] == "stop"
    assert emulator.request_count == 1  # the repeat made no upstream call
    miss, hit = records(app)
    assert (miss.cached, hit.cached, hit.total_cost, hit.key_id) == (False, True, 0.0, key.id)
    assert hit.saved_cost == pytest.approx(miss.total_cost)


def test_the_model_listing_is_the_keys_allowed_models(gateway_with_key):
    _, server, _, secret = gateway_with_key({"allowed_models": ["gemini-2.0-flash", "gpt-4o-mini"]})
    models = sdk(server, secret).models.list()
    assert [model.id for model in models.data] == ["gemini-2.0-flash", "gpt-4o-mini"]
    assert {(model.object, model.owned_by) for model in models.data} == {("model", "gemini"), ("model", "openai")}
    assert all(model.created > 1_700_000_000 for model in models.data)
    one = sdk(server, secret).models.retrieve("gpt-4o-mini")
    assert (one.id, one.object, one.owned_by) == ("gpt-4o-mini", "model", "openai")
    for hidden in ("claude-haiku-4-5", "no-such-model"):  # another key's model is as absent as an unknown one
        with pytest.raises(openai.NotFoundError) as raised:
            sdk(server, secret).models.retrieve(hidden)
        assert raised.value.code == "model_not_found"


# --- errors, as the SDK raises them ------------------------------------------------------------------

def test_an_unsupported_field_is_a_400_naming_it(gateway_with_key, emulator):
    app, server, _, secret = gateway_with_key()
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(server, secret, max_retries=0).chat.completions.create(
            model=MODEL, messages=[USER], tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    error = raised.value
    assert error.status_code == 400 and error.param == "tools" and "'tools'" in error.message
    assert error.type == "invalid_request_error" and error.code == "invalid_request"
    assert emulator.request_count == 0 and error.response.headers["X-Request-ID"]


def test_no_key_or_a_wrong_key_is_a_401_in_openai_format(gateway_with_key):
    _, server, _, _ = gateway_with_key()
    with pytest.raises(openai.AuthenticationError) as raised:
        sdk(server, "not-a-key", max_retries=0).chat.completions.create(model=MODEL, messages=[USER])
    assert raised.value.type == "authentication_error" and raised.value.code == "invalid_api_key"
    bare = requests.post(f"{server.url}{CHAT}", json={"model": MODEL, "messages": [USER]}, timeout=30)
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
    assert set(bare.json()) == {"error"} and set(bare.json()["error"]) == {"message", "type", "param", "code"}
    assert bare.headers["X-Request-ID"]


def test_the_rate_limiter_is_a_429_in_openai_format(gateway_with_key, emulator):
    _, server, _, secret = gateway_with_key(ratelimit_enabled=True, ratelimit_task_limits="2 per minute")
    client = sdk(server, secret, max_retries=0)
    for n in range(2):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"question {n}"}])
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model=MODEL, messages=[USER])
    assert raised.value.type == "rate_limit_error" and raised.value.code == "rate_limit_exceeded"
    assert int(raised.value.response.headers["Retry-After"]) > 0 and emulator.request_count == 2


def test_a_failing_upstream_is_a_502_in_openai_format(gateway_with_key, emulator):
    app, server, key, secret = gateway_with_key(fallbacks_text=())
    emulator.set_steady_fault("bad_request")
    with pytest.raises(openai.InternalServerError) as raised:
        sdk(server, secret, max_retries=0).chat.completions.create(model=MODEL, messages=[USER])
    assert raised.value.status_code == 502 and raised.value.type == "api_error"
    assert raised.value.code == "upstream_rejected"
    [record] = records(app)
    assert (record.status, record.total_cost, record.key_id) == (502, 0.0, key.id)


def test_an_unknown_model_is_a_404_model_not_found(gateway_with_key, emulator):
    _, server, _, secret = gateway_with_key()
    with pytest.raises(openai.NotFoundError) as raised:
        sdk(server, secret, max_retries=0).chat.completions.create(model="gpt-9-ultra", messages=[USER])
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    assert raised.value.type == "invalid_request_error" and emulator.request_count == 0


def test_a_stream_cut_mid_way_ends_with_an_error_line_and_is_billed_for_what_came(gateway_with_key, emulator):
    app, server, key, secret = gateway_with_key(fallbacks_text=())
    emulator.inject("cut", after=2)
    seen = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in sdk(server, secret, max_retries=0).chat.completions.create(model=MODEL, messages=[USER],
                                                                                 stream=True):
            seen.append(chunk)
    assert raised.value.body["type"] == "api_error" and raised.value.body["code"] == "upstream_unavailable"
    assert any(chunk.choices and chunk.choices[0].delta.content for chunk in seen)
    [record] = records(app)
    assert (record.status, record.key_id) == (502, key.id) and record.output_tokens > 0


def test_a_stream_that_cannot_start_is_a_plain_openai_error(gateway_with_key, emulator):
    _, server, _, secret = gateway_with_key(fallbacks_text=())
    emulator.set_steady_fault("bad_request")
    response = requests.post(f"{server.url}{CHAT}", json={"model": MODEL, "messages": [USER], "stream": True},
                             headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert response.status_code == 502 and response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "upstream_rejected"


def test_in_demo_mode_the_sdk_streams_from_the_gateway_into_the_ledger(make_app, serve):
    """The issue's "done when": the SDK with stream=True against a gateway with no provider key (demo mode)."""
    app = make_app(google_api_key="", gemini_base_url="", auth_enabled=True, ratelimit_enabled=False)
    gateway = app.extensions["gateway"]
    assert gateway.upstream.mode == "demo"
    key, secret = gateway.keys.create(name="demo")
    client = sdk(serve(app), secret)
    for model in ("gemini-2.0-flash", "gpt-4o-mini", "claude-haiku-4-5"):  # each provider's emulator
        chunks = list(client.chat.completions.create(model=model, messages=[USER], stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].model == model and "".join(
            chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert [(r.model, r.key_id, r.status) for r in records(app)] == [
        (model, key.id, 200) for model in ("gemini-2.0-flash", "gpt-4o-mini", "claude-haiku-4-5")]
    assert all(r.total_cost > 0 and r.token_source == "provider" for r in records(app))
