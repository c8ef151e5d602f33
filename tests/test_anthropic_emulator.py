"""The Anthropic emulator on the wire (plain HTTP, no SDK): what it checks, the event stream it
sends, its control endpoints and its task-shaped replies. The SDK side is in
test_anthropic_provider.py."""

from __future__ import annotations

import http.client
import json

import pytest

from gateway.providers.emulators.anthropic import AnthropicEmulator, main
from gateway.tasks import prompts

HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01", "content-type": "application/json"}
BODY = {"model": "claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "Hello there"}]}


@pytest.fixture(scope="module")
def emulator_server():
    with AnthropicEmulator() as server:
        yield server


@pytest.fixture
def emu(emulator_server):
    emulator_server.reset()
    yield emulator_server
    emulator_server.reset()


def call(emu, body=BODY, headers=HEADERS, path="/v1/messages", method="POST"):
    """(status, headers, body bytes) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    try:
        data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def events_of(raw: bytes) -> list[tuple[str, dict]]:
    frames = [f for f in raw.decode().split("\n\n") if f.strip()]
    parsed = []
    for frame in frames:
        fields = dict(line.split(": ", 1) for line in frame.splitlines())
        parsed.append((fields["event"], json.loads(fields["data"])))
    return parsed


def test_a_plain_reply_has_the_documented_shape(emu):
    status, _, raw = call(emu, {**BODY, "system": "Be brief."})
    message = json.loads(raw)
    assert status == 200 and message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["type"] == "text" and message["stop_reason"] == "end_turn"
    assert set(message["usage"]) == {"input_tokens", "output_tokens"} and message["model"] == "claude-test"


def test_a_stream_sends_the_documented_events_in_order(emu):
    status, headers, raw = call(emu, {**BODY, "stream": True})
    events = events_of(raw)
    names = [name for name, _ in events]
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert names[:2] == ["message_start", "content_block_start"] and names[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in events)
    deltas = [data["delta"]["text"] for name, data in events if name == "content_block_delta"]
    plain = json.loads(call(emu)[2])
    assert "".join(deltas) == plain["content"][0]["text"]
    assert events[0][1]["message"]["usage"]["input_tokens"] == plain["usage"]["input_tokens"]
    assert events[-2][1]["usage"]["output_tokens"] == plain["usage"]["output_tokens"]


@pytest.mark.parametrize(("change", "status", "kind"), [
    ({"x-api-key": None}, 401, "authentication_error"),
    ({"anthropic-version": None}, 400, "invalid_request_error"),
])
def test_key_and_version_headers_are_required(emu, change, status, kind):
    headers = {k: v for k, v in {**HEADERS, **change}.items() if v is not None}
    code, _, raw = call(emu, headers=headers)
    assert code == status and json.loads(raw) == {"type": "error", "error": {"type": kind, "message": json.loads(
        raw)["error"]["message"]}}


def test_a_bearer_key_is_accepted_as_the_sdk_sends_it(emu):
    headers = {**{k: v for k, v in HEADERS.items() if k != "x-api-key"}, "authorization": "Bearer k"}
    assert call(emu, headers=headers)[0] == 200 and emu.keys_seen == ["k"]


@pytest.mark.parametrize("body", [
    {**BODY, "max_tokens": None}, {**BODY, "messages": []},
    {**BODY, "messages": [{"role": "system", "content": "x"}, *BODY["messages"]]},
    {**BODY, "temperature": 1.5}, {**BODY, "top_p": -0.1}, {**BODY, "stop_sequences": [" "]},
    {**BODY, "model": ""}, [1, 2], b"{not json",
])
def test_requests_the_real_api_refuses_are_400s(emu, body):
    status, _, raw = call(emu, body)
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_max_tokens_cuts_the_reply(emu):
    message = json.loads(call(emu, {**BODY, "max_tokens": 3})[2])
    assert message["stop_reason"] == "max_tokens" and len(message["content"][0]["text"]) == 12


def test_count_tokens(emu):
    status, _, raw = call(emu, {"model": "claude-test", "messages": BODY["messages"]},
                          path="/v1/messages/count_tokens")
    assert status == 200 and json.loads(raw)["input_tokens"] > 0


def test_unknown_paths_are_404s_in_anthropic_shape(emu):
    status, _, raw = call(emu, path="/v1/complete")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"


def test_rate_limit_sends_retry_after(emu):
    emu.inject("rate_limit", retry_delay=7)
    status, headers, raw = call(emu)
    assert status == 429 and headers["retry-after"] == "7" and json.loads(raw)["error"]["type"] == "rate_limit_error"


def test_overloaded_is_529(emu):
    emu.set_steady_fault("overloaded")
    assert [call(emu)[0] for _ in range(2)] == [529, 529]
    emu.clear_faults()
    assert call(emu)[0] == 200


def test_an_error_event_mid_stream(emu):
    emu.inject("error_chunk", after=2)
    events = events_of(call(emu, {**BODY, "stream": True})[2])
    assert [name for name, _ in events] == ["message_start", "content_block_start", "error"]
    assert events[-1][1]["error"]["type"] == "overloaded_error"


def test_control_endpoints_drive_faults_from_another_process(emu):
    status, _, raw = call(emu, {"fault": "server_error", "times": 2}, path="/_emulator/faults")
    assert status == 200 and json.loads(raw)["queued_faults"] == 2
    assert [call(emu)[0] for _ in range(3)] == [500, 500, 200]
    status, _, raw = call(emu, {"fault": "no_such_fault"}, path="/_emulator/faults")
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert json.loads(call(emu, None, path="/_emulator/stats", method="GET")[2])["request_count"] == 3


def test_unknown_faults_are_refused():
    with pytest.raises(ValueError, match="unknown fault"):
        AnthropicEmulator().inject("unavailable")


def test_replies_fit_the_gateways_tasks(emu):
    def reply(prompt: str) -> str:
        body = {**BODY, "messages": [{"role": "user", "content": prompt}]}
        return json.loads(call(emu, body)[2])["content"][0]["text"]

    assert reply(prompts.classification_prompt("I love this, it is great", ["positive", "negative"])) == "positive"
    code = prompts.extract_code(reply(prompts.code_prompt("add two numbers", "python")))
    compile(code, "<reply>", "exec")


def test_main_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--port", "not-a-port"])
