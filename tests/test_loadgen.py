"""The benchmark's load generator reads real responses correctly (the figures depend on it)."""

from __future__ import annotations

import json

from bench.loadgen import (
    Connection,
    build_post,
    build_request,
    run_concurrent,
    run_sequential,
    time_to_first_byte,
)


def gemini_request(emulator, stream: bool = False):
    action = "streamGenerateContent?alt=sse" if stream else "generateContent"
    url = f"{emulator.base_url}/v1beta/models/gemini-2.0-flash:{action}"

    def make(i: int) -> bytes:
        body = {"contents": [{"role": "user", "parts": [{"text": f"load {i}"}]}]}
        return build_post(url, json.dumps(body).encode(), {"x-goog-api-key": "k"})

    return url, make


def test_keep_alive_exchanges_return_whole_bodies(emulator):
    url, make = gemini_request(emulator)
    connection = Connection(url)
    try:
        for i in range(3):
            status, body = connection.exchange(make(i))
            assert status == 200 and f"load {i}" in json.loads(body)["candidates"][0]["content"]["parts"][0]["text"]
    finally:
        connection.close()


def test_chunked_streams_are_read_to_the_end(make_app, serve):
    server = serve(make_app(ratelimit_enabled=False))
    url = server.url + "/api/v1/generate/text/stream"
    status, body = Connection(url).exchange(build_post(url, json.dumps({"prompt": "stream me"}).encode()))
    assert status == 200 and body.decode().rstrip().splitlines()[0] == "event: chunk"
    assert "event: done" in body.decode()
    assert len(time_to_first_byte(url, lambda i: build_post(url, json.dumps({"prompt": f"s{i}"}).encode()), 3)) == 3


def test_sequential_and_concurrent_runs_count_answers_and_errors(emulator):
    url, make = gemini_request(emulator)
    assert len(run_sequential(url, make, 20).latencies_ms) == 20
    result = run_concurrent(url, make, clients=4, seconds=0.5)
    assert result.errors == 0 and result.requests_per_second > 0
    assert emulator.request_count >= 20 + len(result.latencies_ms)
    emulator.set_steady_fault("server_error")
    failing = run_sequential(url, make, 5)
    assert failing.errors == 5 and not failing.latencies_ms


def test_requests_of_any_method_send_the_path_as_given_and_keep_the_answers_headers(make_app, serve):
    server = serve(make_app(ratelimit_enabled=False))
    connection = Connection(server.url)
    try:
        status, body = connection.exchange(build_request("GET", server.url + "/api/v1/health"))
        assert status == 200 and json.loads(body)["status"] and connection.headers["x-request-id"]
        status, body = connection.exchange(build_request("GET", server.url + "/no%20such%2Fpath"))
        assert status == 404 and json.loads(body)["code"] == "not_found"
    finally:
        connection.close()
