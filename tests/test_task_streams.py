"""Streaming on every generation task: `/generate/text` and `/generate/code` answer as server-sent events
when asked, streams are cached and replayed, and under waitress a stream reaches the client as the provider
produces it and stops the provider when the client leaves (each provider's emulator tells how far it got)."""

from __future__ import annotations

import json
import queue
import socket
import time

import pytest
import requests

from gateway.providers import demo
from gateway.tasks.prompts import extract_code
from tests.test_streaming import events_of

TEXT, CODE, CLASSIFY = "/api/v1/generate/text", "/api/v1/generate/code", "/api/v1/classify/text"
SSE = "text/event-stream"


def streamed(response) -> tuple[list[str], str, dict]:
    """(chunk texts, final event name, final event data) of an SSE answer."""
    assert response.status_code == 200 and response.mimetype == SSE, response.get_data(as_text=True)[:300]
    events = events_of(response.get_data(as_text=True))
    assert all(name == "chunk" for name, _ in events[:-1])
    return [data["text"] for _, data in events[:-1]], events[-1][0], events[-1][1]


def records_of(app):
    return app.extensions["gateway"].tracker.records()


@pytest.mark.parametrize("how", ["body", "accept"])
def test_text_streams_when_asked_and_done_carries_the_answer_fields(make_app, emulator, how):
    app = make_app(ratelimit_enabled=False)
    client = app.test_client()
    body = {"prompt": "Tell me about rivers and their deltas"}
    if how == "body":
        response = client.post(TEXT, json={**body, "stream": True})
    else:
        response = client.post(TEXT, json=body, headers={"Accept": SSE})
    chunks, final, done = streamed(response)
    assert final == "done" and len(chunks) >= 2 and emulator.requests[0]["stream"] is True
    assert done["cached"] is False and done["cost"]["total"] > 0
    assert response.headers["X-Cached"] == "false" and done["request_id"] == response.headers["X-Request-ID"]
    plain = client.post(TEXT, json=body, headers={"Cache-Control": "no-cache"}).get_json()
    # the answer's fields but the text, which is the chunks joined (and may be megabytes)
    assert set(done) == set(plain) - {"generated_text"} and "".join(chunks) == plain["generated_text"]
    assert done["usage"] == plain["usage"] and done["model"] == plain["model"]
    assert [(r.endpoint, r.status, r.cached) for r in records_of(app)] == [(TEXT, 200, False), (TEXT, 200, False)]


def test_code_streams_the_models_text_and_done_carries_the_extracted_code(make_app, emulator):
    app = make_app(ratelimit_enabled=False)
    client = app.test_client()
    body = {"prompt": "Create a Python function to reverse a list", "language": "python"}
    chunks, final, done = streamed(client.post(CODE, json={**body, "stream": True}))
    raw = "".join(chunks)
    assert final == "done" and raw.startswith("```python") and len(chunks) >= 2
    assert done["generated_code"] == extract_code(raw) and "```" not in done["generated_code"]
    assert done["language"] == "python" and done["usage"]["source"] == "provider"
    # the finished stream was cached: the plain request is a hit with the same code
    plain = client.post(CODE, json=body).get_json()
    assert plain["cached"] is True and plain["generated_code"] == done["generated_code"]
    assert plain["cost"]["saved"] == done["cost"]["total"] > 0 and emulator.request_count == 1
    # and a replay sends the model's own text again, fences included
    replayed, _, again = streamed(client.post(CODE, json=body, headers={"Accept": SSE}))
    assert "".join(replayed) == raw and again["generated_code"] == done["generated_code"]
    assert again["cached"] is True and emulator.request_count == 1


@pytest.mark.parametrize("accept", ["*/*", "application/json", f"{SSE}, application/json", f"{SSE};q=0.5, */*"])
def test_json_stays_the_answer_unless_accept_prefers_the_stream(client, emulator, accept):
    response = client.post(TEXT, json={"prompt": "hello"}, headers={"Accept": accept})
    assert response.status_code == 200 and response.is_json


def test_stream_false_in_the_body_wins_over_accept(client, emulator):
    response = client.post(TEXT, json={"prompt": "hello", "stream": False}, headers={"Accept": SSE})
    assert response.status_code == 200 and response.is_json and response.get_json()["generated_text"]


def test_stream_must_be_a_boolean(client, emulator):
    response = client.post(TEXT, json={"prompt": "hello", "stream": "yes"})
    assert response.status_code == 400 and "stream" in response.get_json()["details"]["fields"]
    assert emulator.request_count == 0


def test_classification_does_not_stream(client, emulator):
    body = {"text": "This movie was amazing!", "categories": ["positive", "negative"]}
    refused = client.post(CLASSIFY, json={**body, "stream": True})
    assert refused.status_code == 400 and refused.get_json()["details"]["fields"] == {
        "stream": "this task does not stream"}
    assert emulator.request_count == 0
    for extra, headers in (({"stream": False}, {}), ({}, {"Accept": SSE})):  # false, or only Accept: plain JSON
        response = client.post(CLASSIFY, json={**body, **extra}, headers=headers)
        assert response.status_code == 200 and response.get_json()["classification"] == "positive"


def test_a_plain_answer_is_replayed_as_a_stream_at_no_cost(make_app, emulator):
    app = make_app(ratelimit_enabled=False)
    client = app.test_client()
    plain = client.post(TEXT, json={"prompt": "Tell me about the sea"}).get_json()
    response = client.post(TEXT, json={"prompt": "Tell me about the sea", "stream": True})
    chunks, final, done = streamed(response)
    assert final == "done" and "".join(chunks) == plain["generated_text"] and response.headers["X-Cached"] == "true"
    assert done["cached"] is True and done["cost"]["total"] == 0 and done["cost"]["saved"] == plain["cost"]["total"]
    assert done["usage"] == plain["usage"] and emulator.request_count == 1
    stream_record = records_of(app)[-1]
    assert (stream_record.status, stream_record.cached, stream_record.total_cost) == (200, True, 0)
    # the older stream endpoint replays it too
    chunks, _, done = streamed(client.post("/api/v1/generate/text/stream", json={"prompt": "Tell me about the sea"}))
    assert "".join(chunks) == plain["generated_text"] and done["cached"] is True


def test_streams_honour_no_store_and_no_cache(make_app, emulator):
    client = make_app(ratelimit_enabled=False).test_client()
    body = {"prompt": "Tell me about mountains", "stream": True}
    streamed(client.post(TEXT, json=body, headers={"Cache-Control": "no-store"}))
    assert client.post(TEXT, json={"prompt": "Tell me about mountains"}).get_json()["cached"] is False
    assert emulator.request_count == 2  # the stream stored nothing; the plain answer is cached now
    _, _, done = streamed(client.post(TEXT, json=body, headers={"Cache-Control": "no-cache"}))
    assert done["cached"] is False and emulator.request_count == 3
    _, _, done = streamed(client.post(TEXT, json={**body, "cache": {"no_cache": True}}))
    assert done["cached"] is False and emulator.request_count == 4


@pytest.mark.parametrize("fault", ["cut", "bad_chunk", "error_chunk"])
def test_a_stream_that_fails_is_not_cached(make_app, emulator, fault):
    app = make_app(ratelimit_enabled=False)
    client = app.test_client()
    emulator.inject(fault, after=2)
    chunks, final, _ = streamed(client.post(TEXT, json={"prompt": "one two three four five six", "stream": True}))
    assert final == "error" and chunks
    assert records_of(app)[0].status == 502
    again = client.post(TEXT, json={"prompt": "one two three four five six"}).get_json()
    assert again["cached"] is False and emulator.request_count == 2


def test_a_stream_the_client_abandons_is_not_cached(make_app, emulator):
    app = make_app(ratelimit_enabled=False)
    client = app.test_client()
    emulator.inject("pace", interval=0.05)
    response = client.post(TEXT, json={"prompt": "one two three four five six", "stream": True}, buffered=False)
    next(iter(response.response))
    response.close()
    assert records_of(app)[0].status == 499
    assert client.post(TEXT, json={"prompt": "one two three four five six"}).get_json()["cached"] is False


def test_a_code_stream_without_code_ends_in_an_error_and_is_billed(make_app, emulator):
    app = make_app(ratelimit_enabled=False)
    def event(text: str, output_tokens: int, **finish) -> dict:
        return {"candidates": [{"content": {"parts": [{"text": text}]}, "index": 0, **finish}],
                "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": output_tokens}}

    emulator.inject("raw", events=[event("```python\n", 2), event("  \n```\n", 3, finishReason="STOP")])
    _, final, error = streamed(app.test_client().post(CODE, json={"prompt": "nothing", "stream": True}))
    assert final == "error" and error["code"] == "upstream_bad_answer"
    [record] = records_of(app)
    assert record.status == 502 and (record.input_tokens, record.output_tokens) == (20, 3)


# --- through waitress ---------------------------------------------------------------------------

MODELS = {"gemini": ("gemini-2.0-flash", 1), "openai": ("gpt-4o-mini", 2), "anthropic": ("claude-haiku-4-5", 4)}


@pytest.fixture
def demo_upstream():
    """demo_upstream(provider) -> that provider's demo emulator, cleared (demo mode serves every model from them)."""
    used = []

    def get(provider: str):
        emulator = demo._demo_emulator(provider)
        emulator.reset()
        used.append(emulator)
        return emulator

    yield get
    for emulator in used:
        emulator.reset()


def _first_event(pieces) -> tuple[str, float, bytes]:
    """The first whole SSE event from an iterator of body pieces, when it arrived, and what followed it.
    (Leaving a `requests` iterator early closes the connection: the caller keeps iterating the same one.)"""
    buffer = b""
    for data in pieces:
        buffer += data
        if b"\n\n" in buffer:
            first, rest = buffer.split(b"\n\n", 1)
            return first.decode(), time.perf_counter(), rest
    raise AssertionError(f"no whole event in {buffer!r}")


@pytest.mark.parametrize("provider", list(MODELS))
def test_the_first_chunk_reaches_the_client_while_the_provider_is_still_streaming(make_app, serve, demo_upstream,
                                                                                   provider):
    """The provider sends its first text at once, then a frame every 0.3 s: the client must have the first
    chunk before the provider has finished (nothing buffers the stream), in about the time it took to cross."""
    upstream = demo_upstream(provider)
    model, first_text_frame = MODELS[provider]
    upstream.inject("pace", interval=0.3, after=first_text_frame)
    server = serve(make_app(ratelimit_enabled=False, google_api_key=""))
    with requests.post(server.url + TEXT, json={"prompt": "Tell me a story about the sea and its ships",
                                                "model": model, "stream": True}, stream=True, timeout=10) as response:
        assert response.headers["Content-Type"].startswith(SSE)
        pieces = response.iter_content(chunk_size=None)
        first, arrived, rest = _first_event(pieces)
        assert upstream.deliveries.empty(), "the provider had finished before the client saw a chunk"
        assert first.startswith("event: chunk") and json.loads(first.split("data: ", 1)[1])["text"]
        rest = (rest + b"".join(pieces)).decode()
    delivery = upstream.wait_delivery(timeout=5)
    # all of it (the OpenAI SDK hangs up at `data: [DONE]`, before the chunked body's last empty chunk)
    assert delivery.total - delivery.sent <= len(b"0\r\n\r\n")
    assert rest.strip().split("\n\n")[-1].startswith("event: done")
    added_ms = (arrived - delivery.first_sent_at) * 1000
    print(f"{provider}: first chunk {added_ms:.2f} ms after the provider sent it")
    assert added_ms < 300  # well before the provider's next frame


def _open_raw_stream(url: str, body: dict, path: str = TEXT) -> socket.socket:
    """A client on a plain socket (so the test decides when it closes), after sending a stream request."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), host.encode(), len(data), data))
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        data = sock.recv(65536)
        assert data, f"closed before {marker!r}: {received!r}"
        received += data
    return received


def _wait_for_records(app, count: int, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while len(records_of(app)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return records_of(app)


def test_a_client_that_closes_its_socket_stops_the_provider_at_the_next_chunk(make_app, emulator, serve):
    """Under waitress: the client reads one chunk and closes. The provider (a frame every 0.3 s) must be
    hung up on when its next chunk arrives, not chunks later, and the request billed 499 for what it sent."""
    emulator.inject("pace", interval=0.3)
    app = make_app(ratelimit_enabled=False)
    server = serve(app)
    prompt = "one two three four five six seven eight"
    sock = _open_raw_stream(server.url, {"prompt": prompt, "stream": True})
    assert b"event: chunk" in _read_until(sock, b"event: chunk")
    sock.close()
    try:
        delivery = emulator.wait_delivery(timeout=5)
    except queue.Empty:
        pytest.fail("the provider's stream was left open after the client left")
    assert delivery.client_closed and delivery.frames_sent == 2 and delivery.sent < delivery.total
    [record] = _wait_for_records(app, 1)
    assert (record.endpoint, record.status, record.token_source, record.cached) == (TEXT, 499, "provider", False)
    whole = app.test_client().post(TEXT, json={"prompt": prompt}).get_json()
    assert whole["cached"] is False  # the cut stream was not cached
    assert record.input_tokens == whole["usage"]["input_tokens"]
    assert 0 < record.output_tokens < whole["usage"]["output_tokens"] and 0 < record.total_cost < whole["cost"]["total"]


def test_an_openai_chat_stream_whose_client_closes_its_socket_stops_the_provider_too(make_app, emulator, serve):
    """/v1/chat/completions streams run through the same driver: the same disconnect check between chunks."""
    emulator.inject("pace", interval=0.3)
    app = make_app(ratelimit_enabled=False)
    server = serve(app)
    body = {"model": "gemini-2.0-flash", "stream": True,
            "messages": [{"role": "user", "content": "one two three four five six seven eight"}]}
    sock = _open_raw_stream(server.url, body, "/v1/chat/completions")
    assert b'"content":"' in _read_until(sock, b'"content":"D')  # the role chunk, then the first piece
    sock.close()
    delivery = emulator.wait_delivery(timeout=5)
    assert delivery.client_closed and delivery.frames_sent == 2 and delivery.sent < delivery.total
    [record] = _wait_for_records(app, 1)
    assert (record.endpoint, record.status, record.cached) == ("/v1/chat/completions", 499, False)
    assert record.output_tokens > 0 and record.total_cost > 0


def test_a_client_that_leaves_before_the_first_chunk_gets_the_provider_closed_at_it(make_app, emulator, serve):
    emulator.reply_delay = 0.3
    emulator.inject("pace", interval=0.3)
    app = make_app(ratelimit_enabled=False)
    server = serve(app)
    sock = _open_raw_stream(server.url, {"prompt": "one two three four five six", "stream": True})
    time.sleep(0.05)  # the request is read and waits for the provider's first chunk
    sock.close()
    delivery = emulator.wait_delivery(timeout=5)
    assert delivery.client_closed and delivery.frames_sent == 1
    [record] = _wait_for_records(app, 1)
    assert record.status == 499 and record.input_tokens > 0


def test_an_openai_chat_stream_left_before_its_first_chunk_is_billed_for_the_providers_usage(make_app, emulator,
                                                                                             serve):
    """The role chunk goes out with the first piece: the provider's first chunk (and its usage) is taken and billed
    even when the client has left before anything was written."""
    emulator.reply_delay = 0.3
    emulator.inject("pace", interval=0.3)
    app = make_app(ratelimit_enabled=False)
    server = serve(app)
    body = {"model": "gemini-2.0-flash", "stream": True, "messages": [{"role": "user", "content": "one two three"}]}
    sock = _open_raw_stream(server.url, body, "/v1/chat/completions")
    time.sleep(0.05)  # the request is read and waits for the provider's first chunk
    sock.close()
    delivery = emulator.wait_delivery(timeout=5)
    assert delivery.client_closed and delivery.frames_sent == 1
    [record] = _wait_for_records(app, 1)
    assert (record.status, record.token_source) == (499, "provider") and record.output_tokens > 0


def test_the_launcher_and_the_documented_waitress_flags_read_ahead_to_see_disconnects(make_config):
    from gateway.serve import waitress_settings
    from tests.support.processes import ROOT

    assert waitress_settings(make_config())["channel_request_lookahead"] == 1
    assert "--channel-request-lookahead=1" in (ROOT / "README.md").read_text()

