"""Upstream replies that break mid-way or lie: billed for what arrived, 502 for off-contract shapes,
believable usage only, and no library's words in what the client is told.

The emulator serves the exact replies over HTTP (`raw`) or fails a stream part-way (`cut`,
`bad_chunk`, `error_chunk`, `stall`). Streams and transport failures go through waitress; the
checks of a reply's content use Flask's test client in front (they are the gateway's logic, not
the server's, and a waitress server costs a second to stop).
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import requests

from tests.test_streaming import STREAM, events_of

TEXT = "/api/v1/generate/text"
PROMPT = "one two three four five six seven eight nine ten"
GOOD_CANDIDATE = {"content": {"parts": [{"text": "A fine answer."}], "role": "model"}, "finishReason": "STOP"}
LIBRARY_NAME = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception|Timeout)\b")  # RemoteProtocolError, ReadTimeout...


@pytest.fixture
def live(make_app, serve):
    """A waitress server over the emulator; upstream calls have a 1 s deadline on the real clock."""
    app = make_app(ratelimit_enabled=False, gemini_deadline_seconds=1, client_policy={"clock": time.monotonic})
    return app, serve(app)


@pytest.fixture
def app(make_app):
    return make_app(ratelimit_enabled=False)


def post(server, path: str, prompt: str = PROMPT) -> requests.Response:
    return requests.post(server.url + path, json={"prompt": prompt}, timeout=30)


def ask(app, path: str, prompt: str = PROMPT):
    return app.test_client().post(path, json={"prompt": prompt})


def plain_chunks(emulator, body: dict) -> list[dict]:
    """The chunks the emulator streams for `body` when nothing goes wrong (asked directly, not through us)."""
    url = f"{emulator.base_url}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    with httpx.stream("POST", url, json=body, headers={"x-goog-api-key": "k"}, timeout=10) as response:
        return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]


def only_record(app):
    records = app.extensions["gateway"].tracker.records()
    assert len(records) == 1
    return records[0]


# --- a stream that fails mid-way is billed for the usage received so far ------------------------------

@pytest.mark.parametrize("fault, params, status, code", [
    ("cut", {"after": 2}, 502, "upstream_unavailable"),  # the connection closes mid-stream
    ("bad_chunk", {"after": 1}, 502, "upstream_bad_answer"),  # a chunk that is not JSON
    ("error_chunk", {"after": 2}, 502, "upstream_unavailable"),  # an error object instead of a chunk
    ("stall", {"after": 1, "seconds": 60}, 504, "upstream_timeout"),  # nothing more until the deadline
])
def test_a_stream_failing_mid_way_is_billed_for_the_usage_received(live, emulator, fault, params, status, code):
    app, server = live
    emulator.inject(fault, **params)
    response = post(server, STREAM)
    events = events_of(response.text)
    assert [name for name, _ in events] == ["chunk"] * params["after"] + ["error"]
    assert events[-1][1]["code"] == code
    usage = plain_chunks(emulator, emulator.requests[0]["json"])[params["after"] - 1]["usageMetadata"]
    record = only_record(app)
    assert (record.status, record.token_source) == (status, "provider")
    assert (record.input_tokens, record.output_tokens) == (usage["promptTokenCount"], usage["candidatesTokenCount"])
    price_of = app.extensions["gateway"].service.price_of
    assert record.total_cost == price_of("gemini-2.0-flash", record.input_tokens, record.output_tokens).total > 0


def test_a_stream_whose_first_chunk_is_off_contract_is_a_plain_502_and_costs_nothing(app, emulator):
    """The first chunk is read before the 200 goes out (opening a stream is retried up to it), so a
    first chunk that cannot be used is an ordinary JSON error with its status, not an event."""
    emulator.inject("raw", events=[{"candidates": "hello", "usageMetadata": {"promptTokenCount": 9}}])
    response = ask(app, STREAM)
    assert response.status_code == 502 and response.get_json()["code"] == "upstream_bad_answer"
    record = only_record(app)
    assert (record.status, record.total_cost, record.input_tokens) == (502, 0, 0)


@pytest.mark.parametrize("fault, params, status", [
    ("safety_block", {}, 400),  # refused like a plain call, before the stream starts: billed $0 as a plain call is
])
def test_a_stream_that_fails_before_anything_usable_costs_nothing(app, emulator, fault, params, status):
    emulator.inject(fault, **params)
    response = ask(app, STREAM)
    assert response.status_code == status and response.get_json()["code"] == "content_blocked"
    record = only_record(app)
    assert (record.status, record.total_cost, record.input_tokens) == (status, 0, 0)


# --- off-contract replies are 502 upstream_bad_answer ------------------------------------------------

OFF_CONTRACT = {
    "parts as a string": {"candidates": [{"content": {"parts": "hello", "role": "model"}}]},
    "candidates as strings": {"candidates": ["hello", "world"]},
    "candidates as an object": {"candidates": GOOD_CANDIDATE},
    "content as a list": {"candidates": [{"content": [{"text": "hello"}]}]},
    "a part as a string": {"candidates": [{"content": {"parts": ["hello"]}}]},
    "text as a number": {"candidates": [{"content": {"parts": [{"text": 42}]}}]},
    "finishReason as an object": {"candidates": [{**GOOD_CANDIDATE, "finishReason": {"a": 1}}]},
    "promptFeedback as a string": {"candidates": [GOOD_CANDIDATE], "promptFeedback": "SAFETY"},
    "the reply as a list": [{"candidates": [GOOD_CANDIDATE]}],
    "the reply as a string": "A fine answer.",
}


@pytest.mark.parametrize("body", OFF_CONTRACT.values(), ids=OFF_CONTRACT.keys())
def test_an_off_contract_reply_is_a_502_bad_answer(app, emulator, body):
    emulator.inject("raw", body=body)
    response = ask(app, TEXT)
    assert response.status_code == 502, response.text
    assert response.get_json()["code"] == "upstream_bad_answer"
    assert emulator.request_count == 1  # not retried: asking again would not change the shape
    record = only_record(app)
    assert record.status == 502 and record.total_cost == 0


def test_an_off_contract_stream_chunk_ends_the_stream_billed_for_what_came_before(app, emulator):
    usage = {"promptTokenCount": 40, "candidatesTokenCount": 3}
    emulator.inject("raw", events=[{"candidates": [GOOD_CANDIDATE], "usageMetadata": usage},
                                   {"candidates": "hello"}])
    events = events_of(ask(app, STREAM).text)
    assert [name for name, _ in events] == ["chunk", "error"]
    assert events[-1][1]["code"] == "upstream_bad_answer"
    record = only_record(app)
    assert (record.status, record.input_tokens, record.output_tokens, record.token_source) == (502, 40, 3, "provider")


# --- usage that cannot be believed is replaced by our estimate ---------------------------------------

USAGE_LIES = {
    "negative": {"promptTokenCount": -1_000_000, "candidatesTokenCount": 5},
    "a string": {"promptTokenCount": "12", "candidatesTokenCount": 5},
    "a bool": {"promptTokenCount": 12, "candidatesTokenCount": True},
    "a float": {"promptTokenCount": 12.5, "candidatesTokenCount": 5},
    "beyond any context window": {"promptTokenCount": 10**12, "candidatesTokenCount": 5},
    "a huge number": {"promptTokenCount": 10**400, "candidatesTokenCount": 5},
    "not an object": "lots",
}


@pytest.mark.parametrize("usage", USAGE_LIES.values(), ids=USAGE_LIES.keys())
def test_unbelievable_usage_is_billed_from_our_estimate(app, emulator, usage):
    emulator.inject("raw", body={"candidates": [GOOD_CANDIDATE], "usageMetadata": usage})
    response = ask(app, TEXT)
    assert response.status_code == 200, response.text
    body = response.get_json()
    assert body["generated_text"] == "A fine answer."
    assert body["usage"]["source"] == "estimate"
    assert 0 < body["usage"]["input_tokens"] < 100 and 0 < body["usage"]["output_tokens"] < 100
    assert body["cost"]["total"] > 0 and float(response.headers["X-Cost-Overall"]) > 0
    record = only_record(app)
    assert record.token_source == "estimate" and record.input_cost > 0


def test_unbelievable_usage_in_a_stream_is_billed_from_our_estimate(app, emulator):
    emulator.inject("raw", events=[{"candidates": [GOOD_CANDIDATE],
                                    "usageMetadata": {"promptTokenCount": -5, "candidatesTokenCount": 3}}])
    name, done = events_of(ask(app, STREAM).text)[-1]
    assert name == "done" and done["usage"]["source"] == "estimate" and done["cost"]["total"] > 0
    assert only_record(app).total_cost > 0


# --- client-facing messages are our own words --------------------------------------------------------

@pytest.mark.parametrize("path, fault, params", [
    (STREAM, "bad_chunk", {"after": 1}),  # the SDK's UnknownApiResponseError quotes the raw chunk
    (TEXT, "malformed", {}),  # JSONDecodeError
    (TEXT, "drop", {}),  # RemoteProtocolError, on every attempt
    (TEXT, "cut", {}),  # half a body, then the close
    (TEXT, "hang", {"seconds": 60}),  # ReadTimeout
])
def test_client_messages_carry_no_library_names_or_texts(make_app, serve, emulator, tmp_path, path, fault, params):
    # one attempt: the client gets the translated error itself, not the retry policy's summary of it
    app = make_app(ratelimit_enabled=False, gemini_deadline_seconds=1, retry_max_attempts=1)
    server = serve(app)
    emulator.set_steady_fault(fault, **params)
    response = post(server, path)
    emulator.clear_faults()
    errors = [data for _, data in events_of(response.text)][-1:] if path == STREAM else [response.json()]
    assert errors[0]["code"].startswith("upstream_")
    assert not LIBRARY_NAME.search(response.text), response.text
    assert "Bad Gateway" not in response.text and "<html>" not in response.text
    app.extensions["gateway"].logger.close()
    assert LIBRARY_NAME.search((tmp_path / "logs" / "api_errors.log").read_text())  # the detail is kept there


def test_a_deadline_spent_on_retries_does_not_quote_the_last_error(make_app, emulator, clock):
    emulator.set_steady_fault("server_error")
    response = make_app(ratelimit_enabled=False, gemini_deadline_seconds=3).test_client().post(
        TEXT, json={"prompt": "hello"})
    body = response.get_json()
    assert response.status_code == 504 and body["code"] == "upstream_timeout"
    assert body["details"]["last_error"] == "upstream_unavailable"  # our code for it
    assert "last error" not in body["error"] and "HTTP 500" not in body["error"]
    assert "internal error" not in response.get_data(as_text=True).lower()
