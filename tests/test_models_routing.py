"""Per-request models and parameters, fallbacks across providers, and the readiness probes, end to end:
the gateway app against the Gemini, OpenAI-compatible and Anthropic emulators through the real SDKs."""

from __future__ import annotations

import json
import shutil

import pytest

from gateway.providers import demo

TEXT = "/api/v1/generate/text"




def only_record(app):
    [record] = app.extensions["gateway"].tracker.records()
    return record


def test_a_steadily_failing_gemini_is_answered_by_the_openai_fallback_at_its_price(make_app, emulator,
                                                                                   openai_emulator):
    app = make_app(ratelimit_enabled=False, openai_api_key="sk-test-not-a-secret",
                   openai_base_url=openai_emulator.base_url, fallbacks_text=("gpt-4o-mini",))
    emulator.set_steady_fault("server_error")
    response = app.test_client().post(TEXT, json={"prompt": "Tell me about the sea"})
    body = response.get_json()
    assert response.status_code == 200, body
    assert (body["model"], body["provider"], body["fallback_used"]) == ("gpt-4o-mini", "openai", True)
    assert response.headers["X-Fallback-Used"] == "true" and response.headers["X-Model"] == "gpt-4o-mini"
    assert emulator.request_count >= 2 and openai_emulator.request_count == 1
    record = only_record(app)
    price = app.extensions["gateway"].registry.price("gpt-4o-mini")
    expected = (record.input_tokens * price.input_per_million + record.output_tokens * price.output_per_million) / 1e6
    assert record.model == "gpt-4o-mini" and record.input_tokens > 0
    assert record.total_cost == pytest.approx(expected) and response.headers["X-Cost-Total"] == f"{expected:.10f}"
    assert app.extensions["gateway"].logger.flush()  # log lines are written off the request thread
    line = json.loads((app.extensions["gateway"].config.log_dir / "api_requests.log").read_text().splitlines()[-1])
    # its retries of the 500s ran out of its half of the deadline (two models share it)
    assert line["failed_models"] == ["gemini-2.0-flash: upstream_timeout"] and line["provider"] == "openai"


def test_a_request_may_name_its_fallbacks_and_none_means_none(make_app, emulator, openai_emulator):
    app = make_app(ratelimit_enabled=False, openai_api_key="sk-test-not-a-secret",
                   openai_base_url=openai_emulator.base_url, fallbacks_text=("gpt-4o-mini",))
    emulator.set_steady_fault("server_error")
    response = app.test_client().post(TEXT, json={"prompt": "hello", "fallbacks": []})
    assert response.status_code == 502 and openai_emulator.request_count == 0
    assert response.get_json()["code"] == "upstream_unavailable"


def test_a_safety_block_is_not_shopped_around_the_fallbacks(make_app, emulator, openai_emulator):
    app = make_app(ratelimit_enabled=False, openai_api_key="sk-test-not-a-secret",
                   openai_base_url=openai_emulator.base_url, fallbacks_text=("gpt-4o-mini",))
    emulator.inject("safety_block")
    response = app.test_client().post(TEXT, json={"prompt": "hello"})
    assert response.status_code == 400 and response.get_json()["code"] == "content_blocked"
    assert openai_emulator.request_count == 0


def test_demo_mode_answers_a_claude_model_from_the_anthropic_emulator(make_app):
    app = make_app(ratelimit_enabled=False, google_api_key="")
    anthropic = demo._demo_emulator("anthropic")
    before = anthropic.request_count
    response = app.test_client().post(TEXT, json={"prompt": "Say hello", "model": "claude-haiku-4-5",
                                                  "max_tokens": 50})
    body = response.get_json()
    assert response.status_code == 200, body
    assert (body["model"], body["provider"]) == ("claude-haiku-4-5", "anthropic")
    assert body["usage"]["source"] == "provider" and body["cost"]["total"] > 0
    assert anthropic.request_count == before + 1 and anthropic.requests[-1]["json"]["max_tokens"] == 50
    # and the OpenAI-compatible emulator for a GPT model, by one of the registry's ids
    response = app.test_client().post(TEXT, json={"prompt": "Say hello", "model": "gpt-4o-mini"})
    assert response.status_code == 200 and response.get_json()["provider"] == "openai"


def test_an_alias_is_recorded_under_the_models_id(make_app, emulator):
    app = make_app(ratelimit_enabled=False)
    response = app.test_client().post(TEXT, json={"prompt": "hello", "model": "gemini-2.0-flash-001"})
    assert response.status_code == 200 and response.get_json()["model"] == "gemini-2.0-flash"
    assert only_record(app).model == "gemini-2.0-flash"


@pytest.mark.parametrize("extra, field", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop": "END"}, "stop"), ({"model": ""}, "model"), ({"model": "no-such-model"}, "model"),
    ({"fallbacks": ["no-such-model"]}, "fallbacks"), ({"fallbacks": ["gemini-2.0-flash"] * 6}, "fallbacks"),
])
def test_bad_parameters_are_a_400_naming_the_field(client, emulator, extra, field):
    response = client.post(TEXT, json={"prompt": "hello", **extra})
    body = response.get_json()
    assert response.status_code == 400 and body["code"] == "invalid_request", body
    assert field in body["details"]["fields"] and field in body["error"]
    assert emulator.request_count == 0


def test_a_nan_temperature_is_refused(client, emulator):
    response = client.post(TEXT, data='{"prompt": "hello", "temperature": NaN}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and emulator.request_count == 0


def test_parameters_reach_the_wire_and_are_part_of_the_cache_key(client, emulator):
    ask = {"prompt": "hello", "temperature": 0.1, "top_p": 0.5, "max_tokens": 64, "stop": ["END"]}
    first = client.post(TEXT, json=ask)
    assert first.status_code == 200 and first.headers["X-Cached"] == "false"
    sent = emulator.requests[-1]["json"]["generationConfig"]
    assert sent == {"temperature": 0.1, "topP": 0.5, "maxOutputTokens": 64, "stopSequences": ["END"]}
    assert client.post(TEXT, json=ask).headers["X-Cached"] == "true"
    for changed in ({"temperature": 0.2}, {"top_p": 0.6}, {"max_tokens": 65}, {"stop": ["STOP"]}, {"stop": []}):
        assert client.post(TEXT, json={**ask, **changed}).headers["X-Cached"] == "false", changed
    assert client.post(TEXT, json={"prompt": "hello"}).headers["X-Cached"] == "false"  # task defaults differ
    assert emulator.requests[-1]["json"]["generationConfig"] == {"temperature": 0.7}  # the text task's default


def test_a_model_whose_provider_has_no_key_is_a_503_naming_the_variable(client, emulator):
    response = client.post(TEXT, json={"prompt": "hello", "model": "gpt-4o-mini"})
    body = response.get_json()
    assert response.status_code == 503 and body["code"] == "provider_not_configured"
    assert body["details"]["missing"] == "OPENAI_API_KEY" and "OPENAI_API_KEY" in body["error"]
    assert emulator.request_count == 0


def test_a_configured_fallback_without_a_key_is_left_out_not_refused(make_app, emulator):
    app = make_app(ratelimit_enabled=False, fallbacks_text=("gpt-4o-mini",))  # no OPENAI_API_KEY
    assert app.test_client().post(TEXT, json={"prompt": "hello"}).status_code == 200


def test_ready_is_200_then_503_naming_the_ledger_when_it_cannot_be_written(make_app, emulator, tmp_path):
    app = make_app(ratelimit_enabled=False, cost_ledger_path=tmp_path / "ledgers" / "ledger.sqlite3")
    ready = app.test_client().get("/api/v1/ready")
    assert ready.status_code == 200 and ready.get_json() == {
        "ready": True, "checks": {"config": "ok", "ledger": "ok", "models": "ok"}}
    ledger = tmp_path / "ledgers" / "ledger.sqlite3"
    shutil.move(ledger, tmp_path / "moved.sqlite3")
    ledger.mkdir()  # the ledger's path is now a folder: nothing can be written there
    ready = app.test_client().get("/api/v1/ready")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["ledger"] == "the cost ledger cannot be written"


def test_status_shows_models_circuits_and_settings_without_keys(make_app, emulator, openai_emulator):
    app = make_app(ratelimit_enabled=False, openai_api_key="sk-test-not-a-secret",
                   openai_base_url=openai_emulator.base_url)
    status = app.test_client().get("/api/v1/status")
    body = status.get_json()
    assert status.status_code == 200 and body["mode"] == "live" and body["default_model"] == "gemini-2.0-flash"
    models = {model["id"]: model for model in body["models"]}
    assert models["gpt-4o-mini"]["configured"] and models["gpt-4o-mini"]["circuit"]["state"] == "closed"
    assert not models["claude-haiku-4-5"]["configured"] and models["claude-haiku-4-5"]["circuit"] is None
    assert "sk-test-not-a-secret" not in status.get_data(as_text=True)
    assert openai_emulator.base_url not in status.get_data(as_text=True)


def test_max_tokens_over_the_models_output_limit_is_a_400_not_a_provider_rejection(client, emulator):
    response = client.post(TEXT, json={"prompt": "hello", "max_tokens": 1_000_000})
    body = response.get_json()
    assert response.status_code == 400 and "max_tokens" in body["details"]["fields"]
    assert "8192" in body["error"] and emulator.request_count == 0
    assert client.post(TEXT, json={"prompt": "hello", "max_tokens": 8192}).status_code == 200


def test_a_budget_reservation_is_priced_on_the_dearest_model_the_key_may_use(make_app):
    """Requests in flight reserve what they may cost at most, before the body is read: at the output limit
    of the dearest model the key may reach. Limited to gemini-2.0-flash, three concurrent requests reserve
    about $0.003 each and fit a $0.05 budget; a key that may use gpt-4o reserves about $0.16 per request, so
    the requests that arrive while one is in flight are refused (402) before any call."""
    from concurrent.futures import ThreadPoolExecutor

    app = make_app(ratelimit_enabled=False, google_api_key="", auth_enabled=True)  # demo: every model routed
    keys = app.extensions["gateway"].keys
    _, cheap = keys.create(name="flash only", monthly_budget_usd=0.05, allowed_models=["gemini-2.0-flash"])
    _, anything = keys.create(name="any model", monthly_budget_usd=0.05)
    gemini = demo._demo_emulator("gemini")
    gemini.reply_delay = 1.5  # each answer takes a while: the three are in flight together, under load too
    try:
        def three(key):
            def one(number):
                return app.test_client().post(TEXT, json={"prompt": f"hello {number}", "model": "gemini-2.0-flash"},
                                              headers={"X-API-Key": key}).status_code
            with ThreadPoolExecutor(3) as pool:
                return sorted(pool.map(one, range(3)))

        assert three(cheap) == [200, 200, 200]
        statuses = three(anything)
        assert 402 in statuses and 200 in statuses, statuses
    finally:
        gemini.reply_delay = 0.0


def test_a_claude_stream_cut_short_is_billed_for_the_text_it_sent(make_app, tmp_path):
    """Anthropic reports output tokens at the end of a stream (1 until then): a stream cut after some text
    must not be billed as one output token."""
    from gateway.providers.emulators.anthropic import AnthropicEmulator

    with AnthropicEmulator(host="127.0.0.1", port=0) as anthropic:
        app = make_app(ratelimit_enabled=False, anthropic_api_key="sk-ant-test-not-a-secret",
                       anthropic_base_url=anthropic.base_url)
        anthropic.inject("cut", after=5)  # message_start, content_block_start, then text deltas
        response = app.test_client().post("/api/v1/generate/text/stream",
                                          json={"prompt": "Tell me a long story about the sea and its ships",
                                                "model": "claude-haiku-4-5"})
        events = [block.split("\n")[0] for block in response.get_data(as_text=True).strip().split("\n\n")]
        assert events[-1] == "event: error" and events.count("event: chunk") >= 1
        record = only_record(app)
        assert record.model == "claude-haiku-4-5" and record.status == 502
        assert record.output_tokens > 1 and record.token_source == "estimate" and record.total_cost > 0


def test_the_gateways_output_cap_bounds_what_a_request_may_ask_for(make_app, emulator):
    app = make_app(ratelimit_enabled=False, gemini_max_output_tokens=64)
    response = app.test_client().post(TEXT, json={"prompt": "hello", "max_tokens": 65})
    assert response.status_code == 400 and "64" in response.get_json()["error"] and emulator.request_count == 0
    assert app.test_client().post(TEXT, json={"prompt": "hello", "max_tokens": 64}).status_code == 200
