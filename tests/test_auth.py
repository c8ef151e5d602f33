"""Client API keys through HTTP: authentication, scopes, allowed tasks, management, usage, per-key limits.

Apps are built with `auth_enabled=True` (tests otherwise run with APP_ENV=testing, where it is
off); the first admin key of a test is made with the app's own key store, as `flask keys create`
does, and everything else goes through the API.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from gateway.auth.keys import KEY_PREFIX, KeyStore, hash_key
from gateway.config import Config, ConfigError
from gateway.storage.ledger_schema import migrate

TEXT = "/api/v1/generate/text"
CODE = "/api/v1/generate/code"
CLASSIFY = "/api/v1/classify/text"


@pytest.fixture
def secured(make_app):
    """An app with authentication on and no rate limits, plus one admin and one user key."""
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    keys = app.extensions["gateway"].keys
    admin, admin_secret = keys.create(name="ops", scope="admin")
    user, user_secret = keys.create(name="app", owner="team-a")
    return app, {"admin": (admin, admin_secret), "user": (user, user_secret)}


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def ask(client, secret: str | None = None, path: str = TEXT, body: dict | None = None, **headers):
    if secret is not None:
        headers.update(bearer(secret))
    body = body or ({"text": "great", "categories": ["good", "bad"]} if path == CLASSIFY else {"prompt": "hello"})
    return client.post(path, json=body, headers=headers)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["code"] == code and body["request_id"] and isinstance(body["details"], dict)
    return body


# --- authentication ---------------------------------------------------------------------------

def test_a_request_without_a_key_or_with_an_unknown_one_is_a_401_with_www_authenticate(secured):
    app, _ = secured
    client = app.test_client()
    for headers in ({}, bearer("mtk_not-a-key"), {"X-API-Key": "nope"}, {"Authorization": "Basic dXNlcjpwYXNz"},
                    bearer("x" * 10_000)):
        response = ask(client, **headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(client.get("/api/v1/stats"), 401, "unauthorized")
    assert_error(client.get("/api/v1/no-such-path"), 401, "unauthorized")  # the API's shape is not probed anonymously
    assert app.extensions["gateway"].tracker.records() == []  # refused before any work: no ledger rows


def test_a_key_is_accepted_in_each_of_the_three_headers(secured):
    app, keys = secured
    _, secret = keys["user"]
    client = app.test_client()
    for headers in (bearer(secret), {"X-API-Key": secret}, {"X-API-Token": secret},
                    {"Authorization": f"bearer  {secret}"}):
        response = ask(client, body={"prompt": f"hello {headers}"}, **headers)
        assert response.status_code == 200, response.get_data(as_text=True)


def test_health_and_swagger_stay_open(secured):
    app, _ = secured
    client = app.test_client()
    assert client.get("/api/v1/health").status_code == 200
    assert client.get("/swagger.json").status_code == 200
    assert client.get("/api/v1/swagger.json").status_code == 200
    assert client.get("/swagger/").status_code == 200
    assert client.get("/swaggerui/swagger-ui.css").status_code == 200
    assert client.options(TEXT).status_code == 200  # CORS preflights carry no key


def test_revoked_and_expired_keys_get_401s_saying_which(secured):
    app, keys = secured
    store = app.extensions["gateway"].keys
    client = app.test_client()
    user, secret = keys["user"]
    assert ask(client, secret).status_code == 200
    store.revoke(user.id)
    body = assert_error(ask(client, secret), 401, "key_revoked")
    assert body["details"] == {"key_id": user.id}
    expired, expired_secret = store.create(name="old", expires_at=time.time() - 1)
    assert_error(ask(client, expired_secret), 401, "key_expired")


def test_a_key_is_refused_from_its_expiry_on(make_app):
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    store = app.extensions["gateway"].keys
    key, secret = store.create(name="soon", expires_at=time.time() + 3600)
    client = app.test_client()
    assert ask(client, secret).status_code == 200
    assert key.expired(time.time() + 3600) and not key.expired(time.time())


# --- scopes and tasks -------------------------------------------------------------------------

def test_a_user_key_on_admin_operations_is_a_403(secured):
    app, keys = secured
    client = app.test_client()
    _, user = keys["user"]
    _, admin = keys["admin"]
    for method, path in (("get", "/api/v1/stats"), ("get", "/api/v1/keys"), ("post", "/api/v1/keys"),
                         ("delete", f"/api/v1/keys/{keys['admin'][0].id}"),
                         ("get", f"/api/v1/keys/{keys['admin'][0].id}/usage")):
        assert_error(getattr(client, method)(path, headers=bearer(user), json={"name": "x"}), 403, "forbidden")
    assert client.get("/api/v1/stats", headers=bearer(admin)).status_code == 200
    assert ask(client, admin).status_code == 200  # an admin key runs tasks too
    assert client.get("/api/v1/keys", headers=bearer(admin)).status_code == 200
    assert all(key.revoked_at is None for key in app.extensions["gateway"].keys.list())  # the 403s changed nothing


def test_a_task_outside_the_keys_allowed_tasks_is_a_403(secured):
    app, _ = secured
    key, secret = app.extensions["gateway"].keys.create(name="coder", allowed_tasks=["code"])
    client = app.test_client()
    assert ask(client, secret, CODE).status_code == 200
    for path in (TEXT, CLASSIFY, "/api/v1/generate/text/stream"):
        body = assert_error(ask(client, secret, path), 403, "task_not_allowed")
        assert body["details"]["allowed_tasks"] == ["code"]


# --- management over HTTP ---------------------------------------------------------------------

def test_admins_create_list_revoke_keys_and_the_key_is_shown_once(secured):
    app, keys = secured
    _, admin = keys["admin"]
    client = app.test_client()
    response = client.post("/api/v1/keys", headers=bearer(admin), json={
        "name": "billing", "owner": "team-b", "rate_limit": "100/minute", "tokens_per_minute": 5000,
        "monthly_budget_usd": 25, "allowed_tasks": ["text", "classify"], "expires_at": "2999-01-01"})
    assert response.status_code == 201, response.get_data(as_text=True)
    created = response.get_json()
    secret = created["key"]
    assert secret.startswith(KEY_PREFIX) and len(secret) >= len(KEY_PREFIX) + 43  # 256 random bits
    assert created["allowed_tasks"] == ["text", "classify"] and created["monthly_budget_usd"] == 25
    assert created["expires_at"] == "2999-01-01T00:00:00Z"
    assert ask(client, secret).status_code == 200

    listed = client.get("/api/v1/keys", headers=bearer(admin))
    assert listed.status_code == 200
    text = listed.get_data(as_text=True)
    assert secret not in text and hash_key(secret) not in text and "key_hash" not in text
    assert [key["name"] for key in listed.get_json()["keys"]] == ["ops", "app", "billing"]

    revoked = client.delete(f"/api/v1/keys/{created['id']}", headers=bearer(admin))
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"]
    assert_error(ask(client, secret), 401, "key_revoked")
    assert_error(client.delete("/api/v1/keys/key_0000000000000000", headers=bearer(admin)), 404, "not_found")


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"), ({"name": "  "}, "name"), ({"name": "x", "scope": "root"}, "scope"),
    ({"name": "x", "rate_limit": "lots"}, "rate_limit"), ({"name": "x", "rate_limit": 5}, "rate_limit"),
    ({"name": "x", "expires_at": "tomorrow"}, "expires_at"), ({"name": "x", "expires_at": "2001-01-01"}, "expires_at"),
    ({"name": "x", "expires_at": "9999-12-31T23:59:59-12:00"}, "expires_at"),  # year 10000 in UTC: not showable
    ({"name": "x", "allowed_tasks": ["text", "poetry"]}, "allowed_tasks"), ({"name": "x", "allowed_tasks": []},
                                                                            "allowed_tasks"),
    ({"name": "x", "tokens_per_minute": 0}, "tokens_per_minute"), ({"name": "x", "tokens_per_minute": 1.5},
                                                                   "tokens_per_minute"),
    ({"name": "x", "monthly_budget_usd": -1}, "monthly_budget_usd"), ({"name": "x", "monthly_budget_usd": "a"},
                                                                      "monthly_budget_usd"),
    ({"name": "x", "colour": "red"}, "colour"),
])
def test_bad_key_settings_are_a_400_naming_the_field(secured, body, field):
    app, keys = secured
    response = app.test_client().post("/api/v1/keys", headers=bearer(keys["admin"][1]), json=body)
    assert assert_error(response, 400, "invalid_request")["details"]["fields"].keys() == {field}


def test_a_body_that_is_not_a_json_object_is_a_400_or_415(secured):
    app, keys = secured
    client = app.test_client()
    for data in ("[]", "nope", ""):
        response = client.post("/api/v1/keys", headers={**bearer(keys["admin"][1]), "Content-Type": "application/json"},
                               data=data)
        assert_error(response, 400, "invalid_request")
    response = client.post("/api/v1/keys", headers=bearer(keys["admin"][1]), data="name=x")
    assert_error(response, 415, "unsupported_media_type")


def test_with_authentication_off_keys_are_not_read_and_http_key_management_is_refused(make_app):
    app = make_app(ratelimit_enabled=False)
    _, secret = app.extensions["gateway"].keys.create(name="ignored")
    client = app.test_client()
    assert ask(client).status_code == 200  # anonymous
    assert ask(client, "mtk_unknown", body={"prompt": "x"}).status_code == 200  # keys are not read
    assert app.extensions["gateway"].tracker.records()[-1].key_id is None
    for method, path in (("post", "/api/v1/keys"), ("get", "/api/v1/keys"), ("delete", "/api/v1/keys/key_1"),
                         ("get", "/api/v1/keys/me/usage")):
        assert_error(getattr(client, method)(path, json={"name": "stranger", "scope": "admin"}, headers=bearer(secret)),
                     403, "forbidden")
    assert [key.name for key in app.extensions["gateway"].keys.list()] == ["ignored"]


# --- usage ------------------------------------------------------------------------------------

def test_each_ledger_row_and_request_line_carries_the_key_id_and_usage_adds_up(secured, tmp_path):
    app, keys = secured
    client = app.test_client()
    user, secret = keys["user"]
    admin, admin_secret = keys["admin"]
    assert ask(client, secret, **{"User-Agent": "probe/1.0 " + "x" * 500}).status_code == 200
    assert ask(client, secret).status_code == 200  # a cache hit: same prompt
    assert ask(client, admin_secret, CODE).status_code == 200
    gateway = app.extensions["gateway"]
    rows = gateway.tracker.records()
    assert [row.key_id for row in rows] == [user.id, user.id, admin.id]

    usage = client.get("/api/v1/keys/me/usage", headers=bearer(secret)).get_json()
    assert usage["key_id"] == user.id and usage["requests"] == 2 and usage["cache_hits"] == 1
    assert usage["input_tokens"] == sum(row.input_tokens for row in rows[:2])
    assert usage["cost_usd"] == pytest.approx(sum(row.total_cost for row in rows[:2]))
    assert usage["saved_usd"] == pytest.approx(rows[1].saved_cost) and usage["saved_usd"] > 0
    assert [day["requests"] for day in usage["by_day"]] == [2]
    by_admin = client.get(f"/api/v1/keys/{user.id}/usage", headers=bearer(admin_secret)).get_json()
    assert by_admin == usage
    other_month = client.get(f"/api/v1/keys/{user.id}/usage?month=2001-02", headers=bearer(admin_secret)).get_json()
    assert other_month["requests"] == 0 and other_month["by_day"] == []
    assert other_month["from"] == "2001-02-01T00:00:00Z" and other_month["until"] == "2001-03-01T00:00:00Z"
    for month in ("2026-13", "26-11", "x"):
        assert_error(client.get(f"/api/v1/keys/me/usage?month={month}", headers=bearer(secret)), 400, "invalid_request")
    assert_error(client.get("/api/v1/keys/key_0000000000000000/usage", headers=bearer(admin_secret)), 404, "not_found")

    gateway.logger.close()  # flushes
    lines = [json.loads(line) for line in (tmp_path / "logs" / "api_requests.log").read_text().splitlines()]
    tasks = [line for line in lines if line["path"] in (TEXT, CODE)]
    assert [line["key_id"] for line in tasks] == [user.id, user.id, admin.id]
    assert tasks[0]["user_agent"].startswith("probe/1.0 ") and len(tasks[0]["user_agent"]) <= 203


def test_a_user_key_reads_only_its_own_usage(secured):
    app, keys = secured
    client = app.test_client()
    _, secret = keys["user"]
    admin, _ = keys["admin"]
    assert_error(client.get(f"/api/v1/keys/{admin.id}/usage", headers=bearer(secret)), 403, "forbidden")
    assert_error(client.get(f"/api/v1/keys/{keys['user'][0].id}/usage", headers=bearer(secret)), 403, "forbidden")
    assert client.get("/api/v1/keys/me/usage", headers=bearer(secret)).status_code == 200
    assert_error(client.get("/api/v1/keys/me/usage"), 401, "unauthorized")


# --- limits -------------------------------------------------------------------------------------

def test_rate_limits_count_per_key_and_a_keys_own_limit_overrides_the_default(make_app):
    app = make_app(auth_enabled=True, ratelimit_task_limits="3 per minute")
    store = app.extensions["gateway"].keys
    _, tight = store.create(name="tight", rate_limit="1/minute")
    _, plain = store.create(name="plain")
    _, other = store.create(name="other")
    client = app.test_client()  # every request from the same address
    assert ask(client, tight, body={"prompt": "a"}).status_code == 200
    assert_error(ask(client, tight, body={"prompt": "b"}), 429, "rate_limited")
    for i in range(3):
        assert ask(client, plain, body={"prompt": f"p{i}"}).status_code == 200
    assert_error(ask(client, plain, body={"prompt": "p3"}), 429, "rate_limited")
    assert ask(client, other, body={"prompt": "o"}).status_code == 200  # its own count, same address


def test_tokens_per_minute_stops_a_key_once_its_window_is_spent(make_app):
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    key, secret = app.extensions["gateway"].keys.create(name="small", tokens_per_minute=1)
    _, free = app.extensions["gateway"].keys.create(name="free")
    client = app.test_client()
    assert ask(client, secret, body={"prompt": "one"}).status_code == 200  # under the limit when it started
    response = ask(client, secret, body={"prompt": "two"})
    body = assert_error(response, 429, "token_limit_exceeded")
    assert body["details"]["tokens_per_minute"] == 1 and body["details"]["used"] > 1
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert ask(client, free, body={"prompt": "two"}).status_code == 200
    assert len(app.extensions["gateway"].tracker.records()) == 2  # the refusal wrote no ledger row


# --- several processes share one store ----------------------------------------------------------

def test_a_revocation_is_seen_at_once_by_another_app_on_the_same_file(make_app):
    first = make_app(auth_enabled=True, ratelimit_enabled=False)
    second = make_app(auth_enabled=True, ratelimit_enabled=False)  # its own KeyStore on the same ledger file
    key, secret = first.extensions["gateway"].keys.create(name="shared")
    one, two = first.test_client(), second.test_client()
    assert ask(two, secret).status_code == 200  # made by the first, known by the second at once
    first.extensions["gateway"].keys.revoke(key.id)
    assert_error(ask(two, secret, body={"prompt": "after"}), 401, "key_revoked")
    assert_error(ask(one, secret, body={"prompt": "after"}), 401, "key_revoked")


def test_the_store_holds_hashes_never_keys(secured, tmp_path):
    app, keys = secured
    raw = (tmp_path / "ledger.sqlite3").read_bytes()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        stored = db.execute("SELECT key_hash FROM api_keys").fetchall()
    for _, secret in keys.values():
        assert secret.encode() not in raw
        wal = tmp_path / "ledger.sqlite3-wal"
        assert not wal.exists() or secret.encode() not in wal.read_bytes()
        assert (hash_key(secret),) in stored


def test_last_used_is_written_at_most_once_a_minute_per_key(tmp_path):
    now = [1000.0]
    store = KeyStore(tmp_path / "keys.sqlite3", clock=lambda: now[0])
    key, secret = store.create(name="k")

    def stored_last_used():
        with sqlite3.connect(tmp_path / "keys.sqlite3") as db:
            return db.execute("SELECT last_used_at FROM api_keys WHERE id = ?", (key.id,)).fetchone()[0]

    store.touch(store.lookup(secret))
    assert stored_last_used() == 1000.0
    now[0] = 1059.0
    store.touch(store.lookup(secret))
    assert stored_last_used() == 1000.0
    now[0] = 1060.0
    store.touch(store.lookup(secret))
    assert stored_last_used() == 1060.0
    now[0] = 1200.0
    blocker = sqlite3.connect(tmp_path / "keys.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    assert store.lookup(secret) == key  # reads go on
    store.touch(key)  # does not wait for the lock: skipped
    blocker.execute("ROLLBACK")
    blocker.close()
    assert stored_last_used() == 1060.0
    store.touch(key)  # and written by the next request
    assert stored_last_used() == 1200.0
    store.close()


def test_old_ledgers_gain_the_key_id_column_and_index(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE cost_records (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, "
                   "timestamp REAL NOT NULL, endpoint TEXT NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL, "
                   "input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, input_cost REAL NOT NULL, "
                   "output_cost REAL NOT NULL, total_cost REAL NOT NULL, cached INTEGER NOT NULL, saved_cost REAL "
                   "NOT NULL, token_source TEXT NOT NULL, latency_ms REAL NOT NULL, status INTEGER NOT NULL)")
        db.execute("INSERT INTO cost_records VALUES "
                   "(1, 'r1', 1.0, '/x', 'c', 'm', 1, 1, 0, 0, 0, 0, 0, 'none', 1, 200)")
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db)
    columns = [row[1] for row in db.execute("PRAGMA table_info(cost_records)")]
    assert columns[-2:] == ["client_request_id", "key_id"]
    assert db.execute("SELECT key_id FROM cost_records").fetchall() == [(None,)]
    plan = " ".join(row[3] for row in db.execute(
        "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM cost_records WHERE key_id = 'k' AND timestamp >= 0 AND timestamp < 9"))
    assert "cost_records_by_key" in plan
    db.close()


# --- settings -------------------------------------------------------------------------------------

def test_authentication_defaults_by_environment_and_production_refuses_it_off():
    assert Config.load({"APP_ENV": "production", "GOOGLE_API_KEY": "AIzaX"}).auth_enabled
    assert not Config.load({"APP_ENV": "development"}).auth_enabled
    assert not Config.load({"APP_ENV": "testing"}).auth_enabled
    assert Config.load({"APP_ENV": "development", "AUTH_ENABLED": "true"}).auth_enabled
    with pytest.raises(ConfigError, match="AUTH_ALLOW_ANONYMOUS"):
        Config.load({"APP_ENV": "production", "GOOGLE_API_KEY": "AIzaX", "AUTH_ENABLED": "false"})
    anonymous = Config.load({"APP_ENV": "production", "GOOGLE_API_KEY": "AIzaX", "AUTH_ENABLED": "false",
                             "AUTH_ALLOW_ANONYMOUS": "true", "HOST": "127.0.0.1"})
    [warning] = anonymous.exposure_warnings()
    assert "AUTH_ENABLED=false" in warning
    with pytest.raises(ConfigError, match="AUTH_ENABLED"):
        Config.load({"AUTH_ENABLED": "maybe"})


def test_the_exposure_warning_is_quiet_when_clients_are_authenticated():
    live = {"GOOGLE_API_KEY": "AIzaX", "HOST": "0.0.0.0"}
    assert Config.load(live).exposure_warnings()  # development, auth off by default
    assert Config.load({**live, "AUTH_ENABLED": "true"}).exposure_warnings() == []
    assert Config.load({**live, "APP_ENV": "production"}).exposure_warnings() == []


def test_the_start_up_log_says_whether_clients_are_authenticated(make_app, caplog):
    with caplog.at_level("INFO", logger="gateway.http"):
        make_app(auth_enabled=True)
        make_app()
    lines = [record.getMessage() for record in caplog.records if "client authentication" in record.getMessage()]
    assert lines[0].startswith("client authentication: on") and lines[1].startswith("client authentication: off")


def test_the_spec_documents_401_and_403_on_the_keys_operations(secured):
    app, _ = secured
    spec = app.test_client().get("/swagger.json").get_json()
    assert {"401", "403"} <= spec["paths"]["/keys"]["post"]["responses"].keys()
    assert "201" in spec["paths"]["/keys"]["post"]["responses"]
    assert {"401", "403"} <= spec["paths"]["/generate/text"]["post"]["responses"].keys()


def test_client_keys_are_redacted_wherever_they_appear_in_log_text():
    from enhanced_logging import REDACTED, Redactor
    from gateway.auth.keys import generate_key

    secret = generate_key()
    redactor = Redactor()
    for text in (f"error near {secret} here", f"X-API-Token: {secret}", f"Authorization: Bearer {secret}"):
        assert secret not in redactor.redact_text(text) and REDACTED in redactor.redact_text(text)
    headers = redactor.redact({"X-API-Token": secret, "X-API-Key": secret, "Authorization": f"Bearer {secret}"})
    assert set(headers.values()) == {REDACTED}


def test_a_key_write_waiting_on_a_locked_database_never_holds_up_authentication(make_app, serve):
    """Found by attack: a key create waiting for the write lock held the lock every lookup takes, so
    every request of that worker waited up to 30 s, and the create ended in a 500."""
    import threading

    import requests

    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    gateway = app.extensions["gateway"]
    _, admin = gateway.keys.create(name="ops", scope="admin")
    _, user = gateway.keys.create(name="caller")
    server = serve(app)
    holder = sqlite3.connect(gateway.config.cost_ledger_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    created = {}
    try:
        def create():
            created["response"] = requests.post(f"{server.url}/api/v1/keys", json={"name": "late"},
                                                headers={"Authorization": f"Bearer {admin}"}, timeout=30)

        writer = threading.Thread(target=create)
        writer.start()
        answered = requests.get(f"{server.url}/api/v1/keys/me/usage", headers={"Authorization": f"Bearer {user}"},
                                timeout=30)
        assert answered.status_code == 200 and writer.is_alive()  # answered while the create still waits
        writer.join(timeout=30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    refused = created["response"]
    assert refused.status_code == 503 and refused.json()["code"] == "store_busy"
    assert int(refused.headers["Retry-After"]) >= 1
    assert [key.name for key in gateway.keys.list()] == ["ops", "caller"]  # nothing half-made


def test_a_keys_own_limit_counts_over_every_task_endpoint_together(make_app):
    """Found by attack: a key with `5/minute` got 5 on each task endpoint (20 a minute per worker)."""
    app = make_app(auth_enabled=True, ratelimit_task_limits="100 per minute")
    _, tight = app.extensions["gateway"].keys.create(name="tight", rate_limit="2/minute")
    _, plain = app.extensions["gateway"].keys.create(name="plain")
    client = app.test_client()
    assert ask(client, tight, body={"prompt": "a"}).status_code == 200
    assert ask(client, tight, path=CODE, body={"prompt": "b"}).status_code == 200
    assert_error(ask(client, tight, path=CLASSIFY, body={"text": "c", "categories": ["x", "y"]}), 429, "rate_limited")
    assert_error(ask(client, tight, body={"prompt": "d"}), 429, "rate_limited")
    for path, body in ((TEXT, {"prompt": "e"}), (CODE, {"prompt": "f"})):  # keys without their own: per endpoint
        assert ask(client, plain, path=path, body=body).status_code == 200


def test_the_default_limit_counts_per_endpoint_and_a_keys_own_limit_over_all_with_headers_for_each(make_app):
    """One limit serves both cases (checked once per request): the default's bucket is the endpoint's,
    a key's own is shared by every task endpoint, and the X-RateLimit headers report the bucket that counted."""
    app = make_app(auth_enabled=True, ratelimit_task_limits="3 per minute")
    _, own = app.extensions["gateway"].keys.create(name="own", rate_limit="5/minute")
    _, plain = app.extensions["gateway"].keys.create(name="plain")
    client = app.test_client()
    remaining = [ask(client, plain, path=path, body=body).headers["X-RateLimit-Remaining"]
                 for path, body in ((TEXT, {"prompt": "a"}), (TEXT, {"prompt": "b"}), (CODE, {"prompt": "c"}))]
    assert remaining == ["2", "1", "2"]  # each endpoint its own bucket of 3
    first = ask(client, plain, body={"prompt": "d"})
    assert first.headers["X-RateLimit-Limit"] == "3" and first.headers["X-RateLimit-Remaining"] == "0"
    assert_error(ask(client, plain, body={"prompt": "e"}), 429, "rate_limited")
    answers = [ask(client, own, path=path, body=body) for path, body in (
        (TEXT, {"prompt": "f"}), (CODE, {"prompt": "g"}), (CLASSIFY, {"text": "h", "categories": ["x", "y"]}),
        (TEXT, {"prompt": "i"}), (CODE, {"prompt": "j"}))]
    assert [a.status_code for a in answers] == [200] * 5  # more than the default's 3 on one endpoint
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["4", "3", "2", "1", "0"]
    assert {a.headers["X-RateLimit-Limit"] for a in answers} == {"5"}
    assert_error(ask(client, own, path=CLASSIFY, body={"text": "k", "categories": ["x", "y"]}), 429, "rate_limited")
