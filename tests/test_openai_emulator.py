"""The OpenAI-compatible emulator, through the real openai SDK and LangChain's ChatOpenAI.

What the provider tests and demo mode rely on: the wire shapes the SDK accepts (JSON, SSE with
the usage chunk, errors), the checks OpenAI makes on a request, Azure's deployment path, and
how the OpenAI-specific faults look on the wire. The faults' timing (drip, stall, hang) is the
Gemini emulator's code and is covered there and, through the provider, in test_openai_provider.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from langchain_openai import AzureChatOpenAI, ChatOpenAI

from gateway.providers.emulators.openai_compat import OpenAIEmulator

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server():
    with OpenAIEmulator() as emu:
        yield emu


@pytest.fixture
def emu(server):
    server.reset()
    yield server
    server.reset()


def sdk(emu: OpenAIEmulator, key: str = "k") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=emu.base_url, max_retries=0, timeout=5)


def raw(emu, method, path, body=None, headers=None):
    """Raw HTTP; returns (status, headers, json)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(emu.root_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


BEARER = {"Authorization": "Bearer k"}


def test_a_completion_has_the_documented_shape_and_usage(emu):
    completion = sdk(emu).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Tell me about owls"}])
    text = completion.choices[0].message.content
    assert text.startswith("Demo reply to: Tell me about owls") and "OpenAI-compatible emulator" in text
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens == math.ceil(len("Be brief.\nTell me about owls") / 4)
    assert usage.completion_tokens == math.ceil(len(text) / 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    record = emu.requests[0]
    assert record["path"] == "/v1/chat/completions" and record["model"] == MODEL and record["stream"] is False
    assert "authorization" not in record["headers"] and emu.keys_seen == ["k"]


def test_a_stream_sends_pieces_and_a_usage_chunk_only_when_asked(emu):
    client = sdk(emu)
    messages = [{"role": "user", "content": "one two three four five six seven eight"}]
    with_usage = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[0].choices[0].delta.role == "assistant"
    assert with_usage[-2].choices[0].finish_reason == "stop"
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens > 0
    assert all(chunk.usage is None for chunk in with_usage[:-1])
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in plain)
    assert all(chunk.choices for chunk in plain)
    assert text == client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content


def test_stop_and_max_tokens_shape_the_reply(emu):
    client = sdk(emu)
    stopped = client.chat.completions.create(model=MODEL, messages=HELLO, stop=["reply", "Demo"])
    assert stopped.choices[0].message.content == "" and stopped.choices[0].finish_reason == "stop"
    capped = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=2)
    assert capped.choices[0].message.content == "Demo rep" and capped.choices[0].finish_reason == "length"


def test_models_are_listed(emu):
    assert [model.id for model in sdk(emu).models.list()] == ["gpt-4o-mini", "gpt-4o", "emulator-chat"]
    assert emu.request_count == 0  # only chat calls count


@pytest.mark.parametrize("change, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
    ({"model": ""}, "model"),
])
def test_requests_openai_would_refuse_are_a_400_naming_the_param(emu, change, param):
    status, _, body = raw(emu, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HELLO, **change}, BEARER)
    assert status == 400 and body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


def test_keys_are_checked(emu):
    status, _, body = raw(emu, "POST", "/v1/chat/completions", {"model": MODEL, "messages": HELLO})
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    with OpenAIEmulator(required_key="right") as strict:
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(strict, key="wrong").chat.completions.create(model=MODEL, messages=HELLO)
        assert caught.value.code == "invalid_api_key"
        assert sdk(strict, key="right").chat.completions.create(model=MODEL, messages=HELLO).choices
        assert strict.keys_seen == ["wrong", "right"]


def test_bad_json_and_unknown_paths(emu):
    status, _, body = raw(emu, "POST", "/v1/chat/completions", b"{not json", BEARER)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, _, body = raw(emu, "POST", "/v1/embeddings", {}, BEARER)
    assert status == 404 and body["error"]["message"] == "Invalid URL (POST /v1/embeddings)"


@pytest.mark.parametrize("params, retry_after, retry_after_ms", [
    ({}, "2", "2000"),
    ({"retry_delay": 0.25}, "1", "250"),
    ({"retry_delay": "nans"}, "nans", "nans"),
    ({"retry_after": "Wed, 21 Oct 2026 07:28:00 GMT", "retry_after_ms": None}, "Wed, 21 Oct 2026 07:28:00 GMT", None),
])
def test_rate_limit_headers(emu, params, retry_after, retry_after_ms):
    emu.inject("rate_limit", **params)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(emu).chat.completions.create(model=MODEL, messages=HELLO)
    headers = caught.value.response.headers
    assert headers.get("retry-after") == retry_after and headers.get("retry-after-ms") == retry_after_ms
    assert caught.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize("fault, params, error", [
    ("server_error", {}, openai.InternalServerError),
    ("unavailable", {}, openai.InternalServerError),
    ("bad_request", {}, openai.BadRequestError),
    ("bad_request", {"status": 404}, openai.NotFoundError),
    ("bad_request", {"status": 422}, openai.UnprocessableEntityError),
    ("permission_denied", {}, openai.PermissionDeniedError),
    ("permission_denied", {"status": 401}, openai.AuthenticationError),
])
def test_error_faults_map_to_sdk_errors(emu, fault, params, error):
    emu.inject(fault, **params)
    with pytest.raises(error):
        sdk(emu).chat.completions.create(model=MODEL, messages=HELLO)
    assert emu.request_count == 1


def test_safety_block_is_a_content_filter_finish_without_content(emu):
    emu.inject("safety_block")
    choice = sdk(emu).chat.completions.create(model=MODEL, messages=HELLO).choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.content is None


def test_error_chunk_is_an_openai_error_in_the_stream(emu):
    emu.inject("error_chunk", after=2)
    with pytest.raises(openai.APIError, match="server had an error"):
        list(sdk(emu).chat.completions.create(model=MODEL, messages=HELLO, stream=True))


def test_raw_serves_verbatim_events(emu):
    events = [{"choices": [{"index": 0, "delta": {"content": f"part {n} "}}]} for n in range(3)]
    emu.inject("raw", events=[*events, b"[DONE]"])
    chunks = sdk(emu).chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    assert "".join(c.choices[0].delta.content for c in chunks) == "part 0 part 1 part 2 "


def test_control_endpoints(emu):
    assert raw(emu, "POST", "/_emulator/faults", {"steady": "unavailable"})[0] == 200
    with pytest.raises(openai.InternalServerError):
        sdk(emu).chat.completions.create(model=MODEL, messages=HELLO)
    assert raw(emu, "DELETE", "/_emulator/faults")[0] == 200
    assert raw(emu, "GET", "/_emulator/stats")[2]["request_count"] == 1


def test_langchain_chat_openai_invoke_and_stream(emu):
    llm = ChatOpenAI(model=MODEL, api_key="k", base_url=emu.base_url, max_retries=0, stream_usage=True)
    message = llm.invoke([("system", "Be brief."), ("human", "Name three rivers")])
    assert message.content.startswith("Demo reply to: Name three rivers")
    assert message.usage_metadata["total_tokens"] == (
        message.usage_metadata["input_tokens"] + message.usage_metadata["output_tokens"])
    chunks = list(llm.stream("Name three rivers"))
    assert "".join(chunk.content for chunk in chunks) == llm.invoke("Name three rivers").content
    assert sum(chunk.usage_metadata["output_tokens"] for chunk in chunks if chunk.usage_metadata) > 0
    assert emu.requests[1]["json"]["stream_options"] == {"include_usage": True}


def test_azure_deployment_path_and_api_key_header(emu):
    llm = AzureChatOpenAI(azure_endpoint=emu.root_url, azure_deployment="my-deployment", api_version="2024-10-21",
                          api_key="azure-key", max_retries=0)
    assert llm.invoke("hi").content.startswith("Demo reply to: hi")
    record = emu.requests[0]
    assert record["path"] == "/openai/deployments/my-deployment/chat/completions"
    assert emu.keys_seen == ["azure-key"] and "authorization" not in record["headers"]


def test_command_line_runs_until_stopped():
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.providers.emulators.openai_compat", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            line = pool.submit(process.stdout.readline).result(timeout=10)
        base_url = line.split()[-1]
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        client = openai.OpenAI(api_key="k", base_url=base_url, max_retries=0, timeout=5)
        assert client.chat.completions.create(model=MODEL, messages=HELLO).choices[0].message.content
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
