"""RATELIMIT_STORAGE_URI=redis://...: limits shared by every gateway process, through a real Redis.

Skips with a visible reason where no Redis listens on 127.0.0.1:6379; with CI set it fails
instead, so CI always runs it.
"""

from __future__ import annotations

import uuid

import pytest

from tests.support.marks import require_redis


@pytest.fixture
def redis_storage():
    return require_redis("the shared-limit test")


def test_two_gateways_share_one_budget_through_redis(make_app, redis_storage, emulator):
    # Redis outlives the test: a window length of its own ("3 per N minutes") gives each run fresh counters.
    limits = f"3 per {uuid.uuid4().int % 10**6 + 1000} minutes"
    first = make_app(ratelimit_storage_uri=redis_storage, ratelimit_task_limits=limits).test_client()
    second = make_app(ratelimit_storage_uri=redis_storage, ratelimit_task_limits=limits).test_client()
    statuses = [client.post("/api/v1/generate/text", json={"prompt": f"shared {i}"}).status_code
                for i, client in enumerate([first, second, first, second])]
    assert statuses == [200, 200, 200, 429]  # one budget of 3 across both "processes"
    limited = second.post("/api/v1/generate/text", json={"prompt": "again"})
    assert limited.get_json()["code"] == "rate_limited" and int(limited.headers["Retry-After"]) > 0
