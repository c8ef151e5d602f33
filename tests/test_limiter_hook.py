"""Flask-Limiter's before-request pass dropped when it has nothing to check (gateway/http/limiter_hook.py)."""

from __future__ import annotations

from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from gateway.http import limiter_hook

TEXT = "/api/v1/generate/text"


def test_the_gateway_checks_its_limits_once_per_request_and_they_still_hold(make_app):
    app = make_app(ratelimit_task_limits="2 per minute")
    limiter = app.extensions["rate_limiter"]
    assert limiter._check_request_limit not in app.before_request_funcs.get(None, [])
    calls = []
    original = limiter._check_request_limit

    def counted(*args, **kwargs):
        calls.append(kwargs.get("in_middleware", True))
        return original(*args, **kwargs)

    limiter._check_request_limit = counted  # the decorator looks it up on the limiter at each request
    client = app.test_client()
    answers = [client.post(TEXT, json={"prompt": f"p{n}"}) for n in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert [a.headers["X-RateLimit-Remaining"] for a in answers[:2]] == ["1", "0"]
    assert calls == [False, False, False]  # one check per request, the route's own
    assert client.get("/api/v1/health").status_code == 200  # no limit there, as before


def test_an_app_with_a_default_limit_keeps_the_hook_and_the_limit():
    app = Flask(__name__)
    limiter = Limiter(get_remote_address, app=app, default_limits=["1 per minute"], storage_uri="memory://")
    app.add_url_rule("/plain", "plain", lambda: "ok")
    assert limiter_hook.drop_idle_check(app, limiter) is False
    client = app.test_client()
    assert [client.get("/plain").status_code for _ in range(2)] == [200, 429]


def test_an_app_with_only_decorated_limits_loses_the_hook_and_keeps_the_limit():
    app = Flask(__name__)
    limiter = Limiter(get_remote_address, app=app, storage_uri="memory://")
    app.add_url_rule("/limited", "limited", limiter.limit("1 per minute")(lambda: "ok"))
    app.add_url_rule("/free", "free", lambda: "ok")
    assert limiter_hook.drop_idle_check(app, limiter) is True
    assert limiter_hook.drop_idle_check(app, limiter) is False  # already gone
    client = app.test_client()
    assert [client.get("/limited").status_code for _ in range(2)] == [200, 429]
    assert [client.get("/free").status_code for _ in range(3)] == [200, 200, 200]
