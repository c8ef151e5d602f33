"""Text streaming over server-sent events: chunks as they come, then usage and cost, in the ledger."""

from __future__ import annotations

import json
import queue

import pytest
import requests

STREAM = "/api/v1/generate/text/stream"


def events_of(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_stream_sends_chunks_then_done_with_usage_and_cost(make_app, emulator):
    app = make_app(ratelimit_enabled=False)
    client = app.test_client()
    response = client.post(STREAM, json={"prompt": "Tell me about rivers"})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = events_of(response.get_data(as_text=True))
    chunks = [data["text"] for name, data in events if name == "chunk"]
    name, done = events[-1]
    assert name == "done" and len(chunks) >= 2
    # the completed stream was cached: the plain request is served from it, at no cost
    whole = client.post("/api/v1/generate/text", json={"prompt": "Tell me about rivers"}).get_json()
    assert "".join(chunks) == whole["generated_text"] and whole["cached"] is True
    assert done["usage"] == whole["usage"] and done["usage"]["source"] == "provider"
    assert done["cost"]["total"] == whole["cost"]["saved"] > 0 and whole["cost"]["total"] == 0
    assert done["request_id"] == response.headers["X-Request-ID"] and done["cached"] is False
    records = app.extensions["gateway"].tracker.records()
    assert [r.endpoint for r in records] == [STREAM, "/api/v1/generate/text"]
    assert records[0].request_id == done["request_id"] and records[0].total_cost == done["cost"]["total"]
    assert emulator.request_count == 1 and emulator.requests[0]["stream"] is True


def test_stream_retries_before_the_first_chunk(make_app, emulator, clock):
    emulator.inject("rate_limit", times=2, retry_delay=1)
    response = make_app(ratelimit_enabled=False).test_client().post(STREAM, json={"prompt": "hello"})
    assert events_of(response.get_data(as_text=True))[-1][0] == "done"
    assert emulator.request_count == 3 and clock.sleeps == [1.0, 1.0]


def test_stream_that_cannot_start_is_a_plain_json_error(make_app, emulator):
    emulator.set_steady_fault("bad_request")
    app = make_app(ratelimit_enabled=False)
    response = app.test_client().post(STREAM, json={"prompt": "hello"})
    assert response.status_code == 502 and response.get_json()["code"] == "upstream_rejected"
    record = app.extensions["gateway"].tracker.records()[0]
    assert record.status == 502 and record.total_cost == 0


def test_stream_validates_input_like_the_other_endpoints(make_app):
    response = make_app(ratelimit_enabled=False).test_client().post(STREAM, json={"prompt": ""})
    assert response.status_code == 400 and "prompt" in response.get_json()["details"]["fields"]


def test_stream_arrives_in_pieces_through_waitress(make_app, emulator, serve):
    server = serve(make_app(ratelimit_enabled=False))
    with requests.post(server.url + STREAM, json={"prompt": "one two three four five"}, stream=True,
                       timeout=10) as response:
        pieces = [line for line in response.iter_lines(decode_unicode=True) if line.startswith("event:")]
    assert pieces[0] == "event: chunk" and pieces[-1] == "event: done" and len(pieces) >= 3


def test_stream_the_client_abandons_is_recorded_priced_and_released(make_app, emulator, monkeypatch):
    """The provider's stream is closed when the client leaves, seen from the provider's side: the
    emulator sends the first chunk, then holds the stream open until the gateway hangs up."""
    emulator.inject("stall", after=1, seconds=30)
    app = make_app(ratelimit_enabled=False)
    service, opened = app.extensions["gateway"].service, []
    open_stream = service.open_stream
    # Keep the stream referenced: the connection must be closed by the gateway, not by the garbage collector.
    monkeypatch.setattr(service, "open_stream", lambda *args: opened.append(open_stream(*args)) or opened[-1])
    response = app.test_client().post(STREAM, json={"prompt": "one two three four five six"}, buffered=False)
    chunks = iter(response.response)
    first = next(chunks)
    assert first.startswith(b"event: chunk")
    assert len(opened) == 1 and emulator.deliveries.empty()  # the provider's stream is open
    response.close()  # what the server does when the client disconnects: the generator is closed
    try:
        delivery = emulator.wait_delivery(timeout=5)
    except queue.Empty:
        pytest.fail("the provider's stream was left open after the client left")
    assert delivery.client_closed and delivery.sent < delivery.total
    records = app.extensions["gateway"].tracker.records()
    assert [(r.endpoint, r.status, r.token_source) for r in records] == [(STREAM, 499, "provider")]
    record = records[0]
    assert record.request_id == response.headers["X-Request-ID"]
    # billed for the prompt and the first chunk, as the provider reported them in that chunk
    whole = app.test_client().post("/api/v1/generate/text", json={"prompt": "one two three four five six"},
                                   headers={"Cache-Control": "no-store"}).get_json()
    assert record.input_tokens == whole["usage"]["input_tokens"]
    assert 0 < record.output_tokens < whole["usage"]["output_tokens"]
    assert 0 < record.total_cost < whole["cost"]["total"]
