"""`GET /api/v1/models`, and API keys limited to a list of models (`allowed_models`): stored, shown, enforced."""

from __future__ import annotations

import json
import sqlite3
import time

import jwt
import pytest

from gateway.auth.guard import check_model_allowed
from gateway.auth.jwt_tokens import key_of_claims
from gateway.auth.keys import ApiKey, InvalidKeyField, KeyStore, parse_key_settings
from gateway.errors import ModelNotAllowed
from gateway.providers import registry

MODELS = "/api/v1/models"
OPENAI_KEY = "sk-test-secret-value-0123456789"


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def secured(make_app):
    """Authentication on, an OpenAI key set (no Anthropic key), an admin and a user key."""
    app = make_app(auth_enabled=True, ratelimit_enabled=False, openai_api_key=OPENAI_KEY,
                   openai_base_url="http://10.1.2.3:8000/v1")
    keys = app.extensions["gateway"].keys
    _, admin = keys.create(name="ops", scope="admin")
    _, user = keys.create(name="app")
    return app, admin, user


# --- GET /models ---

def test_any_key_lists_the_models_with_prices_and_whether_each_is_configured(secured):
    app, _, user = secured
    response = app.test_client().get(MODELS, headers=bearer(user))
    assert response.status_code == 200
    body = response.get_json()
    assert body["default_model"] == "gemini-2.0-flash"
    rows = {row["id"]: row for row in body["models"]}
    assert list(rows) == app.extensions["gateway"].registry.ids()
    assert rows["gemini-2.0-flash"]["configured"] and rows["gemini-2.0-flash"]["default"]  # the test key is set
    assert rows["gpt-4o-mini"] == {
        "id": "gpt-4o-mini", "provider": "openai", "upstream": "gpt-4o-mini", "aliases": [], "input_per_million": 0.15,
        "output_per_million": 0.6, "context_window": 128000, "max_output_tokens": 16384, "configured": True,
        "missing_key": None, "default": False}
    assert not rows["claude-haiku-4-5"]["configured"]
    assert rows["claude-haiku-4-5"]["missing_key"] == "ANTHROPIC_API_KEY"
    text = response.get_data(as_text=True)
    assert OPENAI_KEY not in text and "10.1.2.3" not in text


def test_listing_the_models_needs_a_key_when_authentication_is_on(secured):
    app, _, _ = secured
    response = app.test_client().get(MODELS)
    assert response.status_code == 401 and response.get_json()["code"] == "unauthorized"


def test_in_demo_mode_every_model_is_configured(make_app):
    app = make_app(google_api_key="", ratelimit_enabled=False)
    rows = app.test_client().get(MODELS).get_json()["models"]
    assert all(row["configured"] and row["missing_key"] is None for row in rows)


def test_the_spec_documents_the_listing_with_a_whole_sentence_summary(make_app):
    spec = make_app(ratelimit_enabled=False).test_client().get("/swagger.json").get_json()
    operation = spec["paths"]["/models"]["get"]
    # RESTX cuts a summary at its first period: the whole sentence must come through
    assert operation["summary"] == ("List the models a request may name, with their provider, prices and whether "
                                    "each can be called")
    assert operation["operationId"] == "get_models"
    assert {"200", "401", "429"} <= set(operation["responses"])
    listed = spec["definitions"]["Model"]["properties"]
    assert listed["input_per_million"]["x-nullable"] and listed["missing_key"]["x-nullable"]


# --- allowed_models: stored and shown ---

def test_an_admin_creates_a_key_limited_to_models_aliases_stored_as_ids(secured):
    app, admin, _ = secured
    client = app.test_client()
    response = client.post("/api/v1/keys", headers=bearer(admin), json={
        "name": "cheap", "allowed_models": ["gpt-4o-mini", "gemini-2.0-flash-001", "gpt-4o-mini"]})
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    assert created["allowed_models"] == ["gpt-4o-mini", "gemini-2.0-flash"]
    listed = {key["id"]: key for key in client.get("/api/v1/keys", headers=bearer(admin)).get_json()["keys"]}
    assert listed[created["id"]]["allowed_models"] == ["gpt-4o-mini", "gemini-2.0-flash"]
    assert all(key["allowed_models"] is None for key_id, key in listed.items() if key_id != created["id"])
    stored = app.extensions["gateway"].keys.lookup(created["key"])
    assert stored.allowed_models == ("gpt-4o-mini", "gemini-2.0-flash")


@pytest.mark.parametrize("models", [["gpt-5-ultra"], [], "", 7, [7], ["with space"], ["a,b"],
                                    [f"m{i}" for i in range(51)]])
def test_a_bad_allowed_models_list_is_a_400_naming_the_field(secured, models):
    app, admin, _ = secured
    response = app.test_client().post("/api/v1/keys", headers=bearer(admin),
                                      json={"name": "x", "allowed_models": models})
    body = response.get_json()
    assert response.status_code == 400, body
    assert body["code"] == "invalid_request" and set(body["details"]["fields"]) == {"allowed_models"}


def test_the_cli_creates_a_key_limited_to_models(secured):
    app, _, _ = secured
    runner = app.test_cli_runner()
    result = runner.invoke(args=["keys", "create", "--name", "cli", "--models", "gpt-4o, claude-haiku-4-5-20251001"])
    assert result.exit_code == 0, result.output
    key_id = result.output.split("id:", 1)[1].split()[0]
    assert app.extensions["gateway"].keys.get(key_id).allowed_models == ("gpt-4o", "claude-haiku-4-5")
    refused = runner.invoke(args=["keys", "create", "--name", "cli", "--models", "gpt-9"])
    assert refused.exit_code == 2 and "--models" in refused.output and "gpt-9" in refused.output


def test_a_key_table_from_before_allowed_models_gains_the_column(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE api_keys (id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
            owner TEXT NOT NULL, scope TEXT NOT NULL, created_at REAL NOT NULL, last_used_at REAL, expires_at REAL,
            revoked_at REAL, rate_limit TEXT, tokens_per_minute INTEGER, monthly_budget_usd REAL, allowed_tasks TEXT);
        INSERT INTO api_keys (id, key_hash, name, owner, scope, created_at, allowed_tasks)
            VALUES ('key_old', 'abc', 'old', '', 'user', 1.0, 'code');
    """)
    old.close()
    first, second = KeyStore(path), KeyStore(path)  # the second finds the column there already
    try:
        (old_key,) = first.list()
        assert old_key.allowed_tasks == ("code",) and old_key.allowed_models is None
        key, secret = first.create(name="new", allowed_models=["gpt-4o"])
        assert second.lookup(secret).allowed_models == ("gpt-4o",)
    finally:
        first.close()
        second.close()


# --- allowed_models: enforced ---

def test_check_model_allowed_refuses_a_model_outside_the_list():
    models = registry.load()
    key = ApiKey(id="key_1", name="k", owner="", scope="user", created_at=0.0, allowed_models=("gpt-4o-mini",))
    check_model_allowed(key, models.get("gpt-4o-mini"))
    with pytest.raises(ModelNotAllowed) as caught:
        check_model_allowed(key, models.get("gpt-4o"))
    error = caught.value
    assert (error.status, error.code) == (403, "model_not_allowed")
    assert error.details == {"key_id": "key_1", "model": "gpt-4o", "allowed_models": ["gpt-4o-mini"]}
    check_model_allowed(None, models.get("gpt-4o"))  # authentication off: anonymous requests may use any model
    check_model_allowed(ApiKey(id="key_2", name="k", owner="", scope="user", created_at=0.0), models.get("gpt-4o"))


def test_a_jwt_may_limit_models_by_id_or_alias():
    models = registry.load()
    now = time.time()
    key = key_of_claims({"sub": "svc", "exp": now + 60, "allowed_models": ["gemini-2.0-flash-001"]}, "issuer", now)
    assert key.allowed_models == ("gemini-2.0-flash-001",)  # not resolved: the verifier has no registry
    check_model_allowed(key, models.get("gemini-2.0-flash"))  # the alias names the same model
    with pytest.raises(ModelNotAllowed):
        check_model_allowed(key, models.get("gpt-4o-mini"))


def test_a_jwt_with_an_unusable_models_claim_is_invalid(make_app):
    secret = "s" * 32
    app = make_app(auth_enabled=True, ratelimit_enabled=False, auth_jwt_secret=secret, auth_jwt_issuer="issuer")
    token = jwt.encode({"iss": "issuer", "sub": "svc", "exp": int(time.time()) + 60,
                        "allowed_models": ["bad id"]}, secret, algorithm="HS256")
    response = app.test_client().get(MODELS, headers=bearer(token))
    assert response.status_code == 401 and response.get_json()["code"] == "unauthorized"


def test_parse_key_settings_checks_model_names_against_the_resolver():
    resolve = registry.load().resolve
    assert parse_key_settings({"name": "k", "allowed_models": "gpt-4o,gpt-4o"}, resolve_model=resolve)[
        "allowed_models"] == ("gpt-4o",)
    with pytest.raises(InvalidKeyField, match="names 'gpt-9', which is not a model of this gateway"):
        parse_key_settings({"name": "k", "allowed_models": ["gpt-9"]}, resolve_model=resolve)
    assert parse_key_settings({"name": "k", "allowed_models": ["gpt-9"]})["allowed_models"] == ("gpt-9",)
    assert json.dumps(ApiKey(id="k", name="k", owner="", scope="user", created_at=0.0,
                             allowed_models=("gpt-4o",)).public()["allowed_models"]) == '["gpt-4o"]'
