"""A generateContent call with the google-genai SDK's own request, built once and sent lean.

Why: the SDK's `BaseApiClient.request` redoes per call what never changes for a model. It
validates the per-call `http_options` into a pydantic `HttpOptions`, copies and patches the
client's options (`patch_http_options`), joins the URL and copies the headers
(`_build_request`), enters a tenacity `Retrying` that is set to one attempt, and wraps the
reply in a pydantic `SdkHttpResponse`. Measured per call against the emulator on loopback
(bench/layers.py, CPU of the calling thread, medians of 3 runs): raw httpx 0.47-0.48 ms, the
SDK's `_request_once` 0.51-0.53 ms, its `request()` 0.61-0.63 ms, `generate_content` 1.24-1.35 ms.

How: for each model the request (method, URL, the client's headers: key, user agent, API
client, content type) is built ONCE by the SDK's own builder `_build_request`. Each call then
copies those headers, adds the SDK's `X-Server-Timeout` for the time left (the SDK's
`populate_server_timeout_header`, as `request()` would) and sends through `_request_once`: the
lowest SDK method that still applies the SDK's auth (ADC tokens, mTLS endpoint), JSON encoding,
timeout and error raising (`errors.APIError.raise_for_response`), so `translate_provider_error`
sees exactly what it saw before. The reply is parsed by the provider (`gemini_replies`).

What it bypasses, and refuses to run with: the SDK client's own retry options (`request()`
retries with them; we do not, and our retry policy is the one that should) and `extra_body`
(merged into each body by `_build_request`, which here runs once with an empty body). A client
configured with either is refused at start with `SdkShortcutUnsafe`.

The price: `_build_request`, `_request_once` and `HttpRequest` are private to google-genai.
The SDK is pinned in requirements.txt, and `tests/test_gemini_transport.py` compares, at the
emulator, the request this module sends with the one the SDK's own `generate_content` sends
(method, URL, headers, body): an SDK upgrade that changes the wire fails there.
Streams do not come here: they go through the SDK's `request_streamed` (gemini_wrapper).
"""

from __future__ import annotations

import json
from typing import Any

from google.genai import _api_client as sdk

_SERVER_TIMEOUT = "X-Server-Timeout"  # the header `populate_server_timeout_header` sets
_MAX_MODELS = 1024  # requests kept prebuilt; model names come from the registry, this is a backstop


class SdkShortcutUnsafe(RuntimeError):
    """The SDK client is configured in a way the lean call would silently bypass."""


def milliseconds(seconds: float) -> int:
    """The SDK's unit for timeouts (`HttpOptions.timeout`), at least 1 ms."""
    return max(1, int(seconds * 1000))


class GeminiTransport:
    """generateContent through one google-genai `BaseApiClient`, its request prebuilt per model.

    `api` stays the SDK client: streams and anything else use it as before."""

    def __init__(self, api: Any, *, model: str | None = None):
        check_shortcut_is_safe(api)
        self.api = api
        self._prebuilt: dict[str, sdk.HttpRequest] = {}
        # The client's own headers: an X-Server-Timeout among them was set there on purpose.
        self._fixed_server_timeout = _SERVER_TIMEOUT in (api._http_options.headers or {})
        if model:
            self._request_for(model)  # built now, so a misconfigured client fails at start

    def generate(self, model: str, body: dict, seconds_left: float) -> dict:
        """POST `body` to `models/<model>:generateContent`; the parsed JSON reply.

        Raises what the SDK's `_request_once` raises (`errors.APIError` for HTTP errors, httpx's
        timeout and transport errors) or `ValueError` for a reply that is not JSON."""
        prebuilt = self._prebuilt.get(model) or self._request_for(model)
        timeout = sdk.get_timeout_in_seconds(milliseconds(seconds_left))
        headers = dict(prebuilt.headers)  # the SDK adds its ADC token to the headers it is given
        sdk.populate_server_timeout_header(headers, timeout)
        response = self.api._request_once(
            sdk.HttpRequest(headers=headers, url=prebuilt.url, method=prebuilt.method, data=body, timeout=timeout))
        return json.loads(response.response_stream[0])

    def _request_for(self, model: str) -> sdk.HttpRequest:
        """The SDK's own request for this model, without body or per-call timeout."""
        built = self.api._build_request("post", f"models/{model}:generateContent", {}, None)
        if not self._fixed_server_timeout:
            # From a client-level timeout: each call's own timeout replaces it, as in `request()`.
            built.headers.pop(_SERVER_TIMEOUT, None)
        if len(self._prebuilt) < _MAX_MODELS:
            self._prebuilt[model] = built
        return built


def check_shortcut_is_safe(api: Any) -> None:
    """Refuse an SDK client whose configuration `GeminiTransport` would bypass, or an SDK without
    the private methods it relies on (an upgrade past the pin)."""
    for method in ("_build_request", "_request_once"):
        if not callable(getattr(api, method, None)):
            raise SdkShortcutUnsafe(f"google-genai's BaseApiClient has no {method}: check the google-genai pin "
                                    "in requirements.txt against gateway/providers/gemini_transport.py")
    options = getattr(api, "_http_options", None)
    if options is None or not hasattr(sdk, "HttpRequest"):
        raise SdkShortcutUnsafe("google-genai's client has no _http_options/HttpRequest: check the google-genai pin")
    if options.retry_options is not None:
        raise SdkShortcutUnsafe(
            "the google-genai client has retry_options configured, which the gateway's lean generateContent "
            "call would bypass: remove them (the gateway's own retry policy, RETRY_*, does the retrying)")
    if getattr(options, "extra_body", None):
        raise SdkShortcutUnsafe(
            "the google-genai client has extra_body configured, which the gateway's lean generateContent "
            "call would not send: remove it")
