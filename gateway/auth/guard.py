"""Who may do what: the key a request carries, and whether its key may do what it asks.

Pure logic on plain values (a header mapping, a path, a time): `app.py` calls it from its
before-request hook and puts the key on the request state (`g.api_key`).

- A key comes as `Authorization: Bearer <key>`, `X-API-Key: <key>` or `X-API-Token: <key>`
  (the first one present, in that order).
- Open without a key: `/api/v1/health`, the Swagger page, its spec and its static files, and
  CORS preflights (OPTIONS). Every other path needs a valid key (an unknown path too: 401, so
  the API's shape is not probed anonymously).
- Admin operations (`ADMIN_PREFIXES`: key management, the full `/stats`, usage exports) need an
  admin key; `/api/v1/keys/me/usage` is any key's own usage.
- A task endpoint checks the key's `allowed_tasks`; once the request's model is resolved, the
  task layer checks the key's `allowed_models` (`check_model_allowed`).
- Optionally (AUTH_JWT_*, `gateway/auth/jwt_tokens.py`) a Bearer JWT of the configured issuer stands for a key.
- With authentication off (AUTH_ENABLED=false) keys are not read and requests are anonymous,
  but `/api/v1/keys` is refused (403): keys are then managed with the CLI only.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.auth.jwt_tokens import InvalidToken, JwtVerifier, looks_like_jwt
from gateway.auth.keys import ApiKey, KeyStore
from gateway.errors import Forbidden, KeyExpired, KeyRevoked, ModelNotAllowed, TaskNotAllowed, Unauthorized
from gateway.providers.registry import ModelSpec

KEY_HEADERS = ("X-API-Key", "X-API-Token")
MAX_KEY_CHARS = 256  # longer is no key of ours: not even hashed
MAX_TOKEN_CHARS = 8192  # a JWT longer than this is not even decoded
OPEN_PATHS = frozenset({"/api/v1/health", "/api/v1/ready", "/swagger.json", "/api/v1/swagger.json", "/swagger"})
OPEN_PREFIXES = ("/swagger/", "/swaggerui/")
KEYS_PREFIX = "/api/v1/keys"
OWN_USAGE_PATH = "/api/v1/keys/me/usage"
ADMIN_PREFIXES = (KEYS_PREFIX, "/api/v1/stats", "/api/v1/usage")
TASK_OF_PATH = {
    "/api/v1/generate/text": "text", "/api/v1/generate/text/stream": "text",
    "/api/v1/generate/code": "code", "/api/v1/classify/text": "classify",
    "/v1/chat/completions": "text",  # the OpenAI-compatible surface (gateway/http/openai_routes.py)
    "/api/v1/process": "process",
}


def needs_key(method: str, path: str) -> bool:
    """False for what stays open: health, Swagger, CORS preflights."""
    return method != "OPTIONS" and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries, or None."""
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for name in KEY_HEADERS:
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


def authenticate(store: KeyStore, headers: Mapping[str, str], now: float, jwt: JwtVerifier | None = None) -> ApiKey:
    """The valid key of a request; Unauthorized, KeyRevoked or KeyExpired otherwise. With `jwt` (AUTH_JWT_*),
    a JWT signed by the configured issuer is accepted too (gateway/auth/jwt_tokens.py)."""
    presented = presented_key(headers)
    if presented is None:
        raise Unauthorized("An API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                           details={"accepted_headers": ["Authorization: Bearer", *KEY_HEADERS]})
    if jwt is not None and len(presented) <= MAX_TOKEN_CHARS and looks_like_jwt(presented):
        try:
            return jwt.verify(presented, now)
        except InvalidToken as exc:
            if exc.expired:
                raise KeyExpired("The bearer token has expired") from None
            raise Unauthorized("The bearer token is not valid") from None
    key = store.lookup(presented) if len(presented) <= MAX_KEY_CHARS else None
    if key is None:
        raise Unauthorized("The API key is not valid")
    if key.revoked_at is not None:
        raise KeyRevoked("The API key has been revoked", details={"key_id": key.id})
    if key.expired(now):
        raise KeyExpired("The API key has expired", details={"key_id": key.id})
    return key


def refuse_anonymous_management(path: str) -> None:
    """With authentication off, key management over HTTP is refused (403): a stranger could otherwise make
    an admin key while the gateway is open and keep it once keys are required. The CLI still works."""
    if path.startswith(KEYS_PREFIX):
        raise Forbidden("API keys are managed over HTTP only with AUTH_ENABLED on; use `flask --app app keys`",
                        details={"auth_enabled": False})


def authorize(key: ApiKey, path: str) -> None:
    """Forbidden if a user key asks for an admin operation; TaskNotAllowed if the task is not the key's."""
    if path == OWN_USAGE_PATH:
        return
    if path.startswith(ADMIN_PREFIXES) and not key.is_admin:
        raise Forbidden("This operation needs an admin key", details={"key_id": key.id, "scope": key.scope})
    task = TASK_OF_PATH.get(path)
    if task is not None:
        check_task_allowed(key, task)


def check_task_allowed(key: ApiKey | None, task: str) -> None:
    """TaskNotAllowed (403) unless the key's `allowed_tasks` include the task (no key: every task)."""
    if key is not None and not key.allows(task):
        raise TaskNotAllowed(f"This API key may not run the '{task}' task",
                             details={"key_id": key.id, "task": task, "allowed_tasks": list(key.allowed_tasks or ())})


def model_allowed(key: ApiKey | None, model: ModelSpec) -> bool:
    """Whether the key's `allowed_models` include the model, named by its id or an alias (a JWT's claim is not
    resolved against the registry). No key (authentication off, anonymous) may use every model."""
    return key is None or key.allowed_models is None or any(
        key.allows_model(name) for name in (model.id, *model.aliases))


def check_model_allowed(key: ApiKey | None, model: ModelSpec) -> None:
    """ModelNotAllowed (403) unless `model_allowed`."""
    if model_allowed(key, model):
        return
    raise ModelNotAllowed(f"This API key may not use the model '{model.id}'",
                          details={"key_id": key.id, "model": model.id, "allowed_models": list(key.allowed_models)})
