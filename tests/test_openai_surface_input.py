"""The OpenAI-compatible surface refuses what it cannot honour, and answers every failure in OpenAI's format.

Hostile and unsupported bodies are a 400 naming the field (never a 500, never a provider call);
the refusals of the request hooks (key, budget, task, model, token limit, body size, media type)
keep the gateway's statuses in OpenAI's `{"error": {message, type, param, code}}`; the rest of the
API keeps its own error shape.
"""

from __future__ import annotations

import json

import pytest

CHAT = "/v1/chat/completions"
MODEL = "gemini-2.0-flash"
USER = {"role": "user", "content": "Tell me about rivers"}


def body(**fields) -> dict:
    return {"model": MODEL, "messages": [USER], **fields}


def openai_error(response, status: int) -> dict:
    """The `error` object of an OpenAI-format error answer with that status (its shape checked)."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    payload = response.get_json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    assert response.headers["X-Request-ID"]
    return payload["error"]


@pytest.fixture
def chat(make_app, emulator):
    client = make_app(ratelimit_enabled=False).test_client()
    return lambda payload, **kwargs: client.post(CHAT, json=payload, **kwargs)


HOSTILE = [
    (body(messages=[USER] * 10_000), "messages"),
    (body(messages=[{"role": "user", "content": "x" * 40_000}]), "messages"),
    (body(messages=[{"role": "user", "content": "x" * 20_000}, {"role": "user", "content": "y" * 20_000}]),
     "messages"),
    (body(messages=[]), "messages"),
    (body(messages="hello"), "messages"),
    (body(messages=[{"role": "system", "content": "only a system prompt"}]), "messages"),
    (body(messages=["hello"]), "messages[0]"),
    (body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (body(messages=[{"role": "user", "content": {"text": "hi"}}]), "messages[0].content"),
    (body(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (body(messages=[{"role": "user", "content": "   "}]), "messages[0].content"),
    (body(messages=[{"role": "user", "content": []}]), "messages[0].content"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}] * 65}]), "messages[0].content"),
    (body(messages=[{"role": "user", "content": [5]}]), "messages[0].content[0]"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "messages[0].content[0]"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
     "messages[0].content[0].type"),
    (body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages[0].content[0].type"),
    (body(messages=[{"role": "robot", "content": "beep"}]), "messages[0].role"),
    (body(messages=[{"content": "no role"}]), "messages[0].role"),
    (body(messages=[{"role": ["user"], "content": "hi"}]), "messages[0].role"),
    (body(messages=[USER, {"role": "tool", "content": "42", "tool_call_id": "call_1"}]), "messages[1].role"),
    (body(messages=[USER, {"role": "function", "name": "f", "content": "42"}]), "messages[1].role"),
    (body(messages=[USER, {"role": "assistant", "content": "x", "tool_calls": [{"id": "c"}]}, USER]),
     "messages[1].tool_calls"),
    (body(messages=[{"role": "user", "content": "hi", "name": "bob"}]), "messages[0].name"),
    (body(stream="true"), "stream"), (body(stream=1), "stream"),
    (body(n=0), "n"), (body(n=2), "n"), (body(n="1"), "n"), (body(n=True), "n"),
    (body(max_tokens=-1), "max_tokens"), (body(max_tokens=0), "max_tokens"), (body(max_tokens=1.5), "max_tokens"),
    (body(max_tokens="10"), "max_tokens"), (body(max_tokens=True), "max_tokens"),
    (body(max_completion_tokens=10**12), "max_completion_tokens"),
    (body(max_tokens=10, max_completion_tokens=20), "max_tokens"),
    (body(max_completion_tokens=900_000), "max_completion_tokens"),  # over the model's limit: the client's name
    (body(max_tokens=900_000), "max_tokens"),
    (body(temperature=3), "temperature"), (body(temperature="hot"), "temperature"),
    (body(temperature=True), "temperature"),
    (body(top_p=1.5), "top_p"), (body(top_p=-0.1), "top_p"),
    (body(stop=5), "stop"), (body(stop=[""]), "stop"), (body(stop=["a"] * 5), "stop"), (body(stop=["x" * 101]), "stop"),
    (body(user=5), "user"), (body(user="u" * 257), "user"),
    (body(stream_options={"include_usage": True}), "stream_options"),
    (body(stream=True, stream_options={"include_usage": "yes"}), "stream_options"),
    (body(stream=True, stream_options={"include_usage": True, "extra": 1}), "stream_options"),
    (body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"), (body(tool_choice="auto"), "tool_choice"),
    (body(functions=[{"name": "f"}]), "functions"), (body(function_call="auto"), "function_call"),
    (body(logprobs=True), "logprobs"), (body(top_logprobs=3), "top_logprobs"),
    (body(response_format={"type": "json_object"}), "response_format"),
    (body(frequency_penalty=0.5), "frequency_penalty"), (body(presence_penalty=False), "presence_penalty"),
    (body(logit_bias={"50256": -100}), "logit_bias"), (body(seed=7), "seed"),
    (body(modalities=["text", "audio"]), "modalities"), (body(frobnicate=1), "frobnicate"),
    ({"messages": [USER]}, "model"), (body(model=5), "model"), (body(model=""), "model"),
    (body(model="m" * 129), "model"),
    ([USER], "body"), ("just a string", "body"),
]


@pytest.mark.parametrize("payload, param", HOSTILE, ids=[f"{n}-{param}" for n, (_, param) in enumerate(HOSTILE)])
def test_bad_or_unsupported_input_is_a_400_naming_the_field(chat, emulator, payload, param):
    error = openai_error(chat(payload), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert param.split(".")[-1].split("[")[0] in error["message"] or param == "body"
    assert emulator.request_count == 0


@pytest.mark.parametrize("extra", [
    {"n": 1}, {"logprobs": False}, {"response_format": {"type": "text"}}, {"frequency_penalty": 0},
    {"presence_penalty": 0.0}, {"tools": []}, {"tools": None, "seed": None, "stream_options": None},
    {"max_tokens": 50, "max_completion_tokens": 50}, {"stop": "###"}, {"user": "end-user-1"},
    {"messages": [USER, {"role": "assistant", "content": "Rivers?", "tool_calls": [], "refusal": None}, USER]},
])
def test_neutral_values_of_unsupported_fields_are_accepted(chat, emulator, extra):
    response = chat(body(**extra))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["choices"][0]["message"]["content"]


def test_text_parts_and_the_developer_role_are_read_as_text_and_system(chat, emulator):
    response = chat(body(messages=[{"role": "developer", "content": "Answer in French."},
                                   {"role": "user", "content": [{"type": "text", "text": "Tell me"},
                                                                {"type": "text", "text": "about rivers"}]},
                                   {"role": "assistant", "content": "Which rivers?"},
                                   {"role": "user", "content": "The long ones"}]))
    assert response.status_code == 200
    sent = emulator.requests[-1]["json"]
    assert "Answer in French." in json.dumps(sent["systemInstruction"])
    assert [turn["role"] for turn in sent["contents"]] == ["user", "model", "user"]
    assert "Tell me\\nabout rivers" in json.dumps(sent["contents"][0])


def test_a_nan_temperature_and_malformed_json_are_400s_in_openai_format(make_app, emulator):
    client = make_app(ratelimit_enabled=False).test_client()
    nan = client.post(CHAT, data='{"model": "gemini-2.0-flash", "temperature": NaN, "messages": '
                                 '[{"role": "user", "content": "hi"}]}', content_type="application/json")
    assert openai_error(nan, 400)["param"] == "temperature"
    broken = openai_error(client.post(CHAT, data='{"model": ', content_type="application/json"), 400)
    assert broken["type"] == "invalid_request_error" and "not valid JSON at line 1" in broken["message"]
    deep = openai_error(client.post(CHAT, data="[" * 100_000 + "]" * 100_000, content_type="application/json"), 400)
    assert "nested too deeply" in deep["message"]
    not_json = openai_error(client.post(CHAT, data="hello", content_type="text/plain"), 415)
    assert not_json["code"] == "unsupported_media_type" and not_json["type"] == "invalid_request_error"
    assert emulator.request_count == 0


def test_paths_and_methods_and_sizes_fail_in_openai_format(make_app, emulator):
    client = make_app(ratelimit_enabled=False, request_max_bytes=2048).test_client()
    assert openai_error(client.get(CHAT), 405)["code"] == "method_not_allowed"
    assert openai_error(client.post("/v1/completions", json=body()), 404)["type"] == "not_found_error"
    assert openai_error(client.get("/v1"), 404)["code"] == "not_found"
    too_large = openai_error(client.post(CHAT, json=body(messages=[{"role": "user", "content": "x" * 3000}])), 413)
    assert too_large["code"] == "payload_too_large"
    other = client.get("/api/v1/nothing").get_json()  # the rest of the API keeps its own shape
    assert other["code"] == "not_found" and isinstance(other["error"], str) and other["request_id"]


@pytest.fixture
def keyed(make_app):
    """(client, key maker): AUTH on; `make(**settings)` -> bearer headers of a new key."""
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    keys = app.extensions["gateway"].keys

    def make(**settings) -> dict:
        _, secret = keys.create(name="client", **settings)
        return {"Authorization": f"Bearer {secret}"}

    return app.test_client(), make


def test_the_request_hooks_refusals_keep_their_statuses_in_openai_format(keyed, emulator):
    client, make = keyed
    missing = openai_error(client.post(CHAT, json=body()), 401)
    assert (missing["type"], missing["code"]) == ("authentication_error", "invalid_api_key")
    capped = make(monthly_budget_usd=0.0000001)
    assert client.post(CHAT, json=body(), headers=capped).status_code == 200  # spends the budget
    broke = openai_error(client.post(CHAT, json=body(messages=[{"role": "user", "content": "more"}]),
                                     headers=capped), 402)
    assert (broke["type"], broke["code"]) == ("insufficient_quota", "insufficient_quota")
    no_text = openai_error(client.post(CHAT, json=body(), headers=make(allowed_tasks=["code"])), 403)
    assert (no_text["type"], no_text["code"]) == ("permission_error", "task_not_allowed")
    no_model = openai_error(client.post(CHAT, json=body(), headers=make(allowed_models=["gpt-4o-mini"])), 403)
    assert (no_model["type"], no_model["code"]) == ("permission_error", "model_not_allowed")
    hungry = make(tokens_per_minute=10)
    fresh = body(messages=[{"role": "user", "content": "Tell me about tokens"}])  # a miss: it spends tokens
    assert client.post(CHAT, json=fresh, headers=hungry).status_code == 200  # more than 10
    limited = client.post(CHAT, json=fresh, headers=hungry)
    error = openai_error(limited, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert int(limited.headers["Retry-After"]) > 0 and emulator.request_count == 2  # the two admitted misses


def test_a_model_listing_needs_a_key_too(keyed):
    client, make = keyed
    assert openai_error(client.get("/v1/models"), 401)["type"] == "authentication_error"
    listing = client.get("/v1/models", headers=make()).get_json()
    assert listing["object"] == "list" and {"gemini-2.0-flash", "gpt-4o-mini"} <= {m["id"] for m in listing["data"]}


def test_a_chat_stream_the_client_abandons_is_closed_upstream_and_recorded_as_499(make_app, emulator):
    emulator.inject("stall", after=1, seconds=30)  # the first chunk, then the stream held open until we hang up
    app = make_app(ratelimit_enabled=False)
    response = app.test_client().post(CHAT, json=body(stream=True), buffered=False)
    role, first = next(iter(response.response)).split(b"\n\n")[:2]  # the role chunk goes out with the first piece
    assert json.loads(role.removeprefix(b"data: "))["choices"][0]["delta"]["role"] == "assistant"
    assert b'"content":"' in first and emulator.deliveries.empty()  # the provider's stream is open
    response.close()  # what the server does when the client disconnects
    delivery = emulator.wait_delivery(timeout=5)
    assert delivery.client_closed and delivery.sent < delivery.total
    [record] = app.extensions["gateway"].tracker.records()
    assert (record.endpoint, record.status, record.token_source) == (CHAT, 499, "provider") and record.total_cost > 0


def test_an_alias_answers_under_the_models_id_and_a_cut_answer_finishes_with_length(chat, emulator, make_app):
    alias = next(spec for spec in make_app().extensions["gateway"].registry if spec.aliases)
    emulator.inject("raw", body={"candidates": [{"content": {"role": "model", "parts": [{"text": "cut short"}]},
                                                 "finishReason": "MAX_TOKENS"}],
                                 "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3,
                                                   "totalTokenCount": 8}})
    answer = chat(body(model=alias.aliases[0], max_tokens=3)).get_json()
    assert answer["model"] == alias.id and answer["choices"][0]["finish_reason"] == "length"
    assert answer["choices"][0]["message"]["content"] == "cut short"
    too_many = openai_error(chat(body(max_tokens=900_000)), 400)  # over the model's output limit
    assert too_many["param"] == "max_tokens"


@pytest.mark.parametrize("reason, expected", [("STOP", "stop"), ("end_turn", "stop"), ("stop_sequence", "stop"),
                                              ("MAX_TOKENS", "length"), ("length", "length"),
                                              ("max_tokens", "length"), ("SAFETY", "content_filter"),
                                              ("content_filter", "content_filter"), (None, "stop"),
                                              ("OTHER", "stop")])
def test_every_providers_finish_reason_maps_to_openais(reason, expected):
    from gateway.http.openai_wire import finish_reason

    assert finish_reason(reason) == expected
