"""What each request cost: token counting, the price table, and a durable ledger.

- `TokenCounter`: tiktoken's cl100k_base loaded from the file bundled in `data/` (tiktoken
  itself downloads it on first use, which fails offline). cl100k only approximates Gemini's
  tokenizer, so it is the fallback: requests are billed from the provider's reported usage
  whenever it is present, and every record says which source it used.
- `PriceTable`: USD per million tokens by model, from `data/prices.json`, overridable.
- `CostTracker`: one record per task request in a SQLite ledger (WAL mode; each record is
  committed before the response leaves, so a killed server loses no answered request), also
  written to `cost_tracking.log`; usage statistics and exports read the ledger, so totals
  survive restarts.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gateway.cost")

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_PRICE_FILE = DATA_DIR / "prices.json"
CL100K_FILE = DATA_DIR / "cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken's own expected hash
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
CL100K_SPECIAL_TOKENS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                         "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


class TokenCounter:
    """Counts tokens with cl100k_base from the bundled file; a 4-characters-a-token guess if it cannot.

    The encoder is loaded on first use: it takes 0.3 s and 40 MB per process, and it is only
    needed when a provider reply carries no usage (Gemini's normally does).
    """

    def __init__(self, bpe_file: Path = CL100K_FILE):
        self._bpe_file = bpe_file

    @property
    def exact(self) -> bool:
        """True when counts come from the real encoder, False when they are estimates."""
        return _load_cl100k(self._bpe_file) is not None

    def count(self, text: str) -> int:
        if not text:
            return 0
        encoding = _load_cl100k(self._bpe_file)
        if encoding is not None:
            return len(encoding.encode_ordinary(text))
        return math.ceil(len(text) / 4)


@functools.cache
def _load_cl100k(bpe_file: Path):
    """Build the encoder once per process (0.3 s); it is immutable and thread-safe."""
    try:
        import tiktoken

        data = bpe_file.read_bytes()
        if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
            raise ValueError(f"{bpe_file} does not have cl100k_base's expected SHA-256")
        ranks = {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in data.splitlines() if line)
        }
        return tiktoken.Encoding(name="cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=CL100K_SPECIAL_TOKENS)
    except Exception as exc:  # noqa: BLE001 - any failure means: estimate instead, and say so
        log.warning("tiktoken encoder unavailable (%s: %s); token estimates fall back to characters / 4",
                    type(exc).__name__, exc)
        return None


@dataclass(frozen=True)
class Price:
    input_per_million: float
    output_per_million: float


@dataclass(frozen=True)
class Cost:
    input: float = 0.0
    output: float = 0.0

    @property
    def total(self) -> float:
        return self.input + self.output


class PriceTable:
    """USD per million tokens by model name."""

    def __init__(self, prices: dict[str, Price]):
        self._prices = dict(prices)

    @classmethod
    def load(cls, path: Path | str | None = None, *, model: str | None = None,
             input_override: float | None = None, output_override: float | None = None) -> PriceTable:
        """Read the price file; the overrides replace the price of `model` (the configured one)."""
        raw = json.loads(Path(path or DEFAULT_PRICE_FILE).read_text(encoding="utf-8"))
        prices = {name: Price(float(entry["input_per_million"]), float(entry["output_per_million"]))
                  for name, entry in raw.items() if not name.startswith("_")}
        if model and (input_override is not None or output_override is not None):
            base = prices.get(model, Price(0.0, 0.0))
            prices[model] = Price(
                base.input_per_million if input_override is None else input_override,
                base.output_per_million if output_override is None else output_override,
            )
        return cls(prices)

    def knows(self, model: str) -> bool:
        return model in self._prices

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> Cost:
        price = self._prices.get(model) or self._prices.get(model.removeprefix("models/"))
        if price is None:
            return Cost()
        return Cost(input_tokens * price.input_per_million / 1_000_000,
                    output_tokens * price.output_per_million / 1_000_000)


@dataclass(frozen=True)
class CostRecord:
    """One task request, as written to the ledger."""

    request_id: str
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


_COLUMNS = [field.name for field in dataclasses.fields(CostRecord)]
_INSERT = f"INSERT INTO cost_records ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS cost_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL, timestamp REAL NOT NULL, endpoint TEXT NOT NULL, client TEXT NOT NULL,
    model TEXT NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    input_cost REAL NOT NULL, output_cost REAL NOT NULL, total_cost REAL NOT NULL,
    cached INTEGER NOT NULL, saved_cost REAL NOT NULL, token_source TEXT NOT NULL,
    latency_ms REAL NOT NULL, status INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS cost_records_by_time ON cost_records (timestamp);
CREATE TABLE IF NOT EXISTS ledger_total (id INTEGER PRIMARY KEY CHECK (id = 1), total_cost REAL NOT NULL);
INSERT OR IGNORE INTO ledger_total (id, total_cost) SELECT 1, COALESCE(SUM(total_cost), 0) FROM cost_records;
CREATE TRIGGER IF NOT EXISTS ledger_total_after_insert AFTER INSERT ON cost_records
BEGIN UPDATE ledger_total SET total_cost = total_cost + NEW.total_cost WHERE id = 1; END;
"""


class _Pending:
    """A record waiting to be committed, and what its commit said."""

    __slots__ = ("row", "done", "overall", "error")

    def __init__(self, row: tuple):
        self.row, self.done, self.overall, self.error = row, False, 0.0, None


class CostTracker:
    """Thread-safe ledger of task requests and the statistics read from it.

    Writes are group-committed: a thread that finds a commit in progress queues its record, and
    the next thread to get the writer lock commits everything queued in one transaction. Each
    caller still returns only after its own record is committed, so the crash rule holds, but
    under load the ledger takes one write lock per batch instead of one per request (which
    matters when several worker processes share the file).
    """

    def __init__(self, ledger_path: Path | str, *, on_record: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.ledger_path = Path(ledger_path)
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        self._on_record = on_record
        self._clock = clock
        self._lock = threading.Lock()  # the connection: one statement at a time
        self._write_lock = threading.Lock()  # one committer at a time
        self._queue_lock = threading.Lock()
        self._queued: list[_Pending] = []
        self._db = sqlite3.connect(self.ledger_path, check_same_thread=False, isolation_level=None, timeout=30)
        # Worker processes starting together race to create the file and switch it to WAL; SQLite
        # answers "locked" to the losers at once rather than waiting, so they try again.
        _while_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        self._db.execute("PRAGMA synchronous=NORMAL")  # a commit reaches the OS before we answer
        with self._lock:
            _while_locked(lambda: self._db.executescript(_SCHEMA))
        # Checkpoints (copying the WAL into the file, with an fsync) happen on a background thread,
        # not inside some request's commit, where one took 24 ms.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        # Worker processes sharing the file contend for its write lock. SQLite's own busy wait
        # sleeps 1, 2, 5... ms between tries; `_begin` retries every 0.2 ms instead.
        self._db.execute("PRAGMA busy_timeout=0")
        self._stopping = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_regularly, name="ledger-checkpoint",
                                              daemon=True)
        self._checkpointer.start()

    @property
    def overall_cost(self) -> float:
        """Total spend in the ledger, all time, all processes (kept by a trigger in the insert's transaction)."""
        with self._lock:
            return self._db.execute("SELECT total_cost FROM ledger_total").fetchone()[0]

    def record(self, record: CostRecord) -> float:
        """Commit one record (before the response is sent); returns the ledger's new overall total."""
        fields = vars(record)  # flat and in column order; dataclasses.astuple deep-copies, 4x slower
        mine = _Pending(tuple(fields.values()))
        with self._queue_lock:
            self._queued.append(mine)
        with self._write_lock:
            if not mine.done:  # no one committed it while we waited: commit everything queued
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._commit(batch)
        if mine.error is not None:
            raise mine.error
        if self._on_record:
            self._on_record(dict(fields))
        return mine.overall

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            with self._lock:
                self._begin()
                try:
                    self._db.executemany(_INSERT, [pending.row for pending in batch])
                    overall = self._db.execute("SELECT total_cost FROM ledger_total").fetchone()[0]
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the same failure
            for pending in batch:
                pending.error, pending.done = exc, True
            return
        for pending in batch:
            pending.overall, pending.done = overall, True

    def records(self, hours: float | None = None) -> list[CostRecord]:
        """Records of the last `hours` (all when None), oldest first."""
        return self._read(hours)[0]

    def _read(self, hours: float | None) -> tuple[list[CostRecord], float]:
        """The window's records and the all-time total, from one snapshot of the ledger.

        Its own connection: in WAL mode a reader sees the last commit and neither waits for nor
        blocks the writer, so reading a large window for /stats does not hold up requests.
        """
        since = 0.0 if hours is None else self._clock() - hours * 3600
        with contextlib.closing(sqlite3.connect(self.ledger_path, timeout=30)) as reader:
            reader.execute("BEGIN")  # one read transaction: the records and the total agree
            rows = reader.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM cost_records WHERE timestamp >= ? ORDER BY id", (since,),
            ).fetchall()
            overall = reader.execute("SELECT total_cost FROM ledger_total").fetchone()[0]
            reader.execute("COMMIT")
        return [CostRecord(*row[:10], bool(row[10]), *row[11:]) for row in rows], overall

    def get_usage_stats(self, hours: float = 24) -> dict:
        """Requests, tokens, costs, cache savings and latency percentiles over the last `hours`."""
        records, overall = self._read(hours)
        by_endpoint: dict[str, list[CostRecord]] = {}
        for record in records:
            by_endpoint.setdefault(record.endpoint, []).append(record)
        totals = _summarise(records)
        return {
            "window_hours": hours,
            **totals,
            "by_endpoint": {endpoint: _summarise(group) for endpoint, group in sorted(by_endpoint.items())},
            "overall_cost": round(overall, 10),
        }

    def export_records(self, path: Path | str, hours: float | None = None) -> int:
        """Write records to `path` as JSON (a list) or CSV, by its suffix; returns how many."""
        path = Path(path)
        rows = [dataclasses.asdict(record) for record in self.records(hours)]
        if path.suffix.lower() == ".csv":
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
        elif path.suffix.lower() == ".json":
            path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        else:
            raise ValueError(f"export format must be .json or .csv, got {path.name!r}")
        return len(rows)

    def _begin(self) -> None:
        """Start a write transaction, waiting (in short steps) while another process holds the lock."""
        _while_locked(lambda: self._db.execute("BEGIN IMMEDIATE"))

    def _checkpoint_regularly(self, every_seconds: float = 1.0) -> None:
        checkpoints = sqlite3.connect(self.ledger_path, timeout=30)
        try:
            while not self._stopping.wait(every_seconds):
                checkpoints.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the ledger stays correct without checkpoints; the WAL just grows
            log.warning("ledger checkpoints stopped: %s", exc)
        finally:
            checkpoints.close()

    def close(self) -> None:
        self._stopping.set()
        self._checkpointer.join(timeout=5)
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._db.close()


def _while_locked(statement: Callable[[], object], patience: float = 30.0) -> None:
    """Run `statement`, trying again every 0.2 ms while another process holds the database lock."""
    give_up_at = time.monotonic() + patience
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > give_up_at:
                raise
            time.sleep(0.0002)


def _summarise(records: list[CostRecord]) -> dict:
    answered = [record for record in records if record.status < 400]
    hits = sum(record.cached for record in answered)
    spent = math.fsum(record.total_cost for record in records)
    saved = math.fsum(record.saved_cost for record in records)
    by_status: dict[str, int] = {}
    for record in records:
        by_status[str(record.status)] = by_status.get(str(record.status), 0) + 1
    return {
        "requests": len(records),
        "by_status": dict(sorted(by_status.items())),
        "tokens": {"input": sum(r.input_tokens for r in records), "output": sum(r.output_tokens for r in records)},
        "token_sources": _count(record.token_source for record in records),
        "cost": {"input": round(math.fsum(r.input_cost for r in records), 10),
                 "output": round(math.fsum(r.output_cost for r in records), 10),
                 "total": round(spent, 10)},
        "cache": {"hits": hits, "hit_rate": round(hits / len(answered), 4) if answered else 0.0},
        "cost_saved_by_cache": round(saved, 10),
        "cost_without_cache": round(spent + saved, 10),
        "cost_reduction": round(saved / (spent + saved), 4) if spent + saved else 0.0,
        "latency_ms": percentiles([record.latency_ms for record in records]),
    }


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 by nearest rank; None when there are no values."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 2)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99)}
