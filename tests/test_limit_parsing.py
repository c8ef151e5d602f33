"""The memoised limit parser (gateway/http/limit_parsing.py): same limits, parsed once per string."""

from __future__ import annotations

import limits
import pytest
from flask_limiter import _limits as flask_limiter_limits

from gateway.http import limit_parsing


def test_an_app_makes_flask_limiter_parse_each_string_once(make_app):
    make_app()
    assert flask_limiter_limits.parse_many is limit_parsing.parse_many
    limit_parsing.parse_many.cache_clear()
    first = limit_parsing.parse_many("200 per day;50 per hour;10 per minute")
    again = limit_parsing.parse_many("200 per day;50 per hour;10 per minute")
    assert again is first  # the same immutable items, not a new parse
    assert list(first) == limits.parse_many("200 per day;50 per hour;10 per minute")
    assert limit_parsing.parse_many.cache_info().misses == 1


def test_a_string_that_does_not_parse_still_fails_every_time():
    for _ in range(2):
        with pytest.raises(ValueError):
            limit_parsing.parse_many("ten a minute")
    assert limit_parsing.install()  # idempotent


def test_the_limit_is_still_exact_with_the_memoised_parser(make_app, emulator):
    client = make_app(ratelimit_task_limits="3 per minute").test_client()
    statuses = [client.post("/api/v1/generate/text", json={"prompt": f"p{i}"}).status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert emulator.request_count == 3
