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

    from errors import UpstreamRateLimited
    from retry_policy import RetryPolicy

    policy = RetryPolicy(min_wait=1, max_wait=60, jitter=lambda: 0.0)
    for hint in (math.nan, math.inf, -math.inf, -3.0):
        assert policy.wait_before(2, UpstreamRateLimited("x", retry_after=hint)) == 2.0  # the exponential wait
    app = make_app(ratelimit_enabled=False)
    with app.test_request_context():
        import routes

        _, status, headers = routes.error_payload(UpstreamRateLimited("x", retry_after=math.inf))
    assert status == 429 and "Retry-After" not in headers
