"""A hostile or broken upstream (and the prompts that steer it) gets our own clear answers.

Retry hints that are not finite numbers, answers built to make a regex backtrack, replies with
absurd numbers or nesting, and usage that shrinks mid-stream: each is handled at its cause.
"""

from __future__ import annotations

import pytest
import requests

ERROR_KEYS = {"error", "code", "details", "request_id"}
TEXT, STREAM = "/api/v1/generate/text", "/api/v1/generate/text/stream"


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == ERROR_KEYS and body["code"] == code, body
    return body


# --- 2: retry hints that are not finite, non-negative numbers -------------------------------------

HINTS = [  # (RetryInfo.retryDelay, Retry-After header, the Retry-After the client gets: None = ours)
    ("nans", None, None), ("infs", None, None), ("-1s", None, None),
    ("1e300s", None, "86400"), ("", "nan", None), ("", "inf", None), ("", "1e400", None),
    ("", "-5", None), ("4.5s", None, "5"), ("", "12", "12"),
]


@pytest.mark.parametrize(("delay", "header", "expected"), HINTS)
def test_odd_retry_hints_are_ignored_or_clamped_never_a_500(make_app, serve, emulator, clock,
                                                              delay, header, expected):
    server = serve(make_app(ratelimit_enabled=False, cache_enabled=False))
    emulator.set_steady_fault("rate_limit", retry_delay=delay, retry_after=header)
    for path in (TEXT, STREAM):
        answer = requests.post(server.url + path, json={"prompt": f"hello {path}"}, timeout=30)
        assert_error(answer, 429, "upstream_rate_limited")
        retry_after = answer.headers["Retry-After"]
        assert retry_after.isdigit() and 1 <= int(retry_after) <= 86400
        if expected is not None:
            assert retry_after == expected
    assert all(0 <= wait <= 60 for wait in clock.sleeps)  # finite, within RETRY_MAX_WAIT


def test_a_non_finite_hint_set_by_anyone_still_gives_a_finite_wait_and_header(make_app):
    import math

    from gateway.errors import UpstreamRateLimited
    from gateway.providers.retry_policy import RetryPolicy

    policy = RetryPolicy(min_wait=1, max_wait=60, jitter=lambda: 0.0)
    for hint in (math.nan, math.inf, -math.inf, -3.0):
        assert policy.wait_before(2, UpstreamRateLimited("x", retry_after=hint)) == 2.0  # the exponential wait
    app = make_app(ratelimit_enabled=False)
    with app.test_request_context():
        from gateway.http import routes

        _, status, headers = routes.error_payload(UpstreamRateLimited("x", retry_after=math.inf))
    assert status == 429 and "Retry-After" not in headers


# --- 3: code extraction is linear in the answer ------------------------------------------------------

class CountingStr(str):
    """An answer that counts the characters extraction looks at (find spans, indexes, slices)."""

    examined = 0

    def find(self, sub, start=None, end=None):
        found = super().find(sub, start, end)
        start = start or 0
        CountingStr.examined += (len(self) if found < 0 else found + len(sub)) - start
        return found

    def __getitem__(self, key):
        piece = super().__getitem__(key)
        CountingStr.examined += len(piece)
        return piece


def examined_by_extraction(answer: str) -> int:
    from gateway.tasks.prompts import fenced_block

    CountingStr.examined = 0
    fenced_block(CountingStr(answer))
    return CountingStr.examined


ADVERSARIAL = [  # the shapes that froze the regex: an unclosed fence before one long line, fences only
    lambda n: "```" + "a" * n, lambda n: "```" * n, lambda n: "```\n" + "\n \t" * n,
    lambda n: "```py\n" + "\n  ``" * n, lambda n: "x\n" * n + "```",
]


@pytest.mark.parametrize("build", ADVERSARIAL)
def test_code_extraction_looks_at_each_character_a_bounded_number_of_times(build):
    small, large = build(15_000), build(150_000)
    assert examined_by_extraction(large) <= 4 * len(large)
    assert examined_by_extraction(large) <= 11 * examined_by_extraction(small)


def test_code_extraction_of_huge_adversarial_answers_is_right():
    from gateway.tasks.prompts import extract_code

    assert extract_code("```" + "a" * 150_000) == "```" + "a" * 150_000  # no line after the fence: no block
    assert extract_code("```" * 50_000) == "```" * 50_000
    assert extract_code("```python\n" + "x = 1\n" * 50_000 + "```\ntail") == ("x = 1\n" * 50_000).rstrip()
    assert extract_code("```\n" + "a" * 150_000) == "a" * 150_000  # unclosed: to the end


def test_code_extraction_agrees_with_the_old_pattern_on_many_small_answers():
    import random
    import re

    from gateway.tasks.prompts import fenced_block

    old = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)
    chance = random.Random(8)
    for _ in range(20_000):
        answer = "".join(chance.choice(["`", "```", "\n", " ", "\t", "a", "py", "+"])
                         for _ in range(chance.randint(0, 14)))
        match = old.search(answer)
        assert fenced_block(answer) == (match.group(2) if match else None), repr(answer)


def reply(text: str, **usage) -> dict:
    return {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 7, **usage}}


def test_an_unclosed_fence_before_a_long_line_is_answered_whole_over_http(make_app, serve, emulator):
    server = serve(make_app(ratelimit_enabled=False, cache_enabled=False))
    emulator.set_steady_fault("raw", body=reply("```" + "a" * 150_000))
    answer = requests.post(server.url + "/api/v1/generate/code", json={"prompt": "fence"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["generated_code"] == "```" + "a" * 150_000


# --- 13: replies the JSON parser cannot hold; usage that goes down mid-stream -------------------------

HUGE_NUMBER = (b'{"candidates":[{"content":{"parts":[{"text":"hi"}]}}],'
               b'"usageMetadata":{"promptTokenCount":' + b"9" * 5000 + b',"candidatesTokenCount":1}}')
DEEP = b'{"candidates":' + b"[" * 5000 + b"]" * 5000 + b"}"


@pytest.mark.parametrize("body", [HUGE_NUMBER, DEEP], ids=["5000-digit number", "5000 deep"])
def test_replies_the_parser_cannot_hold_are_bad_answers(make_app, serve, emulator, body):
    server = serve(make_app(ratelimit_enabled=False, cache_enabled=False, retry_max_attempts=1))
    emulator.set_steady_fault("raw", body=body, events=[body])
    assert_error(requests.post(server.url + TEXT, json={"prompt": "big"}, timeout=30), 502, "upstream_bad_answer")
    answer = requests.post(server.url + STREAM, json={"prompt": "big"}, timeout=30)
    if answer.headers["Content-Type"].startswith("application/json"):  # the stream could not start
        assert_error(answer, 502, "upstream_bad_answer")
    else:
        assert '"code": "upstream_bad_answer"' in answer.text or '"code":"upstream_bad_answer"' in answer.text


def test_a_stream_is_billed_from_the_largest_usage_it_reported(make_app, serve, emulator):
    app = make_app(ratelimit_enabled=False, cache_enabled=False)
    server = serve(app)
    emulator.set_steady_fault("raw", events=[
        reply("long answer ", promptTokenCount=1000, candidatesTokenCount=1000),
        reply("then a tiny count", promptTokenCount=1, candidatesTokenCount=1),
    ])
    answer = requests.post(server.url + STREAM, json={"prompt": "shrinking usage"}, timeout=30)
    assert answer.status_code == 200 and "event: done" in answer.text, answer.text
    done = answer.text.split("event: done")[1].split("data: ", 1)[1].split("\n", 1)[0]
    import json

    usage = json.loads(done)["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["source"]) == (1000, 1000, "provider")


# --- error bodies that are not Google's envelope (a proxy's, a load balancer's) -----------------------

ODD_ERROR_BODIES = [  # (status, body, Retry-After header sent, Retry-After the client gets: None = ours)
    (429, {"error": "Too Many Requests"}, "7", "7"),
    (429, {"error": ["rate limited"]}, "7", "7"),
    (429, {"error": {"code": 429, "details": 5}}, None, None),
    (429, {"error": {"code": 429, "details": {"retryDelay": "3s"}}}, "4", "4"),
    (429, {"details": True}, None, None),
    (503, {"error": "quota exceeded"}, "9", "9"),  # a rate limit in words: the same rule as Google's own bodies
]


@pytest.mark.parametrize(("status", "body", "sent", "expected"), ODD_ERROR_BODIES)
def test_a_rate_limit_whose_body_is_not_googles_envelope_is_a_429_never_a_500(make_app, serve, emulator,
                                                                              status, body, sent, expected):
    server = serve(make_app(ratelimit_enabled=False, cache_enabled=False, retry_max_attempts=1))
    emulator.set_steady_fault("raw", status=status, body=body, headers={"Retry-After": sent} if sent else None)
    for path in (TEXT, STREAM):
        answer = requests.post(server.url + path, json={"prompt": f"odd body {path}"}, timeout=30)
        assert_error(answer, 429, "upstream_rate_limited")
        assert answer.headers["Retry-After"] == (expected or answer.headers["Retry-After"])
        assert answer.headers["Retry-After"].isdigit()


# --- replies too big to hold: a compression bomb, an endless body -------------------------------------

def good_reply(text: str = "hello") -> bytes:
    import json

    return json.dumps({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                                       "finishReason": "STOP"}]}).encode()


def test_replies_come_uncompressed_and_a_compressed_one_is_refused_not_inflated(make_app, serve, emulator):
    """2 MB of gzip held 6 GB once inflated (and zstd goes further): the gateway asks for identity
    and refuses a body encoded anyway, without decoding it."""
    import gzip

    server = serve(make_app(ratelimit_enabled=False, cache_enabled=False, retry_max_attempts=1))
    emulator.set_steady_fault("raw", status=200, body=gzip.compress(good_reply()), headers={"Content-Encoding": "gzip"})
    for path in (TEXT, STREAM):
        assert_error(requests.post(server.url + path, json={"prompt": f"zipped {path}"}, timeout=30),
                     502, "upstream_bad_answer")
    assert [record["headers"]["accept-encoding"] for record in emulator.requests] == ["identity", "identity"]


def test_a_reply_larger_than_the_cap_is_a_bad_answer_read_no_further(emulator, monkeypatch):
    from gateway.errors import UpstreamBadAnswer
    from gateway.providers import deadline
    from gateway.providers.base import user_prompt
    from gemini_wrapper import GeminiProvider

    monkeypatch.setattr(deadline, "MAX_REPLY_BYTES", 1 << 20)
    provider = GeminiProvider(api_key="k", base_url=emulator.base_url, pool_shards=1)
    try:
        emulator.set_steady_fault("raw", status=200, body=good_reply("a" * (1 << 20)))  # just over 1 MiB
        with pytest.raises(UpstreamBadAnswer):
            provider.complete(user_prompt("big", model="gemini-2.0-flash"), 30.0)
        emulator.set_steady_fault("raw", status=200, body=good_reply("a" * 1000 * 1000))  # just under
        assert len(provider.complete(user_prompt("big", model="gemini-2.0-flash"), 30.0).text) == 1000 * 1000
    finally:
        provider.close()
