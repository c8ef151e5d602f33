"""Settings for the gateway, read once from the environment (and `.env`).

Every setting is an environment variable grouped by prefix (GEMINI_*, RETRY_*, RATELIMIT_*,
CACHE_*, COST_*, CORS_*, LOG_*, REQUEST_*, SECURITY_*, AUTH_*); `.env.example` lists each one with
its default. The values are parsed and checked here, at start-up, so a typo fails loudly once instead of surfacing as a
500 on some later request. `Config` is immutable: tests build their own with `Config.load(...)`
overrides instead of mutating globals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENVIRONMENTS = ("development", "testing", "production")
SECURITY_MODES = ("log", "block", "off")
RATELIMIT_STRATEGIES = ("fixed-window", "moving-window", "sliding-window-counter")  # Flask-Limiter 4.1's names
GOOGLE_KEY_PREFIX = "AIza"
RETIRED_SETTINGS = {  # set one of these and the gateway refuses to start instead of silently ignoring it
    "COST_PRICE_FILE": "prices now live in the model registry; set MODELS_FILE to your copy of data/models.json",
}
ALL_INTERFACES = ("0.0.0.0", "::", "[::]", "*", "")  # wildcard bind addresses: reachable from other machines


class ConfigError(ValueError):
    """A setting is missing, malformed or unsafe for the chosen environment."""


def _as_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _as_number(name: str, raw: str, kind: type, minimum: float, maximum: float = math.inf) -> float | int:
    """A finite number in [minimum, maximum]: nan would fail every comparison later (a NaN deadline
    times every call out, a NaN price makes ledger rows NULL) and inf never ends or never resets."""
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {'a whole number' if kind is int else 'a number'}, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {raw!r}")
    return value


# A literal origin as browsers send it: http(s), a host name or IPv4 of letters, digits, dots and
# hyphens, or a bracketed IPv6 address, and an optional port. Nothing that could read as a pattern:
# flask-cors compiles values that look like regexes and matches them unanchored.
_LITERAL_ORIGIN = re.compile(r"https?://(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?")


def is_literal_origin(origin: str) -> bool:
    """True for `scheme://host[:port]` with a port in 1..65535, exactly; see _LITERAL_ORIGIN."""
    match = _LITERAL_ORIGIN.fullmatch(origin)
    return match is not None and (match["port"] is None or 1 <= int(match["port"]) <= 65535)


def _as_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _env(name: str, default: str = "", metadata: dict | None = None, **extra) -> dataclasses.Field:
    """Declare a setting: the env variable it comes from and how to parse it."""
    return field(default=None, metadata={"env": name, "default": default, **(metadata or {}), **extra})


@dataclass(frozen=True)
class Config:
    """All settings of one gateway instance. Build with `Config.load()`."""

    app_env: str = _env("APP_ENV", "development")
    host: str = _env("HOST", "0.0.0.0")
    port: int = _env("PORT", "8081", kind=int, minimum=0, maximum=65535)

    google_api_key: str = _env("GOOGLE_API_KEY", "", secret=True)
    gemini_model: str = _env("GEMINI_MODEL", "gemini-2.0-flash")
    gemini_base_url: str = _env("GEMINI_BASE_URL", "")
    gemini_deadline_seconds: float = _env("GEMINI_DEADLINE_SECONDS", "30", kind=float, minimum=0.01)
    gemini_max_output_tokens: int = _env("GEMINI_MAX_OUTPUT_TOKENS", "0", kind=int, minimum=0)
    gemini_max_connections: int = _env("GEMINI_MAX_CONNECTIONS", "256", kind=int, minimum=1)
    gemini_pool_shards: int = _env("GEMINI_POOL_SHARDS", "8", kind=int, minimum=1)

    # The model registry (gateway/providers/registry.py) and the other providers' keys and endpoints.
    models_file: str = _env("MODELS_FILE", "")  # empty: the bundled data/models.json
    process_templates_file: str = _env("PROCESS_TEMPLATES_FILE", "")  # empty: the bundled data/process_templates.json
    default_model: str = _env("DEFAULT_MODEL", "")  # empty: GEMINI_MODEL
    openai_api_key: str = _env("OPENAI_API_KEY", "", secret=True)
    openai_base_url: str = _env("OPENAI_BASE_URL", "")
    anthropic_api_key: str = _env("ANTHROPIC_API_KEY", "", secret=True)
    anthropic_base_url: str = _env("ANTHROPIC_BASE_URL", "")

    # Fallbacks (gateway/providers/fallback.py): per task, the models tried in order when the asked one
    # keeps failing (comma-separated public ids; a request's own `fallbacks` replaces them).
    fallbacks_text: tuple = _env("FALLBACKS_TEXT", "", kind=tuple)
    fallbacks_code: tuple = _env("FALLBACKS_CODE", "", kind=tuple)
    fallbacks_classify: tuple = _env("FALLBACKS_CLASSIFY", "", kind=tuple)
    # Circuit breaker per model: open after this many failed calls in a row, probe again after the cool-down.
    circuit_failure_threshold: int = _env("CIRCUIT_FAILURE_THRESHOLD", "5", kind=int, minimum=1)
    circuit_cool_down_seconds: float = _env("CIRCUIT_COOL_DOWN_SECONDS", "30", kind=float, minimum=0.1)
    # Outbound ceilings per provider (0 = none), to stay under the provider's quota instead of meeting its 429s.
    gemini_requests_per_minute: int = _env("GEMINI_REQUESTS_PER_MINUTE", "0", kind=int, minimum=0)
    gemini_tokens_per_minute: int = _env("GEMINI_TOKENS_PER_MINUTE", "0", kind=int, minimum=0)
    openai_requests_per_minute: int = _env("OPENAI_REQUESTS_PER_MINUTE", "0", kind=int, minimum=0)
    openai_tokens_per_minute: int = _env("OPENAI_TOKENS_PER_MINUTE", "0", kind=int, minimum=0)
    anthropic_requests_per_minute: int = _env("ANTHROPIC_REQUESTS_PER_MINUTE", "0", kind=int, minimum=0)
    anthropic_tokens_per_minute: int = _env("ANTHROPIC_TOKENS_PER_MINUTE", "0", kind=int, minimum=0)

    retry_max_attempts: int = _env("RETRY_MAX_ATTEMPTS", "5", kind=int, minimum=1)
    retry_min_wait_seconds: float = _env("RETRY_MIN_WAIT_SECONDS", "1", kind=float, minimum=0)
    retry_max_wait_seconds: float = _env("RETRY_MAX_WAIT_SECONDS", "60", kind=float, minimum=0)

    ratelimit_enabled: bool = _env("RATELIMIT_ENABLED", "true", kind=bool)
    ratelimit_task_limits: str = _env("RATELIMIT_TASK_LIMITS", "200 per day;50 per hour;10 per minute")
    ratelimit_stats_limits: str = _env("RATELIMIT_STATS_LIMITS", "30 per minute")
    ratelimit_storage_uri: str = _env("RATELIMIT_STORAGE_URI", "memory://")
    ratelimit_strategy: str = _env("RATELIMIT_STRATEGY", "moving-window")
    ratelimit_trusted_proxies: int = _env("RATELIMIT_TRUSTED_PROXIES", "0", kind=int, minimum=0)

    cors_origins: tuple[str, ...] = _env("CORS_ORIGINS", "", kind=tuple)

    request_max_bytes: int = _env("REQUEST_MAX_BYTES", "1048576", kind=int, minimum=1024)
    request_max_prompt_chars: int = _env("REQUEST_MAX_PROMPT_CHARS", "32000", kind=int, minimum=1)
    # Batches (POST /generate/batch, gateway/tasks/batch.py): most items per batch, and the one pool of
    # threads per process that runs every batch's items (so the upstream calls batches make stay bounded).
    batch_max_items: int = _env("BATCH_MAX_ITEMS", "50", kind=int, minimum=1, maximum=1000)
    batch_concurrency: int = _env("BATCH_CONCURRENCY", "8", kind=int, minimum=1, maximum=64)
    # Batches in progress at once per process (more: 503 batch_busy at once). Each holds a server thread while its
    # items wait for the pool; as many batches as pool threads keep every worker busy, so more would only queue.
    batch_max_in_flight: int = _env("BATCH_MAX_IN_FLIGHT", "8", kind=int, minimum=1, maximum=1024)

    cache_enabled: bool = _env("CACHE_ENABLED", "true", kind=bool)
    cache_text_max_entries: int = _env("CACHE_TEXT_MAX_ENTRIES", "1000", kind=int, minimum=1)
    cache_text_ttl_seconds: float = _env("CACHE_TEXT_TTL_SECONDS", "3600", kind=float, minimum=0)
    cache_code_max_entries: int = _env("CACHE_CODE_MAX_ENTRIES", "1000", kind=int, minimum=1)
    cache_code_ttl_seconds: float = _env("CACHE_CODE_TTL_SECONDS", "86400", kind=float, minimum=0)
    cache_classify_max_entries: int = _env("CACHE_CLASSIFY_MAX_ENTRIES", "5000", kind=int, minimum=1)
    cache_classify_ttl_seconds: float = _env("CACHE_CLASSIFY_TTL_SECONDS", "86400", kind=float, minimum=0)
    cache_process_max_entries: int = _env("CACHE_PROCESS_MAX_ENTRIES", "1000", kind=int, minimum=1)
    cache_process_ttl_seconds: float = _env("CACHE_PROCESS_TTL_SECONDS", "86400", kind=float, minimum=0)

    cost_ledger_path: Path = _env("COST_LEDGER_PATH", "var/cost_ledger.sqlite3", kind=Path)
    cost_ledger_write_timeout_seconds: float = _env("COST_LEDGER_WRITE_TIMEOUT_SECONDS", "2", kind=float,
                                                    minimum=0.01)
    cost_input_price_per_million: float | None = _env("COST_INPUT_PRICE_PER_MILLION", "", kind=float, minimum=0)
    cost_output_price_per_million: float | None = _env("COST_OUTPUT_PRICE_PER_MILLION", "", kind=float, minimum=0)

    log_level: str = _env("LOG_LEVEL", "INFO")
    log_dir: Path = _env("LOG_DIR", "logs", kind=Path)
    log_max_bytes: int = _env("LOG_MAX_BYTES", "10485760", kind=int, minimum=1024)
    log_backup_count: int = _env("LOG_BACKUP_COUNT", "5", kind=int, minimum=0)
    # One summary line per request (and per error) on stderr. Empty: off in production, on otherwise.
    log_console: bool = _env("LOG_CONSOLE", "", kind="bool_or_environment")
    log_full_prompts: bool = _env("LOG_FULL_PROMPTS", "false", kind=bool)

    security_mode: str = _env("SECURITY_MODE", "log")
    hsts_enabled: bool = _env("HSTS_ENABLED", "false", kind=bool)

    # Client API keys (gateway/auth/keys.py, guard.py). Empty AUTH_ENABLED: on in production, off otherwise.
    auth_enabled: bool = _env("AUTH_ENABLED", "", kind="bool_or_environment")
    auth_allow_anonymous: bool = _env("AUTH_ALLOW_ANONYMOUS", "false", kind=bool)
    # Optional JWT bearer tokens (gateway/auth/jwt_tokens.py): an HS256 secret or an RS256 public key file, the issuer.
    auth_jwt_secret: str = _env("AUTH_JWT_SECRET", "", secret=True)
    auth_jwt_public_key_file: str = _env("AUTH_JWT_PUBLIC_KEY_FILE", "")
    auth_jwt_issuer: str = _env("AUTH_JWT_ISSUER", "")
    auth_jwt_audience: str = _env("AUTH_JWT_AUDIENCE", "")
    auth_jwt_leeway_seconds: float = _env("AUTH_JWT_LEEWAY_SECONDS", "30", kind=float, minimum=0)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides) -> Config:
        """Read settings from `environ` (default: os.environ), then apply keyword overrides."""
        environ = os.environ if environ is None else environ
        for retired, successor in RETIRED_SETTINGS.items():
            if environ.get(retired, "").strip():
                raise ConfigError(f"{retired} is no longer read: {successor}")
        values = {}
        for spec in dataclasses.fields(cls):
            if spec.name in overrides:
                values[spec.name] = overrides.pop(spec.name)
                continue
            meta = spec.metadata
            raw = environ.get(meta["env"], meta["default"])
            values[spec.name] = _parse(meta, raw)
        if overrides:
            raise ConfigError(f"unknown settings: {', '.join(sorted(overrides))}")
        if values["auth_enabled"] is None:  # AUTH_ENABLED unset: by environment
            values["auth_enabled"] = values["app_env"] == "production"
        if values["log_console"] is None:  # LOG_CONSOLE unset: by environment (the JSON-lines files have it all)
            values["log_console"] = values["app_env"] != "production"
        live = values["google_api_key"] or values["openai_api_key"] or values["anthropic_api_key"]
        if not values["cors_origins"] and not live and values["app_env"] != "production":
            values["cors_origins"] = ("*",)  # demo mode only: with a live key, no origin until CORS_ORIGINS names it
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Refuse settings that cannot work, and unsafe ones in production."""
        if self.app_env not in ENVIRONMENTS:
            raise ConfigError(f"APP_ENV must be one of {', '.join(ENVIRONMENTS)}, got {self.app_env!r}")
        if self.security_mode not in SECURITY_MODES:
            raise ConfigError(f"SECURITY_MODE must be one of {', '.join(SECURITY_MODES)}, got {self.security_mode!r}")
        if self.ratelimit_strategy not in RATELIMIT_STRATEGIES:
            raise ConfigError(f"RATELIMIT_STRATEGY must be one of {', '.join(RATELIMIT_STRATEGIES)}, "
                              f"got {self.ratelimit_strategy!r}")
        if not isinstance(logging.getLevelNamesMapping().get(self.log_level.upper()), int):
            raise ConfigError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {self.log_level!r}")
        if self.retry_max_wait_seconds < self.retry_min_wait_seconds:
            raise ConfigError("RETRY_MAX_WAIT_SECONDS must not be below RETRY_MIN_WAIT_SECONDS")
        for origin in self.cors_origins:
            if origin != "*" and not is_literal_origin(origin):
                raise ConfigError(
                    f"CORS_ORIGINS holds {origin[:100]!r}, which is not an origin: name each web app as "
                    "scheme://host[:port] (http or https, no path, no wildcard or pattern), or use * alone "
                    "outside production")
        self._validate_jwt()
        if self.is_production:
            if not self.has_provider_key:
                raise ConfigError("APP_ENV=production needs a provider key: GOOGLE_API_KEY, OPENAI_API_KEY or "
                                  "ANTHROPIC_API_KEY (demo mode is for development only)")
            if not self.ratelimit_enabled:
                raise ConfigError("APP_ENV=production refuses RATELIMIT_ENABLED=false")
            if not self.auth_enabled and not self.auth_allow_anonymous:
                raise ConfigError("APP_ENV=production refuses AUTH_ENABLED=false unless AUTH_ALLOW_ANONYMOUS=true "
                                  "(anyone who can reach the port could spend the key)")
            if "*" in self.cors_origins:
                raise ConfigError("APP_ENV=production refuses CORS_ORIGINS=*: name the origins of your web apps "
                                  "(any page a browser visits could otherwise spend the key)")

    def _validate_jwt(self) -> None:
        if not (self.auth_jwt_secret or self.auth_jwt_public_key_file):
            return
        if self.auth_jwt_secret and self.auth_jwt_public_key_file:
            raise ConfigError("set AUTH_JWT_SECRET (HS256) or AUTH_JWT_PUBLIC_KEY_FILE (RS256), not both")
        if not self.auth_jwt_issuer:
            raise ConfigError("AUTH_JWT_ISSUER is required with AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY_FILE")
        if self.auth_jwt_secret and len(self.auth_jwt_secret.encode("utf-8")) < 32:
            raise ConfigError("AUTH_JWT_SECRET must be at least 32 bytes (HS256)")
        if self.auth_jwt_public_key_file:
            try:
                from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
                from cryptography.hazmat.primitives.serialization import load_pem_public_key

                key = load_pem_public_key(Path(self.auth_jwt_public_key_file).read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"AUTH_JWT_PUBLIC_KEY_FILE is not a readable PEM public key "
                                  f"({type(exc).__name__})") from None
            if not isinstance(key, RSAPublicKey):
                raise ConfigError("AUTH_JWT_PUBLIC_KEY_FILE must hold an RSA public key (RS256)")

    @property
    def is_production(self) -> bool:
        return self.app_env == "production"

    @property
    def has_provider_key(self) -> bool:
        return bool(self.google_api_key or self.openai_api_key or self.anthropic_api_key)

    @property
    def demo_mode(self) -> bool:
        """No provider key outside production: answer from the built-in emulators instead."""
        return not self.has_provider_key and not self.is_production

    def exposure_warnings(self, host: str | None = None) -> list[str]:
        """Start-up warnings for a live key that strangers could spend (client authentication off).

        `host` is the address actually served (default HOST, what `python app.py` and serve.py use)."""
        if self.demo_mode:
            return []
        host = self.host if host is None else host
        warnings = []
        if self.is_production and not self.auth_enabled:
            warnings.append("SECURITY WARNING: APP_ENV=production with AUTH_ENABLED=false and "
                            "AUTH_ALLOW_ANONYMOUS=true: clients are not authenticated, and anyone who can reach "
                            "the port can spend the key.")
        elif host in ALL_INTERFACES and not self.auth_enabled:
            warnings.append(
                f"SECURITY WARNING: a live GOOGLE_API_KEY is served on all interfaces (host {host or '(empty)'!r}, "
                f"port {self.port}) and the gateway does not authenticate clients (AUTH_ENABLED=false): anyone who "
                "can reach this port can spend the key. Set AUTH_ENABLED=true and give clients API keys, set "
                "HOST=127.0.0.1, or keep the port behind a firewall or an authenticating proxy.")
        if "*" in self.cors_origins:
            warnings.append(
                "SECURITY WARNING: CORS_ORIGINS=* with a live GOOGLE_API_KEY: any web page a visitor's browser "
                "opens can call this gateway and spend the key. Name your web apps' origins instead.")
        return warnings

    @property
    def key_looks_like_google(self) -> bool:
        return self.google_api_key.startswith(GOOGLE_KEY_PREFIX)

    def cache_settings(self, task: str) -> tuple[int, float]:
        """(max entries, TTL seconds) of one task's cache: CACHE_<TASK>_MAX_ENTRIES, CACHE_<TASK>_TTL_SECONDS."""
        return getattr(self, f"cache_{task}_max_entries"), getattr(self, f"cache_{task}_ttl_seconds")

    @property
    def secret_values(self) -> list[str]:
        """The values of the settings marked secret (provider keys, the JWT secret): what logs redact."""
        return [getattr(self, spec.name) for spec in dataclasses.fields(self) if spec.metadata.get("secret")]

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        """Never print the key: this object ends up in logs and tracebacks."""
        shown = {
            spec.name: ("***" if spec.metadata.get("secret") and getattr(self, spec.name) else getattr(self, spec.name))
            for spec in dataclasses.fields(self)
        }
        return f"Config({shown})"


def _parse(meta: Mapping, raw: str):
    name, kind = meta["env"], meta.get("kind", str)
    if kind is bool:
        return _as_bool(name, raw)
    if kind == "bool_or_environment":
        return None if not raw.strip() else _as_bool(name, raw)
    if kind in (int, float):
        if not raw.strip() and meta["default"] == "":
            return None  # optional number: unset
        return _as_number(name, raw, kind, meta["minimum"], meta.get("maximum", math.inf))
    if kind is tuple:
        return _as_list(raw)
    if kind is Path:
        return Path(raw)
    return raw.strip()


def settings_table() -> list[tuple[str, str]]:
    """(variable, default) for every setting: used to check `.env.example` stays complete."""
    return [(spec.metadata["env"], spec.metadata["default"]) for spec in dataclasses.fields(Config)]
