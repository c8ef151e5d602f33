"""The Gemini emulator, exercised through the calls the gateway makes to Gemini.

The Gemini provider sends through the google-genai transport that LangChain's
`ChatGoogleGenerativeAI` builds (`request` for `:generateContent`, `request_streamed` for
`:streamGenerateContent?alt=sse`) with the REST body of the API reference; so do these tests.
They pin down what the rest of the project relies on: the wire format the SDK accepts,
deterministic task replies, and how each injected fault surfaces at that transport (where the
provider translates it into the gateway's errors).
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

import httpx
import pytest
from google.genai import errors
from langchain_google_genai import ChatGoogleGenerativeAI

from gateway.providers.emulators.gemini import FAULTS, GeminiEmulator, classify
from gateway.tasks.prompts import (
    CODE_MARKER,
    LANGUAGE_PREFIX,
    REQUEST_PREFIX,
    classification_prompt,  # the gateway's own prompt, so the emulator and the gateway cannot drift
)
from tests.support.processes import ROOT

MODEL = "gemini-2.0-flash"
SENTIMENT = ["positive", "negative", "neutral"]


class Gemini:
    """The SDK transport the Gemini provider calls, built as the provider builds it.

    LangChain configures the google-genai client (key, base URL, headers); the provider calls that
    client's transport (`_api_client`, the one private name it uses: gemini_wrapper.py says why,
    test_gemini_wrapper.py pins it). The chat model is kept: once it is collected, the SDK client
    closes its connections."""

    def __init__(self, base_url: str, key: str = "test-key"):
        self.chat_model = ChatGoogleGenerativeAI(model=MODEL, google_api_key=key, base_url=base_url)
        self.transport = self.chat_model.client._api_client

    def generate(self, prompt: str, *, system: str | None = None, timeout_ms: int = 5000,
                 model: str = MODEL) -> dict:
        """One `:generateContent` call; the reply's JSON (a body that is not JSON raises, as in the provider)."""
        response = self.transport.request("post", f"models/{model}:generateContent", body(prompt, system),
                                          {"timeout": timeout_ms})
        return json.loads(response.body)

    def stream(self, prompt: str, *, timeout_ms: int = 5000):
        """`:streamGenerateContent?alt=sse`: each chunk's JSON, as it arrives."""
        for chunk in self.transport.request_streamed("post", f"models/{MODEL}:streamGenerateContent?alt=sse",
                                                     body(prompt), {"timeout": timeout_ms}):
            yield json.loads(chunk.body)


def body(prompt: str, system: str | None = None) -> dict:
    """The generateContent request the provider sends (REST field names)."""
    request = {"contents": [{"role": "user", "parts": [{"text": prompt}]}],
               "generationConfig": {"temperature": 0.7}}
    if system is not None:
        request["systemInstruction"] = {"parts": [{"text": system}]}
    return request


def text_of(reply: dict) -> str:
    return "".join(part.get("text", "") for part in reply["candidates"][0]["content"]["parts"])


@pytest.fixture(scope="module")
def gemini(emulator_server):
    return Gemini(emulator_server.base_url)


@pytest.fixture
def emu(emulator):
    """The shared emulator (tests/conftest.py), reset for this test."""
    return emulator


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
def test_text_reply_has_usage_and_is_recorded(emu, gemini):
    prompt = "Tell me about owls in winter"
    reply = gemini.generate(prompt, system="Be brief.")
    text = text_of(reply)
    assert text.startswith("Demo reply to: Tell me about owls") and len(text) > 20
    usage = reply["usageMetadata"]
    assert usage["promptTokenCount"] == math.ceil(len("Be brief.\n" + prompt) / 4)  # the system part counts
    assert usage["candidatesTokenCount"] == math.ceil(len(text) / 4)
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert reply["candidates"][0]["finishReason"] == "STOP"
    assert reply["modelVersion"] == MODEL
    assert text_of(gemini.generate(prompt, system="Be brief.")) == text  # deterministic
    assert emu.request_count == 2
    record = emu.requests[0]
    assert record["path"] == GENERATE_PATH and record["model"] == MODEL
    assert record["method"] == "POST" and record["stream"] is False
    assert record["json"]["contents"][0]["parts"][0]["text"] == prompt
    assert record["json"]["generationConfig"] == {"temperature": 0.7}  # what the provider sent, as sent
    assert emu.keys_seen == ["test-key", "test-key"]  # the SDK's x-goog-api-key header


def test_count_tokens(emu):
    status, answer = raw(emu, "POST", f"/v1beta/models/{MODEL}:countTokens",
                         {"contents": [{"role": "user", "parts": [{"text": "hello world"}]}]}, {"x-goog-api-key": "k"})
    assert status == 200 and answer == {"totalTokens": 3}  # ceil(11 / 4)


@pytest.mark.parametrize(("text", "expected"), [
    ("I love this, it is amazing!", "positive"),
    ("The worst purchase ever, terrible support.", "negative"),
    ("The parcel arrived on Tuesday.", "neutral"),
    ("This is not good at all.", "negative"),
])
def test_classification_sentiment(gemini, text, expected):
    assert text_of(gemini.generate(classification_prompt(text, SENTIMENT))) == expected


def test_classification_keeps_category_spelling_and_matches_names(gemini):
    categories = ["Sports", "Politics", "Technology"]
    text = "The new technology budget passed"
    assert text_of(gemini.generate(classification_prompt(text, categories))) == "Technology"
    assert text_of(gemini.generate(classification_prompt("I LOVE it", ["Positive", "Negative"]))) == "Positive"


def test_classification_hash_fallback_is_stable_and_valid():
    categories = ["alpha", "beta", "gamma", "delta"]
    picks = {classify(f"sample number {i}", categories) for i in range(40)}
    assert picks <= set(categories) and len(picks) > 1  # spread over categories
    assert classify("same text", categories) == classify("same text", categories)


def test_code_reply_is_a_fenced_python_function(gemini):
    answer = text_of(gemini.generate(code_prompt("Write a function that reverses a string")))
    assert answer.startswith("```python\n") and answer.endswith("```")
    tree = ast.parse(answer.removeprefix("```python\n").removesuffix("```"))
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef))
    assert function.name == "reverses_string"
    assert ast.get_docstring(function)
    assert any(isinstance(node, ast.Return) for node in ast.walk(function))


def test_code_reply_for_other_language_uses_its_fence(gemini):
    answer = text_of(gemini.generate(code_prompt("add two numbers", "javascript")))
    assert answer.startswith("```javascript\n") and "function addTwoNumbers" in answer


def test_stream_sends_several_chunks_that_join_to_the_full_reply(emu, gemini):
    full = text_of(gemini.generate("Explain tides to a child"))
    chunks = list(gemini.stream("Explain tides to a child"))
    assert len(chunks) >= 3
    assert "".join(text_of(chunk) for chunk in chunks) == full
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    counts = [chunk["usageMetadata"]["candidatesTokenCount"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == math.ceil(len(full) / 4)  # cumulative, as Gemini's
    assert emu.requests[-1]["stream"] is True
    assert emu.requests[-1]["path"] == f"/v1beta/models/{MODEL}:streamGenerateContent"


def test_stream_of_a_one_word_reply_still_joins(gemini):
    chunks = list(gemini.stream(classification_prompt("great stuff", SENTIMENT)))
    assert "".join(text_of(chunk) for chunk in chunks) == "positive"


# ------------------------------------------------------------------ faults at the SDK transport
def test_rate_limit_is_a_429_client_error_with_retry_info(emu, gemini):
    emu.inject("rate_limit", retry_delay=7)
    with pytest.raises(errors.ClientError) as caught:
        gemini.generate("hi")
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
def test_error_faults_map_to_sdk_errors(emu, gemini, fault, error_class, code, status, stream):
    emu.inject(fault)
    with pytest.raises(error_class) as caught:
        if stream:
            list(gemini.stream("hi"))
        else:
            gemini.generate("hi")
    assert caught.value.code == code and caught.value.status == status


def test_the_transport_makes_one_attempt_per_call(emu, gemini):
    """Retries are the gateway's (RetryPolicy): the SDK client LangChain builds must not add its own,
    or a second attempt would have been answered here."""
    for fault, code in (("rate_limit", 429), ("unavailable", 503), ("drop", None)):
        emu.reset()
        emu.inject(fault, retry_delay=0)
        with pytest.raises((errors.APIError, httpx.TransportError)) as caught:
            gemini.generate("hi")
        assert getattr(caught.value, "code", None) == code and emu.request_count == 1, fault


def test_safety_block_has_prompt_feedback_and_no_candidates(emu, gemini):
    emu.inject("safety_block")
    reply = gemini.generate("hi")
    assert "candidates" not in reply and reply["promptFeedback"]["blockReason"] == "SAFETY"


def test_empty_reply(emu, gemini):
    emu.inject("empty")
    reply = gemini.generate("hi")
    assert text_of(reply) == "" and reply["candidates"][0]["finishReason"] == "STOP"


def test_malformed_body_fails_to_parse(emu, gemini):
    emu.inject("malformed", times=2)
    with pytest.raises(json.JSONDecodeError):
        gemini.generate("hi")
    with pytest.raises(errors.UnknownApiResponseError):
        list(gemini.stream("hi"))


def test_drop_closes_without_a_response(emu, gemini):
    emu.inject("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        gemini.generate("hi")
    assert text_of(gemini.generate("hi"))  # the next call gets a fresh connection


def test_hang_then_close(emu, gemini):
    emu.inject("hang", seconds=0.2)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        gemini.generate("hi")
    assert 0.15 < time.monotonic() - started < 2


def test_hang_hits_the_client_timeout(emu, gemini):
    emu.inject("hang", seconds=3)  # stop() at session teardown ends it early anyway
    with pytest.raises(httpx.TimeoutException):
        gemini.generate("hi", timeout_ms=200)


def test_stop_wakes_a_hang_promptly():
    emu = GeminiEmulator().start()
    emu.inject("hang", seconds=60)
    threading.Timer(0.2, emu.stop).start()
    started = time.monotonic()
    with pytest.raises(httpx.HTTPError):
        Gemini(emu.base_url).generate("hi")
    assert time.monotonic() - started < 2


def test_slow_and_reply_delay(emu, gemini):
    emu.inject("slow", seconds=0.2)
    started = time.monotonic()
    assert text_of(gemini.generate("hi"))
    assert time.monotonic() - started >= 0.2
    emu.reply_delay = 0.1
    started = time.monotonic()
    assert text_of(gemini.generate("hi"))
    assert time.monotonic() - started >= 0.1


def test_inject_times_then_success_in_fifo_order(emu, gemini):
    emu.inject("rate_limit", times=2)
    emu.inject("server_error")
    for expected in (429, 429, 500):
        with pytest.raises(errors.APIError) as caught:
            gemini.generate("hi")
        assert caught.value.code == expected
    assert text_of(gemini.generate("hi"))
    assert emu.request_count == 4


def test_steady_fault_until_cleared(emu, gemini):
    emu.set_steady_fault("unavailable")
    for _ in range(3):
        with pytest.raises(errors.ServerError):
            gemini.generate("hi")
    emu.clear_faults()
    assert text_of(gemini.generate("hi"))


def test_drip_sends_the_whole_reply_one_byte_at_a_time(emu, gemini):
    emu.inject("drip", interval=0.001, headers=True)
    assert text_of(gemini.generate("hi")).startswith("Demo reply to: hi")
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
def test_stream_faults_come_after_good_chunks(emu, gemini, fault, error):
    emu.inject(fault, after=2, seconds=5)
    texts = []
    with pytest.raises(error):
        for chunk in gemini.stream("one two three four five six seven eight", timeout_ms=300):
            texts.append(text_of(chunk))
    assert len(texts) == 2 and all(texts)
    if fault == "stall":
        delivery = emu.wait_delivery()
        assert delivery.client_closed and delivery.sent < delivery.total


@pytest.mark.parametrize("fault, error", [
    ("cut", httpx.RemoteProtocolError),
    ("bad_chunk", json.JSONDecodeError),
    ("stall", httpx.ReadTimeout),
])
def test_mid_reply_faults_of_a_plain_call(emu, gemini, fault, error):
    emu.inject(fault, seconds=5)
    with pytest.raises(error):
        gemini.generate("hi", timeout_ms=300)


def test_error_chunk_of_a_plain_call_is_a_200_error_object(emu, gemini):
    emu.inject("error_chunk")
    assert gemini.generate("hi")["error"]["code"] == 500  # a 200: the SDK passes it on, the provider must look


def test_raw_serves_the_given_body_or_events(emu, gemini):
    emu.inject("raw", body={"candidates": ["not", "a", "candidate"]})
    assert gemini.generate("hi") == {"candidates": ["not", "a", "candidate"]}
    events = [{"candidates": [{"content": {"parts": [{"text": f"part {n} "}]}}]} for n in range(3)]
    emu.inject("raw", events=events)
    assert "".join(text_of(chunk) for chunk in gemini.stream("hi")) == "part 0 part 1 part 2 "


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
def test_control_endpoints(emu, gemini):
    assert raw(emu, "POST", "/_emulator/faults", {"fault": "rate_limit", "times": 2,
                                                   "params": {"retry_delay": 1}})[0] == 200
    for _ in range(2):
        with pytest.raises(errors.ClientError):
            gemini.generate("hi")
    assert raw(emu, "GET", "/_emulator/stats")[1]["request_count"] == 2
    assert raw(emu, "POST", "/_emulator/faults", {"steady": "server_error"})[0] == 200
    with pytest.raises(errors.ServerError):
        gemini.generate("hi")
    assert raw(emu, "DELETE", "/_emulator/faults")[0] == 200
    assert text_of(gemini.generate("hi"))
    status, stats = raw(emu, "POST", "/_emulator/config", {"reply_delay": 0.05})
    assert status == 200 and stats["reply_delay"] == emu.reply_delay == 0.05
    assert raw(emu, "POST", "/_emulator/faults", {"fault": "meteor"})[0] == 400
    assert raw(emu, "GET", "/_emulator/nothing")[0] == 404
    assert raw(emu, "POST", "/_emulator/reset")[1]["request_count"] == 0


def test_api_key_is_required(emu):
    status, answer = raw(emu, "POST", GENERATE_PATH, HELLO)
    assert status == 401 and answer["error"]["status"] == "UNAUTHENTICATED"
    status, answer = raw(emu, "POST", GENERATE_PATH + "?key=query-key", HELLO)
    assert status == 200 and answer["candidates"][0]["content"]["role"] == "model"
    assert emu.request_count == 2 and emu.requests[0]["has_key"] is False


def test_required_key_rejects_other_keys():
    with GeminiEmulator(required_key="right-key") as emu:
        with pytest.raises(errors.ClientError) as caught:
            Gemini(emu.base_url, key="wrong-key").generate("hi")
        assert caught.value.code == 400 and "API key not valid" in caught.value.message
        assert caught.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        assert text_of(Gemini(emu.base_url, key="right-key").generate("hi"))
        assert emu.keys_seen == ["wrong-key", "right-key"]


def test_bad_json_and_unknown_paths(emu):
    key = {"x-goog-api-key": "k"}
    status, answer = raw(emu, "POST", GENERATE_PATH, b"{not json", key)
    assert status == 400 and answer["error"]["status"] == "INVALID_ARGUMENT"
    status, answer = raw(emu, "POST", "/v1beta/models/x:explode", HELLO, key)
    assert status == 404 and answer["error"]["code"] == 404
    assert raw(emu, "GET", GENERATE_PATH, None, key)[0] == 404


def test_keep_alive_serves_many_requests_on_one_connection(emu):
    """HTTP/1.1 keep-alive with exact Content-Length (latency is measured in bench/, not here)."""
    connection = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    for _ in range(10):
        connection.request("POST", GENERATE_PATH, json.dumps(HELLO),
                           {"x-goog-api-key": "k", "Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        assert response.status == 200
        assert int(response.getheader("Content-Length")) == len(answer)
    connection.close()


def test_requests_are_served_concurrently(emu, gemini):
    """One transport shared by threads, as the provider shares it between the server's threads."""
    emu.reply_delay = 0.2
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: text_of(gemini.generate(f"q{i}")), range(8)))
    assert all(replies) and time.monotonic() - started < 1.0


def test_context_manager_starts_and_stops():
    with GeminiEmulator() as emu:
        assert emu.base_url == f"http://127.0.0.1:{emu.port}" and emu.port > 0
        assert text_of(Gemini(emu.base_url).generate("hi"))
    with pytest.raises(httpx.ConnectError):
        Gemini(emu.base_url).generate("hi")


def test_command_line_runs_until_stopped():
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.providers.emulators.gemini", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)  # ROOT: the project folder
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            line = pool.submit(process.stdout.readline).result(timeout=10)
        base_url = line.split()[-1]
        assert base_url.startswith("http://127.0.0.1:")
        assert text_of(Gemini(base_url).generate("hi")).startswith("Demo reply to: hi")
    finally:
        process.terminate()
        process.wait(timeout=10)
