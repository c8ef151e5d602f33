"""Client API keys: generation, hashed storage beside the ledger, and the per-request lookup.

- A key is `mtk_` + 43 URL-safe characters (`secrets.token_urlsafe(32)`: 256 random bits). It is
  shown once, when created; the store keeps only its SHA-256 (enough for a random key: there is
  nothing to brute-force), so a copy of the database gives no usable key.
- `KeyStore` keeps the keys in the ledger's SQLite file (COST_LEDGER_PATH), table `api_keys`,
  and serves each request from an in-memory map {sha256: ApiKey}: a dict lookup, then
  `hmac.compare_digest` of the hashes. Every change (create, revoke) bumps the one-row
  `api_keys_version` table in the same transaction; each lookup reads that row first (one
  single-row SELECT on the store's own connection, a few microseconds) and reloads the map when it
  changed, so a key revoked by any process stops working on the next request in every process.
  (`PRAGMA data_version` would not do: the ledger's commits change it all the time.)
- `last_used_at` is written lazily: at most once per `LAST_USED_EVERY` seconds per key and
  process, skipped (tried again later) when the database is busy, so authenticating never
  waits on a write.

Nothing here imports Flask: `gateway/auth/guard.py` decides what a request may do, `gateway/http/key_routes.py` and
`gateway/http/key_cli.py` are the HTTP and command-line doors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from gateway.errors import StoreBusy
from gateway.providers.registry import MODEL_ID

KEY_PREFIX = "mtk_"
SCOPES = ("user", "admin")
TASKS = ("text", "code", "classify", "process")  # what `allowed_tasks` may name (the stream is a `text` task)
WRITE_WAIT_SECONDS = 5.0  # how long creating or revoking a key waits for the database's write lock
LAST_USED_EVERY = 60.0  # seconds between two writes of one key's last_used_at by one process
MAX_NAME_CHARS = 100
MAX_ALLOWED_MODELS = 50


def generate_key() -> str:
    """A new random key: the prefix and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What the store keeps of a key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key_id() -> str:
    """The public id of a key (in the ledger, logs and URLs): not secret, never a credential."""
    return "key_" + secrets.token_hex(8)


@dataclass(frozen=True)
class ApiKey:
    """One key as the gateway knows it (never the key itself)."""

    id: str
    name: str
    owner: str
    scope: str  # "user" or "admin"
    created_at: float
    last_used_at: float | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    rate_limit: str | None = None  # a Flask-Limiter string such as "100/minute;1000/day"
    tokens_per_minute: int | None = None
    monthly_budget_usd: float | None = None  # enforced by gateway/auth/budgets.py (402 budget_exceeded)
    allowed_tasks: tuple[str, ...] | None = None  # None: every task
    allowed_models: tuple[str, ...] | None = None  # registry ids (aliases resolved when stored); None: every model

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def allows(self, task: str) -> bool:
        return self.allowed_tasks is None or task in self.allowed_tasks

    def allows_model(self, model_id: str) -> bool:
        """Whether the key may use the model with this registry id (not an alias: resolve it first)."""
        return self.allowed_models is None or model_id in self.allowed_models

    def public(self) -> dict:
        """The fields an admin may see (the hash is never part of an ApiKey)."""
        fields = dataclasses.asdict(self)
        for name in ("allowed_tasks", "allowed_models"):
            fields[name] = list(fields[name]) if fields[name] is not None else None
        for name in ("created_at", "last_used_at", "expires_at", "revoked_at"):
            fields[name] = _iso(fields[name])
        return fields


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- validation of new keys' settings (shared by the CLI and the HTTP endpoint) -----------------

class InvalidKeyField(ValueError):
    """A setting of a new key is not usable; `field` names it."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def parse_key_settings(raw: Mapping, *, now: float | None = None,
                       resolve_model: Callable[[str], str | None] | None = None) -> dict:
    """Checked keyword arguments for `KeyStore.create` from loosely typed input (JSON or CLI options).

    `resolve_model` maps a model name (id or alias) to its registry id, None if there is no such
    model; without it (JWT claims) model names are only checked for form. Raises InvalidKeyField
    naming the first bad field."""
    from limits import parse_many  # the limiter's own parser: a limit that parses here works there

    now = time.time() if now is None else now
    unknown = set(raw) - {"name", "owner", "scope", "rate_limit", "tokens_per_minute", "monthly_budget_usd",
                          "allowed_tasks", "allowed_models", "expires_at"}
    if unknown:
        raise InvalidKeyField(sorted(unknown)[0], "is not a key setting")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidKeyField("name", "is required (a non-empty string)")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidKeyField("name", f"must be at most {MAX_NAME_CHARS} characters")
    owner = raw.get("owner") or ""
    if not isinstance(owner, str) or len(owner) > MAX_NAME_CHARS:
        raise InvalidKeyField("owner", f"must be a string of at most {MAX_NAME_CHARS} characters")
    scope = raw.get("scope", "user")  # given means given: "" or null is not a scope
    if scope not in SCOPES:
        raise InvalidKeyField("scope", f"must be one of {', '.join(SCOPES)}")
    settings: dict = {"name": name.strip(), "owner": owner.strip(), "scope": scope}
    rate_limit = raw.get("rate_limit")
    if rate_limit not in (None, ""):
        if not isinstance(rate_limit, str) or len(rate_limit) > 200:
            raise InvalidKeyField("rate_limit", "must be a rate limit string such as '100/minute'")
        try:
            parse_many(rate_limit)
        except ValueError:
            raise InvalidKeyField("rate_limit", "is not a rate limit string such as '100/minute;1000/day'") from None
        settings["rate_limit"] = rate_limit.strip()
    settings["tokens_per_minute"] = _positive_number(raw, "tokens_per_minute", int, minimum=1)
    settings["monthly_budget_usd"] = _positive_number(raw, "monthly_budget_usd", float, minimum=0)
    tasks = raw.get("allowed_tasks")
    if tasks is not None:
        if isinstance(tasks, str):
            tasks = [part.strip() for part in tasks.split(",") if part.strip()]
        if not isinstance(tasks, list) or not tasks or not all(isinstance(task, str) for task in tasks):
            raise InvalidKeyField("allowed_tasks", f"must be a non-empty list of tasks ({', '.join(TASKS)})")
        if not set(tasks) <= set(TASKS):
            raise InvalidKeyField("allowed_tasks", f"must name only {', '.join(TASKS)}")
        settings["allowed_tasks"] = tuple(task for task in TASKS if task in tasks)
    models = raw.get("allowed_models")
    if models is not None:
        settings["allowed_models"] = _allowed_models(models, resolve_model)
    expires = raw.get("expires_at")
    if expires not in (None, ""):
        settings["expires_at"] = _expiry(expires, now)
    return settings


def _allowed_models(models, resolve_model: Callable[[str], str | None] | None) -> tuple[str, ...]:
    """The registry ids a key may use, in the order given, each once (aliases resolved to their id)."""
    if isinstance(models, str):
        models = [part.strip() for part in models.split(",") if part.strip()]
    if (not isinstance(models, list) or not models or len(models) > MAX_ALLOWED_MODELS
            or not all(isinstance(model, str) for model in models)):
        raise InvalidKeyField("allowed_models", f"must be a list of 1 to {MAX_ALLOWED_MODELS} model ids "
                                                "(GET /api/v1/models lists them)")
    ids: list[str] = []
    for model in models:
        if not MODEL_ID.fullmatch(model):
            raise InvalidKeyField("allowed_models", f"holds {model[:40]!r}, which is not a model id")
        resolved = model if resolve_model is None else resolve_model(model)
        if resolved is None:
            raise InvalidKeyField("allowed_models", f"names '{model}', which is not a model of this gateway "
                                                    "(GET /api/v1/models lists them)")
        if resolved not in ids:
            ids.append(resolved)
    return tuple(ids)


def _positive_number(raw: Mapping, field: str, kind: type, minimum: float):
    value = raw.get(field)
    if value in (None, ""):
        return None
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise InvalidKeyField(field, f"must be {'a whole number' if kind is int else 'a number'}")
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidKeyField(field, f"must be {'a whole number' if kind is int else 'a number'}") from None
    if not minimum <= number < 1e15:  # also refuses NaN and infinity
        raise InvalidKeyField(field, f"must be at least {minimum} and below 10^15")
    return number


def _expiry(value, now: float) -> float:
    """An expiry as a timestamp: a date (`2027-01-01`, midnight UTC) or an ISO date-time (UTC unless it says)."""
    if not isinstance(value, str) or len(value) > 40:
        raise InvalidKeyField("expires_at", "must be a date (YYYY-MM-DD) or an ISO 8601 date-time")
    try:
        if len(value.strip()) == 10:
            moment = datetime.combine(date.fromisoformat(value.strip()), datetime.min.time(), UTC)
        else:
            moment = datetime.fromisoformat(value.strip())
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise InvalidKeyField("expires_at", "must be a date (YYYY-MM-DD) or an ISO 8601 date-time") from None
    if moment.timestamp() <= now:
        raise InvalidKeyField("expires_at", "must be in the future")
    if moment.timestamp() >= _LATEST_EXPIRY:  # later ones cannot be shown as dates (year 10000 in UTC)
        raise InvalidKeyField("expires_at", "must be before 9000-01-01")
    return moment.timestamp()


_LATEST_EXPIRY = datetime(9000, 1, 1, tzinfo=UTC).timestamp()


# --- the store --------------------------------------------------------------------------------

_COLUMNS = [field.name for field in dataclasses.fields(ApiKey)]
_SCHEMA = [
    f"""CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, name TEXT NOT NULL, owner TEXT NOT NULL,
        scope TEXT NOT NULL CHECK (scope IN ({', '.join(repr(scope) for scope in SCOPES)})),
        created_at REAL NOT NULL, last_used_at REAL, expires_at REAL, revoked_at REAL, rate_limit TEXT,
        tokens_per_minute INTEGER, monthly_budget_usd REAL, allowed_tasks TEXT, allowed_models TEXT
    )""",
    "CREATE TABLE IF NOT EXISTS api_keys_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO api_keys_version (id, version) VALUES (1, 0)",
]
_BUMP = "UPDATE api_keys_version SET version = version + 1 WHERE id = 1"
_SELECT = f"SELECT key_hash, {', '.join(_COLUMNS)} FROM api_keys"


_ADDED_COLUMNS = ("allowed_models",)  # added to api_keys after its first release, in this order
_LISTS = ("allowed_tasks", "allowed_models")  # stored comma-joined (tasks and model ids hold no comma)


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a key table written by an earlier version to this schema (inside the caller's write transaction,
    so two processes starting at once do not both add a column)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(api_keys)")}
    for column in _ADDED_COLUMNS:
        if column not in present:
            db.execute(f"ALTER TABLE api_keys ADD COLUMN {column} TEXT")


def _key_of(row: tuple) -> tuple[str, ApiKey]:
    values = dict(zip(_COLUMNS, row[1:], strict=True))
    for name in _LISTS:
        values[name] = tuple(values[name].split(",")) if values[name] else None
    return row[0], ApiKey(**values)


class KeyStore:
    """The keys in the ledger's database, and the in-memory map each request is checked against.

    Thread-safe: one connection, used under a lock (each statement takes microseconds)."""

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time,
                 last_used_every: float = LAST_USED_EVERY):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._last_used_every = last_used_every
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._version = -1
        self._by_hash: dict[str, ApiKey] = {}
        self._hash_of: dict[str, str] = {}  # key id -> its hash
        self._last_written: dict[str, float] = {}  # key id -> when this process last wrote its last_used_at
        # last_used_at goes through its own connection that never waits for the database's write lock,
        # so lookups (on the connection above) never queue behind it
        self._toucher = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
        # Creating and revoking keys also has its own connection: a write waiting for the database's lock
        # must not hold the lock every lookup takes (one did: authentication froze for 30 s)
        self._writer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=WRITE_WAIT_SECONDS)
        self._write_lock = threading.Lock()
        self._write([*_SCHEMA, _add_missing_columns])
        self._touch_lock = threading.Lock()
        self.reloads = 0

    # --- per request ---

    def lookup(self, presented: str) -> ApiKey | None:
        """The key a client presented, or None if no such key exists (revoked and expired keys are returned:
        the caller says which)."""
        digest = hash_key(presented)
        with self._lock:
            self._refresh()
            found = self._by_hash.get(digest)
            stored = self._hash_of.get(found.id, "") if found is not None else ""
        return found if found is not None and hmac.compare_digest(stored, digest) else None

    def _refresh(self) -> None:
        """Reload the map if any process changed the keys since we last read them (holds the lock)."""
        version = self._db.execute("SELECT version FROM api_keys_version").fetchone()[0]
        if version == self._version:
            return
        rows = self._db.execute(_SELECT).fetchall()  # a change in between only means one more reload later
        by_hash = dict(_key_of(row) for row in rows)
        self._by_hash = by_hash
        self._hash_of = {key.id: digest for digest, key in by_hash.items()}
        self._version = version
        self.reloads += 1

    def touch(self, key: ApiKey) -> None:
        """Note that `key` was used: written at most once per `last_used_every` seconds per key, never waited for."""
        now = self._clock()
        if now - self._last_written.get(key.id, float("-inf")) < self._last_used_every:
            return
        if not self._touch_lock.acquire(blocking=False):
            return  # another thread is writing one: ours waits for a later request
        try:
            self._last_written[key.id] = now
            self._toucher.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key.id))
        except sqlite3.OperationalError:
            self._last_written[key.id] = float("-inf")  # the database is busy: try again on a later request
        finally:
            self._touch_lock.release()

    # --- management ---

    def create(self, *, name: str, owner: str = "", scope: str = "user", rate_limit: str | None = None,
               tokens_per_minute: int | None = None, monthly_budget_usd: float | None = None,
               allowed_tasks: Iterable[str] | None = None, allowed_models: Iterable[str] | None = None,
               expires_at: float | None = None) -> tuple[ApiKey, str]:
        """Store a new key; returns it and the key itself (the only time the key is available)."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}")
        secret = generate_key()
        key = ApiKey(id=new_key_id(), name=name, owner=owner, scope=scope, created_at=self._clock(),
                     expires_at=expires_at, rate_limit=rate_limit, tokens_per_minute=tokens_per_minute,
                     monthly_budget_usd=monthly_budget_usd,
                     allowed_tasks=tuple(allowed_tasks) if allowed_tasks is not None else None,
                     allowed_models=tuple(allowed_models) if allowed_models is not None else None)
        values = dataclasses.asdict(key)
        for name in _LISTS:
            values[name] = ",".join(values[name]) if values[name] is not None else None
        self._write([(f"INSERT INTO api_keys (key_hash, {', '.join(_COLUMNS)}) "
                      f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})", (hash_key(secret), *values.values())),
                     _BUMP])
        return key, secret

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke a key (from the next request on, in every process); None if there is no such key.
        Revoking a revoked key keeps its first revocation time."""
        self._write([("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (self._clock(), key_id)),
                     _BUMP])
        return self.get(key_id)

    def get(self, key_id: str) -> ApiKey | None:
        with self._lock:
            row = self._db.execute(f"{_SELECT} WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else _key_of(row)[1]

    def list(self) -> list[ApiKey]:
        """Every key, oldest first (revoked ones included)."""
        with self._lock:
            rows = self._db.execute(f"{_SELECT} ORDER BY created_at, id").fetchall()
        return [_key_of(row)[1] for row in rows]

    def _write(self, statements: list) -> None:
        """Run statements in one write transaction; StoreBusy (503) if the database stays locked."""
        with self._write_lock:
            try:
                self._writer.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreBusy("The key store is busy (another writer holds the database); try again",
                                retry_after=1) from exc
            try:
                for statement in statements:
                    if callable(statement):  # a step that reads before it writes (a migration)
                        statement(self._writer)
                        continue
                    sql, params = statement if isinstance(statement, tuple) else (statement, ())
                    self._writer.execute(sql, params)
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._touch_lock:
            self._toucher.close()
        with self._write_lock:
            self._writer.close()
        with self._lock:
            self._db.close()
