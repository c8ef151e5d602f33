"""The Gemini emulator, exercised through the real google-genai SDK and LangChain client.

These tests pin down what the rest of the project relies on: the wire format the SDK
accepts, deterministic task replies, and how each injected fault surfaces at the SDK.
"""

from __future__ import annotations

import ast
import concurrent.futures
import http.client
import json
import math
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
from google import genai
from google.genai import errors, types
from langchain_google_genai import ChatGoogleGenerativeAI

from gateway.providers.emulators.gemini import FAULTS, GeminiEmulator, classify
from gateway.tasks.prompts import (
    CODE_MARKER,
    LANGUAGE_PREFIX,
    REQUEST_PREFIX,
    classification_prompt,  # the gateway's own prompt, so the emulator and the gateway cannot drift
)

ROOT = Path(__file__).resolve().parent.parent

MODEL = "gemini-2.0-flash"
SENTIMENT = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def server():
    with GeminiEmulator() as emu:
        yield emu


@pytest.fixture
def emu(server):
    server.reset()
    yield server
    server.reset()


def make_client(emu: GeminiEmulator, timeout_ms: int = 5000, key: str = "test-key"):
    """A real SDK client with retries off, so each fault is seen exactly once."""
    return genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=emu.base_url, timeout=timeout_ms,
        retry_options=types.HttpRetryOptions(attempts=1)))


@pytest.fixture
def client(emu):
    return make_client(emu)


def generate(client, contents, **kwargs):
    return client.models.generate_content(model=MODEL, contents=contents, **kwargs)


def code_prompt(request: str, language: str = "python") -> str:
    return (f"{CODE_MARKER}\n{LANGUAGE_PREFIX} {language}\n"
            "Answer with one complete, runnable code block and nothing else.\n"
            f"{REQUEST_PREFIX} {request}")


def raw(emu, method, path, body=None, headers=None):
    """Raw HTTP for the control endpoints and protocol edges; returns (status, json)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(emu.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


GENERATE_PATH = f"/v1beta/models/{MODEL}:generateContent"
HELLO = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}


# ------------------------------------------------------------------ replies
def test_text_reply_has_usage_and_is_recorded(emu, client):
    prompt = "Tell me about owls in winter"
    response = generate(client, prompt, config=types.GenerateContentConfig(
        system_instruction="Be brief."))
    assert response.text.startswith("Demo reply to: Tell me about owls")
    assert len(response.text) > 20
    usage = response.usage_metadata
    assert usage.prompt_token_count == math.ceil(len("Be brief.\n" + prompt) / 4)
    assert usage.candidates_token_count == math.ceil(len(response.text) / 4)
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert response.model_version == MODEL
    assert generate(client, prompt).text == response.text  # deterministic
    assert emu.request_count == 2
    record = emu.requests[0]
    assert record["path"] == GENERATE_PATH and record["model"] == MODEL
    assert record["method"] == "POST" and record["stream"] is False
    assert record["json"]["contents"][0]["parts"][0]["text"] == prompt
    assert emu.keys_seen == ["test-key", "test-key"]


@pytest.mark.parametrize("model", [MODEL, f"models/{MODEL}"])
def test_model_name_with_or_without_prefix(emu, client, model):
    client.models.generate_content(model=model, contents="hi")
    assert emu.requests[0]["path"] == GENERATE_PATH
    assert emu.requests[0]["model"] == MODEL


def test_langchain_text_reply(emu):
    llm = ChatGoogleGenerativeAI(model=MODEL, google_api_key="test-key",
                                 base_url=emu.base_url, max_retries=1)
    message = llm.invoke([("system", "Be brief."), ("human", "Name three rivers")])
    assert message.content.startswith("Demo reply to: Name three rivers")
    assert message.usage_metadata["total_tokens"] == (
        message.usage_metadata["input_tokens"] + message.usage_metadata["output_tokens"])
    assert message.response_metadata["finish_reason"] == "STOP"
    assert llm.get_num_tokens("hello world") == 3  # countTokens, ceil(11 / 4)


@pytest.mark.parametrize(("text", "expected"), [
    ("I love this, it is amazing!", "positive"),
    ("The worst purchase ever, terrible support.", "negative"),
    ("The parcel arrived on Tuesday.", "neutral"),
    ("This is not good at all.", "negative"),
])
def test_classification_sentiment(client, text, expected):
    assert generate(client, classification_prompt(text, SENTIMENT)).text == expected


def test_classification_keeps_category_spelling_and_matches_names(client):
    categories = ["Sports", "Politics", "Technology"]
    text = "The new technology budget passed"
    assert generate(client, classification_prompt(text, categories)).text == "Technology"
    assert generate(client, classification_prompt("I LOVE it", ["Positive", "Negative"])
                    ).text == "Positive"


def test_classification_hash_fallback_is_stable_and_valid():
    categories = ["alpha", "beta", "gamma", "delta"]
    picks = {classify(f"sample number {i}", categories) for i in range(40)}
    assert picks <= set(categories) and len(picks) > 1  # spread over categories
    assert classify("same text", categories) == classify("same text", categories)


def test_code_reply_is_a_fenced_python_function(client):
    answer = generate(client, code_prompt("Write a function that reverses a string")).text
    assert answer.startswith("```python\n") and answer.endswith("```")
    tree = ast.parse(answer.removeprefix("```python\n").removesuffix("```"))
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef))
    assert function.name == "reverses_string"
    assert ast.get_docstring(function)
    assert any(isinstance(node, ast.Return) for node in ast.walk(function))


def test_code_reply_for_other_language_uses_its_fence(client):
    answer = generate(client, code_prompt("add two numbers", "javascript")).text
    assert answer.startswith("```javascript\n") and "function addTwoNumbers" in answer


def test_stream_sends_several_chunks_that_join_to_the_full_reply(emu, client):
    full = generate(client, "Explain tides to a child").text
    chunks = list(client.models.generate_content_stream(
        model=MODEL, contents="Explain tides to a child"))
    assert len(chunks) >= 3
    assert "".join(chunk.text for chunk in chunks) == full
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata.candidates_token_count == math.ceil(len(full) / 4)
    assert emu.requests[-1]["stream"] is True
    assert emu.requests[-1]["path"] == f"/v1beta/models/{MODEL}:streamGenerateContent"


def test_stream_of_a_one_word_reply_still_joins(client):
    prompt = classification_prompt("great stuff", SENTIMENT)
    chunks = list(client.models.generate_content_stream(model=MODEL, contents=prompt))
    assert "".join(chunk.text for chunk in chunks) == "positive"


def test_langchain_stream_matches_invoke(emu):
    llm = ChatGoogleGenerativeAI(model=MODEL, google_api_key="test-key",
                                 base_url=emu.base_url, max_retries=1)
    chunks = list(llm.stream("Describe a lighthouse"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    message = llm.invoke("Describe a lighthouse")
    assert len(chunks) >= 3
    assert total.content == message.content
    assert total.usage_metadata["output_tokens"] == message.usage_metadata["output_tokens"]


# ------------------------------------------------------------------ faults at the SDK
def test_rate_limit_is_a_429_client_error_with_retry_info(emu, client):
    emu.inject("rate_limit", retry_delay=7)
    with pytest.raises(errors.ClientError) as caught:
        generate(client, "hi")
    error = caught.value
    assert error.code == 429 and error.status == "RESOURCE_EXHAUSTED"
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"} in (
        error.details["error"]["details"])
    assert error.response.headers["retry-after"] == "7"


@pytest.mark.parametrize(("fault", "error_class", "code", "status"), [
    ("server_error", errors.ServerError, 500, "INTERNAL"),
    ("unavailable", errors.ServerError, 503, "UNAVAILABLE"),
    ("bad_request", errors.ClientError, 400, "INVALID_ARGUMENT"),
    ("permission_denied", errors.ClientError, 403, "PERMISSION_DENIED"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_error_faults_map_to_sdk_errors(emu, client, fault, error_class, code, status, stream):
    emu.inject(fault)
    with pytest.raises(error_class) as caught:
        if stream:
            list(client.models.generate_content_stream(model=MODEL, contents="hi"))
        else:
            generate(client, "hi")
    assert caught.value.code == code and caught.value.status == status


def test_langchain_classifies_faults(emu):
    llm = ChatGoogleGenerativeAI(model=MODEL, google_api_key="test-key",
                                 base_url=emu.base_url, max_retries=1)
    emu.inject("rate_limit")
    emu.inject("server_error")
    with pytest.raises(Exception) as rate_limited:
        llm.invoke("hi")
    assert type(rate_limited.value).__name__ == "GoogleRateLimitError"
    assert rate_limited.value.__cause__.code == 429  # the SDK's ClientError
    with pytest.raises(errors.ServerError) as server_error:  # GoogleAPIError subclasses it
        llm.invoke("hi")
    assert server_error.value.code == 500
    assert emu.request_count == 2  # max_retries=1 really means one attempt


def test_safety_block_has_prompt_feedback_and_no_candidates(emu, client):
    emu.inject("safety_block")
    response = generate(client, "hi")
    assert response.candidates is None and response.text is None
    assert response.prompt_feedback.block_reason == types.BlockedReason.SAFETY


def test_empty_reply(emu, client):
    emu.inject("empty")
    response = generate(client, "hi")
    assert response.text == ""
    assert response.candidates[0].finish_reason == types.FinishReason.STOP


def test_malformed_body_fails_to_parse(emu, client):
    emu.inject("malformed", times=2)
    with pytest.raises(json.JSONDecodeError):
        generate(client, "hi")
    with pytest.raises(errors.UnknownApiResponseError):
        list(client.models.generate_content_stream(model=MODEL, contents="hi"))


def test_drop_closes_without_a_response(emu, client):
    emu.inject("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        generate(client, "hi")
    assert generate(client, "hi").text  # the next call gets a fresh connection


def test_hang_then_close(emu, client):
    emu.inject("hang", seconds=0.2)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        generate(client, "hi")
    assert 0.15 < time.monotonic() - started < 2


def test_hang_hits_the_client_timeout(emu):
    emu.inject("hang", seconds=3)  # stop() at module teardown ends it early anyway
    with pytest.raises(httpx.TimeoutException):
        generate(make_client(emu, timeout_ms=200), "hi")


def test_stop_wakes_a_hang_promptly():
    emu = GeminiEmulator().start()
    emu.inject("hang", seconds=60)
    threading.Timer(0.2, emu.stop).start()
    started = time.monotonic()
    with pytest.raises(httpx.HTTPError):
        generate(make_client(emu), "hi")
    assert time.monotonic() - started < 2


def test_slow_and_reply_delay(emu, client):
    emu.inject("slow", seconds=0.2)
    started = time.monotonic()
    assert generate(client, "hi").text
    assert time.monotonic() - started >= 0.2
    emu.reply_delay = 0.1
    started = time.monotonic()
    assert generate(client, "hi").text
    assert time.monotonic() - started >= 0.1


def test_inject_times_then_success_in_fifo_order(emu, client):
    emu.inject("rate_limit", times=2)
    emu.inject("server_error")
    for expected in (429, 429, 500):
        with pytest.raises(errors.APIError) as caught:
            generate(client, "hi")
        assert caught.value.code == expected
    assert generate(client, "hi").text
    assert emu.request_count == 4


def test_steady_fault_until_cleared(emu, client):
    emu.set_steady_fault("unavailable")
    for _ in range(3):
        with pytest.raises(errors.ServerError):
            generate(client, "hi")
    emu.clear_faults()
    assert generate(client, "hi").text


def test_drip_sends_the_whole_reply_one_byte_at_a_time(emu, client):
    emu.inject("drip", interval=0.001, headers=True)
    assert generate(client, "hi").text.startswith("Demo reply to: hi")
    delivery = emu.wait_delivery()
    assert delivery.fault == "drip" and delivery.sent == delivery.total > 100 and not delivery.client_closed


@pytest.mark.parametrize("headers", [False, True])
def test_drip_stops_when_the_client_hangs_up(emu, headers):
    emu.inject("drip", interval=0.02, headers=headers)
    with socket_to(emu) as sock:
        sock.sendall(raw_request(GENERATE_PATH, HELLO))
        first = sock.recv(1024)
    assert first.startswith(b"HTTP/1.1 200") if not headers else first == b"H"
    delivery = emu.wait_delivery()
    assert delivery.client_closed and delivery.sent < delivery.total


@pytest.mark.parametrize("fault, error", [
    ("cut", httpx.RemoteProtocolError),
    ("bad_chunk", errors.UnknownApiResponseError),
    ("error_chunk", errors.ServerError),
    ("stall", httpx.ReadTimeout),
])
def test_stream_faults_come_after_good_chunks(emu, fault, error):
    emu.inject(fault, after=2, seconds=5)
    client = make_client(emu, timeout_ms=300)  # kept: a collected client closes its connections
    stream = client.models.generate_content_stream(model=MODEL, contents="one two three four five six seven eight")
    texts = []
    with pytest.raises(error):
        for chunk in stream:
            texts.append(chunk.text)
    assert len(texts) == 2 and all(texts)
    if fault == "stall":
        delivery = emu.wait_delivery()
        assert delivery.client_closed and delivery.sent < delivery.total


@pytest.mark.parametrize("fault, error", [
    ("cut", httpx.RemoteProtocolError),
    ("bad_chunk", json.JSONDecodeError),
    ("stall", httpx.ReadTimeout),
])
def test_mid_reply_faults_of_a_plain_call(emu, fault, error):
    emu.inject(fault, seconds=5)
    with pytest.raises(error):
        generate(make_client(emu, timeout_ms=300), "hi")


def test_error_chunk_of_a_plain_call_is_a_200_error_object(emu):
    emu.inject("error_chunk")
    status, body = raw(emu, "POST", GENERATE_PATH, HELLO, {"x-goog-api-key": "k"})
    assert status == 200 and body["error"]["code"] == 500


def test_raw_serves_the_given_body_or_events(emu, client):
    emu.inject("raw", body={"candidates": ["not", "a", "candidate"]})
    assert raw(emu, "POST", GENERATE_PATH, HELLO, {"x-goog-api-key": "k"}) == (
        200, {"candidates": ["not", "a", "candidate"]})
    events = [{"candidates": [{"content": {"parts": [{"text": f"part {n} "}]}}]} for n in range(3)]
    emu.inject("raw", events=events)
    chunks = list(client.models.generate_content_stream(model=MODEL, contents="hi"))
    assert "".join(chunk.text for chunk in chunks) == "part 0 part 1 part 2 "


def socket_to(emu):
    import socket

    return socket.create_connection((emu.host, emu.port), timeout=5)


def raw_request(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nx-goog-api-key: k\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def test_unknown_fault_is_rejected(emu):
    with pytest.raises(ValueError, match="unknown fault"):
        emu.inject("meteor")
    assert "rate_limit" in FAULTS


# ------------------------------------------------------------------ HTTP edges
def test_control_endpoints(emu, client):
    assert raw(emu, "POST", "/_emulator/faults", {"fault": "rate_limit", "times": 2,
                                                   "params": {"retry_delay": 1}})[0] == 200
    for _ in range(2):
        with pytest.raises(errors.ClientError):
            generate(client, "hi")
    assert raw(emu, "GET", "/_emulator/stats")[1]["request_count"] == 2
    assert raw(emu, "POST", "/_emulator/faults", {"steady": "server_error"})[0] == 200
    with pytest.raises(errors.ServerError):
        generate(client, "hi")
    assert raw(emu, "DELETE", "/_emulator/faults")[0] == 200
    assert generate(client, "hi").text
    status, stats = raw(emu, "POST", "/_emulator/config", {"reply_delay": 0.05})
    assert status == 200 and stats["reply_delay"] == emu.reply_delay == 0.05
    assert raw(emu, "POST", "/_emulator/faults", {"fault": "meteor"})[0] == 400
    assert raw(emu, "GET", "/_emulator/nothing")[0] == 404
    assert raw(emu, "POST", "/_emulator/reset")[1]["request_count"] == 0


def test_api_key_is_required(emu):
    status, body = raw(emu, "POST", GENERATE_PATH, HELLO)
    assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    status, body = raw(emu, "POST", GENERATE_PATH + "?key=query-key", HELLO)
    assert status == 200 and body["candidates"][0]["content"]["role"] == "model"
    assert emu.request_count == 2 and emu.requests[0]["has_key"] is False


def test_required_key_rejects_other_keys():
    with GeminiEmulator(required_key="right-key") as emu:
        with pytest.raises(errors.ClientError) as caught:
            generate(make_client(emu, key="wrong-key"), "hi")
        assert caught.value.code == 400 and "API key not valid" in caught.value.message
        assert caught.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        assert generate(make_client(emu, key="right-key"), "hi").text
        assert emu.keys_seen == ["wrong-key", "right-key"]


def test_bad_json_and_unknown_paths(emu):
    key = {"x-goog-api-key": "k"}
    status, body = raw(emu, "POST", GENERATE_PATH, b"{not json", key)
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    status, body = raw(emu, "POST", "/v1beta/models/x:explode", HELLO, key)
    assert status == 404 and body["error"]["code"] == 404
    assert raw(emu, "GET", GENERATE_PATH, None, key)[0] == 404


def test_keep_alive_serves_many_requests_on_one_connection(emu):
    """HTTP/1.1 keep-alive with exact Content-Length (latency is measured in bench/, not here)."""
    connection = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    for _ in range(10):
        connection.request("POST", GENERATE_PATH, json.dumps(HELLO),
                           {"x-goog-api-key": "k", "Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200
        assert int(response.getheader("Content-Length")) == len(body)
    connection.close()


def test_requests_are_served_concurrently(emu, client):
    emu.reply_delay = 0.2
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: generate(client, f"q{i}").text, range(8)))
    assert all(replies) and time.monotonic() - started < 1.0


def test_context_manager_starts_and_stops():
    with GeminiEmulator() as emu:
        assert emu.base_url == f"http://127.0.0.1:{emu.port}" and emu.port > 0
        assert generate(make_client(emu), "hi").text
    with pytest.raises(httpx.ConnectError):
        generate(make_client(emu), "hi")


def test_command_line_runs_until_stopped():
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.providers.emulators.gemini", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)  # ROOT: the project folder
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            line = pool.submit(process.stdout.readline).result(timeout=10)
        base_url = line.split()[-1]
        assert base_url.startswith("http://127.0.0.1:")
        emu = GeminiEmulator(port=int(base_url.rsplit(":", 1)[1]))  # only for its base_url
        assert generate(make_client(emu), "hi").text.startswith("Demo reply to: hi")
    finally:
        process.terminate()
        process.wait(timeout=10)
