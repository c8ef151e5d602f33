"""Optional JWT bearer tokens (`AUTH_JWT_*`): a token signed by a configured issuer stands for a key.

With AUTH_JWT_SECRET (HS256) or AUTH_JWT_PUBLIC_KEY_FILE (RS256, a PEM public key) and
AUTH_JWT_ISSUER set, `Authorization: Bearer <jwt>` is accepted beside the gateway's own `mtk_`
keys. Only the configured algorithm is accepted (no `none`, no HS256 signed with an RS256 public
key); `exp` and `iss` are required and checked (`aud` too with AUTH_JWT_AUDIENCE), `nbf`/`iat`
honoured, with AUTH_JWT_LEEWAY_SECONDS of clock skew.

Claims map to an `ApiKey` (nothing is stored):

    sub                 -> id "jwt:<sub>" (the ledger's key_id, logs, usage) and name
    scope               -> "user" (default) or "admin"
    rate_limit          -> a Flask-Limiter string ("100/minute")
    tokens_per_minute   -> a whole number
    monthly_budget_usd  -> a number (enforced like a key's, over the ledger rows of "jwt:<sub>")
    allowed_tasks       -> a list of text, code, classify
    allowed_models      -> a list of model ids or aliases of the registry (GET /api/v1/models)
    exp                 -> the expiry

A claim that is not usable makes the token invalid (401), never a default. A JWT cannot be
revoked before its `exp`: keep lifetimes short. Verifying costs a signature check per request
(measured: HS256 19 us, RS256 with RSA-2048 45 us); nothing reads the database.
"""

from __future__ import annotations

import time
from pathlib import Path

from gateway.auth.keys import SCOPES, ApiKey, InvalidKeyField, parse_key_settings

JWT_KEY_PREFIX = "jwt:"
MAX_SUBJECT_CHARS = 100
MIN_SECRET_BYTES = 32  # RFC 7518: an HS256 key of at least the hash's size


class InvalidToken(ValueError):
    """The token is not one of the issuer's, or its claims are unusable; `expired` says if it only expired."""

    def __init__(self, reason: str, *, expired: bool = False):
        super().__init__(reason)
        self.expired = expired


class JwtVerifier:
    """Checks tokens of one issuer with one key and algorithm."""

    def __init__(self, *, key, algorithm: str, issuer: str, audience: str | None = None, leeway: float = 30.0):
        import jwt  # imported only when JWTs are configured

        self._jwt = jwt
        self._key, self._algorithm, self._issuer = key, algorithm, issuer
        self._audience, self._leeway = audience, leeway

    @classmethod
    def from_config(cls, config) -> JwtVerifier | None:
        """The verifier the settings ask for, or None when JWTs are off (config.validate checked them)."""
        if not (config.auth_jwt_secret or config.auth_jwt_public_key_file):
            return None
        if config.auth_jwt_secret:
            key, algorithm = config.auth_jwt_secret.encode("utf-8"), "HS256"
        else:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            # parsed once: PyJWT would parse a PEM string on every verification
            key, algorithm = load_pem_public_key(Path(config.auth_jwt_public_key_file).read_bytes()), "RS256"
        return cls(key=key, algorithm=algorithm, issuer=config.auth_jwt_issuer,
                   audience=config.auth_jwt_audience or None, leeway=config.auth_jwt_leeway_seconds)

    def verify(self, token: str, now: float | None = None) -> ApiKey:
        """The key a token stands for; InvalidToken if it is not valid."""
        jwt = self._jwt
        options = {"require": ["exp", "iss", "sub"], "verify_aud": self._audience is not None}
        try:
            claims = jwt.decode(token, self._key, algorithms=[self._algorithm], issuer=self._issuer,
                                audience=self._audience, leeway=self._leeway, options=options)
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the token has expired", expired=True) from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(type(exc).__name__) from None
        except (RecursionError, ValueError, OverflowError, TypeError):  # PyJWT parses JSON before the signature
            raise InvalidToken("the token cannot be read") from None
        try:
            return key_of_claims(claims, self._issuer, time.time() if now is None else now)
        except (ValueError, OverflowError, TypeError):  # e.g. an exp of 10**400 from the issuer itself
            raise InvalidToken("a claim is out of range") from None


def looks_like_jwt(presented: str) -> bool:
    """Three base64url parts with a JSON header: cheap, before any signature check."""
    return presented.startswith("eyJ") and presented.count(".") == 2


def key_of_claims(claims: dict, issuer: str, now: float) -> ApiKey:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject.strip() or len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidToken("sub must be a non-empty string of at most 100 characters")
    scope = claims.get("scope", "user")
    if scope not in SCOPES:
        raise InvalidToken(f"scope must be one of {', '.join(SCOPES)}")
    raw = {name: claims[name] for name in ("rate_limit", "tokens_per_minute", "monthly_budget_usd", "allowed_tasks",
                                           "allowed_models") if name in claims}
    try:
        settings = parse_key_settings({"name": subject, "scope": scope, **raw}, now=now)
    except InvalidKeyField as exc:
        raise InvalidToken(f"claim {exc.field} {exc.reason}") from None
    issued = claims.get("iat")
    return ApiKey(
        id=JWT_KEY_PREFIX + subject, name=settings["name"], owner=issuer, scope=settings["scope"],
        created_at=float(issued) if isinstance(issued, int | float) else now, expires_at=float(claims["exp"]),
        rate_limit=settings.get("rate_limit"), tokens_per_minute=settings.get("tokens_per_minute"),
        monthly_budget_usd=settings.get("monthly_budget_usd"), allowed_tasks=settings.get("allowed_tasks"),
        allowed_models=settings.get("allowed_models"),
    )
