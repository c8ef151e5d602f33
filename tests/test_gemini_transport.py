"""The lean generateContent call (gateway/providers/gemini_transport.py) against the emulator.

The pin: the request the gateway sends is the one the google-genai SDK's own `generate_content`
sends (method, URL, query, every header the emulator records, the key, the JSON body), captured
at the emulator. The transport relies on the SDK's private request builder and sender, so an
SDK upgrade that changes the wire, or moves those methods, fails here.
"""

from __future__ import annotations

import pytest
from google import genai
from google.genai import types

from gateway.errors import UpstreamRateLimited, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from gateway.providers.base import GenerationParams, Message, ProviderRequest, user_prompt
from gateway.providers.gemini_transport import GeminiTransport, SdkShortcutUnsafe
from gemini_wrapper import GeminiProvider, _body, sdk_transport_of

MODEL = "gemini-2.0-flash"
KEY = "test-key-not-a-secret"

REQUESTS = [
    user_prompt("Write a short story about a robot", GenerationParams(temperature=0.7), model=MODEL),
    ProviderRequest(MODEL, (Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "yo"),
                            Message("user", "and more?")),
                    GenerationParams(temperature=0.0, max_tokens=100, top_p=0.9, stop=("END", "STOP"))),
    user_prompt("no settings at all", model="gemini-2.5-pro"),
]


def sdk_config(request: ProviderRequest, timeout_ms: int) -> types.GenerateContentConfig:
    """The same call in the SDK's typed words."""
    params = request.params
    system = [m.content for m in request.messages if m.role == "system"]
    return types.GenerateContentConfig(
        temperature=params.temperature, max_output_tokens=params.max_tokens, top_p=params.top_p,
        stop_sequences=list(params.stop) or None, system_instruction=system[0] if system else None,
        http_options=types.HttpOptions(timeout=timeout_ms))


def sdk_contents(request: ProviderRequest) -> list[types.Content]:
    return [types.Content(role="model" if m.role == "assistant" else "user", parts=[types.Part(text=m.content)])
            for m in request.messages if m.role != "system"]


def wire(record: dict) -> dict:
    """What the emulator saw of one call: all of it but its running number."""
    return {field: record[field] for field in ("method", "path", "query", "headers", "json", "has_key")}


@pytest.fixture
def provider(emulator):
    provider = GeminiProvider(api_key=KEY, base_url=emulator.base_url, pool_shards=1, model=MODEL)
    yield provider
    provider.close()


@pytest.mark.parametrize("request_", REQUESTS, ids=["one-prompt", "conversation-all-params", "other-model-defaults"])
def test_the_gateway_sends_what_the_sdks_own_generate_content_sends(provider, emulator, request_):
    """The pin test: same method, URL, headers (key, user agent, API client, server timeout) and body."""
    provider.complete(request_, 2.5)  # X-Server-Timeout: ceil(2.5 s), as the SDK writes it
    client = provider.chat_models[0].client  # the google-genai client LangChain built
    client.models.generate_content(model=request_.model, contents=sdk_contents(request_),
                                   config=sdk_config(request_, 2500))
    ours, sdks = emulator.requests
    assert wire(ours) == wire(sdks)
    assert ours["headers"]["x-server-timeout"] == "3" and ours["json"] == _body(request_)
    assert emulator.keys_seen == [KEY, KEY] and "x-goog-api-key" not in ours["headers"]  # the key is never recorded


def test_a_plain_sdk_client_with_its_own_headers_and_timeout_sends_the_same_as_generate_content(emulator):
    """A client-level timeout is replaced by each call's own, as the SDK's `request()` does; the
    client's extra headers go out on every call."""
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(
        base_url=emulator.base_url, headers={"x-team": "search"}, timeout=60_000))
    transport = GeminiTransport(client._api_client, model=MODEL)
    request = REQUESTS[1]
    answer = transport.generate(MODEL, _body(request), 7.2)
    client.models.generate_content(model=MODEL, contents=sdk_contents(request), config=sdk_config(request, 7200))
    ours, sdks = emulator.requests
    assert wire(ours) == wire(sdks)
    assert ours["headers"]["x-team"] == "search" and ours["headers"]["x-server-timeout"] == "8"
    assert answer["candidates"][0]["content"]["parts"][0]["text"].startswith("Demo reply to: and more?")


def test_each_models_request_is_built_once(emulator):
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=emulator.base_url))
    api = client._api_client
    built = []
    original = api._build_request

    def counted(*args, **kwargs):
        built.append(args[1])
        return original(*args, **kwargs)

    api._build_request = counted
    transport = GeminiTransport(api, model=MODEL)
    for _ in range(3):
        for model in (MODEL, "gemini-2.5-pro"):
            transport.generate(model, _body(user_prompt("hello", model=model)), 5.0)
    assert built == [f"models/{MODEL}:generateContent", "models/gemini-2.5-pro:generateContent"]
    assert [record["model"] for record in emulator.requests] == [MODEL, "gemini-2.5-pro"] * 3
    assert all("x-server-timeout" in record["headers"] for record in emulator.requests)


@pytest.mark.parametrize("options, words", [
    ({"retry_options": types.HttpRetryOptions(attempts=3)}, "retry_options"),
    ({"extra_body": {"labels": {"team": "search"}}}, "extra_body"),
])
def test_a_client_whose_settings_the_shortcut_would_bypass_is_refused_at_start(emulator, options, words):
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=emulator.base_url, **options))
    with pytest.raises(SdkShortcutUnsafe, match=words):
        GeminiTransport(client._api_client)


def test_the_provider_refuses_a_langchain_client_with_sdk_retries(emulator):
    """The provider checks every shard's SDK client when it is built, not at its first call."""
    from langchain_google_genai import ChatGoogleGenerativeAI

    def with_sdk_retries(**options):
        chat_model = ChatGoogleGenerativeAI(**options)
        sdk_transport_of(chat_model)._http_options.retry_options = types.HttpRetryOptions(attempts=4)
        return chat_model

    with pytest.raises(SdkShortcutUnsafe, match="retry_options"):
        GeminiProvider(api_key=KEY, base_url=emulator.base_url, pool_shards=2, chat_model_factory=with_sdk_retries)
    assert emulator.request_count == 0


def test_an_sdk_without_the_private_methods_is_refused_with_the_pin_named():
    class MovedOn:  # an SDK release that renamed its internals
        _http_options = types.HttpOptions()

    with pytest.raises(SdkShortcutUnsafe, match="google-genai pin"):
        GeminiTransport(MovedOn())


def test_a_retry_after_header_alone_is_the_wait_the_provider_asked_for(provider, emulator):
    emulator.set_steady_fault("rate_limit", retry_delay="nans", retry_after="4")  # RetryInfo unreadable
    with pytest.raises(UpstreamRateLimited) as caught:
        provider.complete(REQUESTS[0], 5.0)
    assert caught.value.retry_after == 4.0 and caught.value.details == {"provider_status": 429}


@pytest.mark.parametrize("fault, error, status", [
    ("rate_limit", UpstreamRateLimited, 429), ("server_error", UpstreamUnavailable, 500),
    ("unavailable", UpstreamUnavailable, 503), ("bad_request", UpstreamRejected, 400),
    ("permission_denied", UpstreamRejected, 403),
])
def test_http_errors_keep_their_translation(provider, emulator, fault, error, status):
    emulator.set_steady_fault(fault)
    with pytest.raises(error) as caught:
        provider.complete(REQUESTS[0], 5.0)
    assert caught.value.details["provider_status"] == status
    assert caught.value.retryable == (status == 429 or status >= 500)


def test_a_404_is_an_unknown_model(provider, emulator):
    with pytest.raises(UpstreamRejected, match="does not know the configured model") as caught:
        provider.complete(user_prompt("hello", model="no/such-model"), 5.0)  # a path the emulator does not serve
    assert caught.value.details == {"provider_status": 404}


def test_the_time_left_bounds_the_call(provider, emulator):
    emulator.set_steady_fault("hang", seconds=10)
    with pytest.raises(UpstreamTimeout):
        provider.complete(REQUESTS[0], 0.3)
    assert emulator.requests[0]["headers"]["x-server-timeout"] == "1"


@pytest.fixture
def redirector(emulator):
    """A loopback server that answers every POST with a 307 to the same path on the emulator (another origin)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(307)
            self.send_header("Location", emulator.base_url.rstrip("/") + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_a_redirect_is_not_followed_so_the_key_never_goes_to_another_host(emulator, redirector):
    """httpx drops only Authorization on a redirect to another origin, not Gemini's x-goog-api-key:
    following one would hand the key to whatever host the Location names."""
    provider = GeminiProvider(api_key=KEY, base_url=redirector, pool_shards=1, model=MODEL)
    try:
        with pytest.raises(UpstreamRejected) as plain:
            provider.complete(REQUESTS[0], 5.0)
        with pytest.raises(UpstreamRejected) as stream:
            list(provider.open_stream(REQUESTS[0], 5.0))
    finally:
        provider.close()
    assert plain.value.details == stream.value.details == {"provider_status": 307}
    assert emulator.request_count == 0 and emulator.keys_seen == []
