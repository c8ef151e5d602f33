"""GEMINI_DEADLINE_SECONDS covers the whole upstream exchange: headers, body and stream included.

Through HTTP against waitress, with the emulator dripping a valid answer one byte at a time or
hanging mid-stream. The assertions are outcomes (504 / the `error` event, the upstream connection
closed by the gateway, the drip unfinished), not wall-clock thresholds. The retry policy runs on
the real clock here, as in production, so the deadline is the one the transport enforces.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.test_streaming import STREAM, events_of

TEXT = "/api/v1/generate/text"
DRIP = 0.05  # seconds per byte: a ~500-byte answer would take ~25 s to arrive


@pytest.fixture
def live(make_app, serve):
    """A waitress server whose upstream calls have a 1 s deadline, retried on the real clock."""
    def start():
        app = make_app(ratelimit_enabled=False, gemini_deadline_seconds=1,
                       client_policy={"clock": time.monotonic})
        return app, serve(app)

    return start


@pytest.mark.parametrize("path, params", [
    (TEXT, {}),  # the status line and headers come at once, then the body drips
    (TEXT, {"headers": True}),  # the status line and headers drip too
    (STREAM, {"after": 0}),  # a stream whose first chunk drips: it never opens
])
def test_a_dripping_upstream_is_a_504_at_the_deadline(live, emulator, path, params):
    app, server = live()
    emulator.inject("drip", interval=DRIP, **params)
    response = requests.post(server.url + path, json={"prompt": "Tell me about rivers"}, timeout=30)
    assert response.status_code == 504
    assert response.json()["code"] == "upstream_timeout"
    delivery = emulator.wait_delivery()
    assert delivery.client_closed  # the gateway hung up on the upstream
    assert delivery.sent < delivery.total  # before the drip was done
    assert emulator.request_count == 1  # no retry after the deadline
    record = app.extensions["gateway"].tracker.records()[0]
    assert record.status == 504


@pytest.mark.parametrize("fault, params", [
    ("drip", {"after": 1, "interval": DRIP}),  # one chunk at once, then one byte at a time
    ("stall", {"after": 2, "seconds": 60}),  # two chunks, then nothing
])
def test_a_stream_that_slows_or_hangs_mid_way_ends_with_an_error_event(live, emulator, fault, params):
    app, server = live()
    emulator.inject(fault, **params)
    with requests.post(server.url + STREAM, json={"prompt": "one two three four five six seven eight"},
                       timeout=30) as response:
        assert response.status_code == 200
        events = events_of(response.text)
    name, error = events[-1]
    assert name == "error" and error["code"] == "upstream_timeout"
    assert [name for name, _ in events[:-1]] == ["chunk"] * params["after"]
    delivery = emulator.wait_delivery()
    assert delivery.client_closed and delivery.sent < delivery.total
    record = app.extensions["gateway"].tracker.records()[0]
    assert record.status == 504 and record.request_id == error["request_id"]


def test_a_slow_answer_within_the_deadline_is_unaffected(make_app, serve, emulator):
    server = serve(make_app(ratelimit_enabled=False, gemini_deadline_seconds=30))
    emulator.inject("drip", interval=0.001, headers=True)  # about a second in all
    response = requests.post(server.url + TEXT, json={"prompt": "hello"}, timeout=30)
    assert response.status_code == 200 and response.json()["generated_text"]
    delivery = emulator.wait_delivery()
    assert delivery.sent == delivery.total and not delivery.client_closed


def test_the_environments_proxy_is_kept(monkeypatch):
    """httpx takes proxies from the environment only for a transport it builds itself: ours looks them up."""
    from gateway.providers import deadline as upstream_deadline

    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "example.com")
    assert upstream_deadline.environment_proxy("https://generativelanguage.googleapis.com/") == (
        "http://proxy.internal:3128")
    assert upstream_deadline.environment_proxy("https://api.example.com/") is None
    transport = upstream_deadline.build_transport(base_url="https://generativelanguage.googleapis.com/",
                                                  max_connections=4, verify=True)
    assert type(transport.inner._pool).__name__ == "HTTPProxy"
