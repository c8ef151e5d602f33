"""The ledger's rows and its SQLite schema, with the migration of files written by earlier versions.

One table, `cost_records`, one row per task request, keyed by the gateway's unique request id
and carrying the id of the API key it came with (`key_id`, NULL without one);
`ledger_total` holds the all-time spend, kept by a trigger in each insert's transaction (and
not touched by an ignored duplicate). The indexes serve /stats (time window, latency
percentiles), the unique request id (exactly-once replay of the spool), lookups by a
client's X-Request-ID and per-key usage by time (`gateway/storage/key_usage.py`).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True)
class CostRecord:
    """One task request, as written to the ledger."""

    request_id: str  # the gateway's own: unique (a unique index) and random, never the client's
    timestamp: float
    endpoint: str
    client: str
    model: str
    input_tokens: int
    output_tokens: int
    input_cost: float
    output_cost: float
    total_cost: float
    cached: bool
    saved_cost: float
    token_source: str  # "provider", "estimate", or "none" (no upstream answer)
    latency_ms: float
    status: int
    client_request_id: str | None = None  # the client's X-Request-ID, if it sent a valid one
    key_id: str | None = None  # the id of the API key the request came with (gateway/auth/keys.py), if any


COLUMNS = [field.name for field in dataclasses.fields(CostRecord)]
OPTIONAL_COLUMNS = frozenset({"client_request_id", "key_id"})  # absent from records spooled by earlier versions
SELECT = f"SELECT {', '.join(COLUMNS)} FROM cost_records"
# ON CONFLICT(request_id) DO NOTHING: a record already in the ledger (a spool replayed twice) is
# skipped, and its cost is not added to ledger_total again (the trigger fires only for rows actually
# inserted). Only that conflict: a row breaking NOT NULL raises (OR IGNORE would drop it silently).
INSERT = (f"INSERT INTO cost_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
          "ON CONFLICT(request_id) DO NOTHING")
_TABLE = """
CREATE TABLE IF NOT EXISTS cost_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL, timestamp REAL NOT NULL, endpoint TEXT NOT NULL, client TEXT NOT NULL,
    model TEXT NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    input_cost REAL NOT NULL, output_cost REAL NOT NULL, total_cost REAL NOT NULL,
    cached INTEGER NOT NULL, saved_cost REAL NOT NULL, token_source TEXT NOT NULL,
    latency_ms REAL NOT NULL, status INTEGER NOT NULL, client_request_id TEXT, key_id TEXT
)"""
_SCHEMA = [
    "CREATE INDEX IF NOT EXISTS cost_records_by_time ON cost_records (timestamp)",
    "CREATE UNIQUE INDEX IF NOT EXISTS cost_records_by_request_id ON cost_records (request_id)",
    "CREATE INDEX IF NOT EXISTS cost_records_by_client_request_id ON cost_records (client_request_id) "
    "WHERE client_request_id IS NOT NULL",
    # covering index for the latency percentiles of /stats (see gateway/storage/ledger_stats.py)
    "CREATE INDEX IF NOT EXISTS cost_records_by_latency ON cost_records (latency_ms, endpoint, timestamp)",
    "CREATE INDEX IF NOT EXISTS cost_records_by_key ON cost_records (key_id, timestamp)",  # per-key usage
    "CREATE TABLE IF NOT EXISTS ledger_total (id INTEGER PRIMARY KEY CHECK (id = 1), total_cost REAL NOT NULL)",
    "INSERT OR IGNORE INTO ledger_total (id, total_cost) SELECT 1, COALESCE(SUM(total_cost), 0) FROM cost_records",
    "CREATE TRIGGER IF NOT EXISTS ledger_total_after_insert AFTER INSERT ON cost_records "
    "BEGIN UPDATE ledger_total SET total_cost = total_cost + NEW.total_cost WHERE id = 1; END",
]
# Ledgers written before request ids were unique used a client's X-Request-ID as the request id, so
# one id can name several rows. They all keep their data: the id becomes their client_request_id,
# and every row after the first of a group gets "~<row id>" appended so the unique index can exist.
_SEPARATE_DUPLICATE_IDS = [
    "UPDATE cost_records SET client_request_id = request_id WHERE client_request_id IS NULL AND request_id IN "
    "(SELECT request_id FROM cost_records GROUP BY request_id HAVING COUNT(*) > 1)",
    "UPDATE cost_records SET request_id = request_id || '~' || id "
    "WHERE id NOT IN (SELECT MIN(id) FROM cost_records GROUP BY request_id)",
]


def migrate(db: sqlite3.Connection) -> None:
    """Create the ledger, or bring a file written by an earlier version to this schema (one transaction)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(_TABLE)
        present = {row[1] for row in db.execute("PRAGMA table_info(cost_records)")}
        for column in ("client_request_id", "key_id"):  # added after the first release, in this order
            if column not in present:
                db.execute(f"ALTER TABLE cost_records ADD COLUMN {column} TEXT")
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'cost_records_by_request_id'").fetchone():
            for statement in _SEPARATE_DUPLICATE_IDS:
                db.execute(statement)
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def record_of(row: tuple) -> CostRecord:
    """A row selected with SELECT as a CostRecord (SQLite stores `cached` as 0/1)."""
    return CostRecord(*row[:10], bool(row[10]), *row[11:])
