"""Optional JWT bearer tokens through HTTP (jwt_auth.py, AUTH_JWT_*): HS256 and RS256, claims mapped to
the key id, scope and limits, every way a token can be wrong refused with 401."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import Config, ConfigError

SECRET = "s" * 40
ISSUER = "https://issuer.example"
TEXT = "/api/v1/generate/text"
CODE = "/api/v1/generate/code"


def token(claims: dict | None = None, key=SECRET, algorithm="HS256", **extra) -> str:
    now = time.time()
    payload = {"iss": ISSUER, "sub": "svc-a", "exp": int(now) + 600, "iat": int(now), **(claims or {}), **extra}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=algorithm)


def bearer(value: str) -> dict:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def hs_app(make_app):
    return make_app(auth_enabled=True, ratelimit_enabled=False, auth_jwt_secret=SECRET, auth_jwt_issuer=ISSUER)


@pytest.fixture
def rsa_keys(tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "issuer.pem"
    path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, path


def test_a_valid_hs256_token_is_a_key_whose_id_is_in_the_ledger_and_its_usage(hs_app):
    client = hs_app.test_client()
    response = client.post(TEXT, json={"prompt": "hello"}, headers=bearer(token()))
    assert response.status_code == 200, response.get_data(as_text=True)
    [record] = hs_app.extensions["gateway"].tracker.records()
    assert record.key_id == "jwt:svc-a"
    usage = client.get("/api/v1/keys/me/usage", headers=bearer(token())).get_json()
    assert usage["key_id"] == "jwt:svc-a" and usage["requests"] == 1


def test_an_rs256_token_of_the_configured_public_key_is_accepted(make_app, rsa_keys):
    private, path = rsa_keys
    app = make_app(auth_enabled=True, ratelimit_enabled=False, auth_jwt_public_key_file=str(path),
                   auth_jwt_issuer=ISSUER)
    client = app.test_client()
    assert client.post(TEXT, json={"prompt": "rs"}, headers=bearer(token(key=private, algorithm="RS256"))
                       ).status_code == 200
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert client.post(TEXT, json={"prompt": "rs"}, headers=bearer(token(key=other, algorithm="RS256"))
                       ).status_code == 401
    # the classic confusion: an HS256 token whose HMAC key is the (public) RSA key
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"iss": ISSUER, "sub": "evil", "scope": "admin", "exp": int(time.time()) + 600}).encode())
    signature = _b64(hmac.new(path.read_bytes(), f"{header}.{body}".encode(), hashlib.sha256).digest())
    forged = f"{header}.{body}.{signature}"
    assert client.get("/api/v1/stats", headers=bearer(forged)).status_code == 401


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed_raw(payload: bytes) -> str:
    """A correctly signed HS256 token around any payload bytes (the issuer's own, however odd)."""
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(payload)
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


@pytest.mark.parametrize(("name", "bad"), [
    ("wrong secret", lambda: token(key="x" * 40)),
    ("wrong issuer", lambda: token(iss="https://other.example")),
    ("no exp", lambda: token(exp=None)),
    ("no sub", lambda: token(sub=None)),
    ("not yet valid", lambda: token(nbf=int(time.time()) + 3600)),
    ("alg none", lambda: jwt.encode({"iss": ISSUER, "sub": "a", "exp": int(time.time()) + 60}, None, algorithm="none")),
    ("bad scope claim", lambda: token(scope="root")),
    ("bad limit claim", lambda: token(rate_limit="lots")),
    ("bad task claim", lambda: token(allowed_tasks=["poetry"])),
    ("tampered", lambda: token()[:-2] + "AA"),
    ("deeply nested header, unsigned", lambda: _b64(b'{"alg":"HS256","x":' + b"[" * 2500 + b"]" * 2500 + b"}")
     + "." + _b64(b'{"sub":"a"}') + "." + _b64(b"junk")),
    ("exp beyond any float, signed", lambda: token(exp=10**400)),
    ("deeply nested payload, signed", lambda: _signed_raw(b'{"iss":"' + ISSUER.encode() + b'","sub":"a","x":'
                                                          + b"[" * 2500 + b"]" * 2500 + b"}")),
])
def test_tokens_that_are_not_the_issuers_or_carry_bad_claims_are_401(hs_app, name, bad):
    response = hs_app.test_client().post(TEXT, json={"prompt": "x"}, headers=bearer(bad()))
    assert response.status_code == 401, name
    assert response.get_json()["code"] == "unauthorized"
    assert hs_app.extensions["gateway"].tracker.records() == []


def test_an_expired_token_is_a_401_key_expired(hs_app):
    old = token(exp=int(time.time()) - 120, iat=int(time.time()) - 720)
    response = hs_app.test_client().post(TEXT, json={"prompt": "x"}, headers=bearer(old))
    assert response.status_code == 401 and response.get_json()["code"] == "key_expired"


def test_claims_map_to_scope_tasks_limits_and_budget(hs_app):
    client = hs_app.test_client()
    user = token()
    assert client.get("/api/v1/stats", headers=bearer(user)).status_code == 403
    assert client.get("/api/v1/stats", headers=bearer(token(scope="admin", sub="ops"))).status_code == 200
    code_only = token(sub="coder", allowed_tasks=["code"])
    assert client.post(TEXT, json={"prompt": "x"}, headers=bearer(code_only)).get_json()["code"] == "task_not_allowed"
    assert client.post(CODE, json={"prompt": "x"}, headers=bearer(code_only)).status_code == 200
    capped = token(sub="capped", monthly_budget_usd=0)
    refused = client.post(TEXT, json={"prompt": "x"}, headers=bearer(capped))
    assert refused.status_code == 402 and refused.get_json()["details"]["key_id"] == "jwt:capped"
    tight = token(sub="tight", tokens_per_minute=1)
    assert client.post(TEXT, json={"prompt": "one"}, headers=bearer(tight)).status_code == 200
    assert client.post(TEXT, json={"prompt": "two"}, headers=bearer(tight)).status_code == 429


def test_the_audience_is_checked_when_configured(make_app):
    app = make_app(auth_enabled=True, ratelimit_enabled=False, auth_jwt_secret=SECRET, auth_jwt_issuer=ISSUER,
                   auth_jwt_audience="gateway")
    client = app.test_client()
    assert client.post(TEXT, json={"prompt": "a"}, headers=bearer(token(aud="gateway"))).status_code == 200
    assert client.post(TEXT, json={"prompt": "a"}, headers=bearer(token(aud="other"))).status_code == 401
    assert client.post(TEXT, json={"prompt": "a"}, headers=bearer(token())).status_code == 401


def test_without_jwt_settings_a_token_is_just_an_unknown_key(make_app):
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    assert app.test_client().post(TEXT, json={"prompt": "x"}, headers=bearer(token())).status_code == 401


def test_jwt_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="AUTH_JWT_ISSUER"):
        Config.load({"AUTH_JWT_SECRET": SECRET})
    with pytest.raises(ConfigError, match="32 bytes"):
        Config.load({"AUTH_JWT_SECRET": "short", "AUTH_JWT_ISSUER": ISSUER})
    with pytest.raises(ConfigError, match="not both"):
        Config.load({"AUTH_JWT_SECRET": SECRET, "AUTH_JWT_PUBLIC_KEY_FILE": "x.pem", "AUTH_JWT_ISSUER": ISSUER})
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="PEM public key"):
        Config.load({"AUTH_JWT_PUBLIC_KEY_FILE": str(tmp_path / "bad.pem"), "AUTH_JWT_ISSUER": ISSUER})
    with pytest.raises(ConfigError, match="PEM public key"):
        Config.load({"AUTH_JWT_PUBLIC_KEY_FILE": str(tmp_path / "missing.pem"), "AUTH_JWT_ISSUER": ISSUER})
    assert "s" * 40 not in repr(Config.load({"AUTH_JWT_SECRET": SECRET, "AUTH_JWT_ISSUER": ISSUER}))
