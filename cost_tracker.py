"""What each request cost: token counting, the price table, and a durable ledger.

- `TokenCounter`: tiktoken's cl100k_base loaded from the file bundled in `data/` (tiktoken
  itself downloads it on first use, which fails offline). cl100k only approximates Gemini's
  tokenizer, so it is the fallback: requests are billed from the provider's reported usage
  whenever it is present, and every record says which source it used.
- `PriceTable`: USD per million tokens by model, from the model registry (`data/models.json`).
- `CostTracker`: one record per task request in a SQLite ledger (WAL mode; each record is
  committed before the response leaves, so a killed server loses no answered request, or, when
  the ledger is locked by someone else for longer than `write_timeout`, fsynced to a spool
  beside it and replayed later: `gateway/storage/ledger_spool.py`), also written to `cost_tracking.log`. Each
  record has the gateway's unique random request id and the client's X-Request-ID apart.
  Usage statistics are computed by SQLite (`gateway/storage/ledger_stats.py`) and exports stream, so neither
  grows with the ledger; totals survive restarts.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.storage import key_usage, ledger_stats
from gateway.storage.ledger_schema import COLUMNS, INSERT, OPTIONAL_COLUMNS, SELECT, CostRecord, migrate, record_of
from gateway.storage.ledger_spool import LedgerSpool
from gateway.storage.ledger_stats import percentiles  # noqa: F401 - part of this module's interface

log = logging.getLogger("gateway.cost")

DATA_DIR = Path(__file__).resolve().parent / "data"
EXPORT_CHUNK_CHARS = 64 * 1024  # an export's pieces: few writes, and little memory per export
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
    """USD per million tokens by model name: built from the model registry (`PriceTable(registry.prices())`,
    gateway/providers/registry.py), the one source of prices."""

    def __init__(self, prices: dict[str, Price]):
        self._prices = dict(prices)

    def knows(self, model: str) -> bool:
        return model in self._prices

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> Cost:
        price = self._prices.get(model) or self._prices.get(model.removeprefix("models/"))
        if price is None:
            return Cost()
        return Cost(input_tokens * price.input_per_million / 1_000_000,
                    output_tokens * price.output_per_million / 1_000_000)


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

    A batch that cannot take the ledger's write lock within `write_timeout` seconds (another
    connection holds it) goes to the durable spool instead (`gateway/storage/ledger_spool.py`), and so does every
    batch after it until a background replay has emptied the spool: the answer is not held up,
    and each record reaches the ledger exactly once.
    """

    def __init__(self, ledger_path: Path | str, *, on_record: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.time, write_timeout: float = 2.0,
                 maintenance_interval: float = 1.0):
        self.ledger_path = Path(ledger_path)
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        self._on_record = on_record
        self._clock = clock
        self._write_timeout = write_timeout
        self._lock = threading.Lock()  # the connection: one statement at a time
        self._write_lock = threading.Lock()  # one committer at a time
        self._queue_lock = threading.Lock()
        self._queued: list[_Pending] = []
        self._stats_calls = ledger_stats.SharedCalls()  # identical concurrent /stats share one computation
        self._rows = ledger_stats.RowCounter()
        self._spool = LedgerSpool(self.ledger_path)
        self._replay_lock = threading.Lock()  # one replay at a time, on its own connection
        self._replayer: sqlite3.Connection | None = None
        self._db = sqlite3.connect(self.ledger_path, check_same_thread=False, isolation_level=None, timeout=30)
        # Worker processes starting together race to create the file and switch it to WAL; SQLite
        # answers "locked" to the losers at once rather than waiting, so they try again.
        _while_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        self._db.execute("PRAGMA synchronous=NORMAL")  # a commit reaches the OS before we answer
        # Sharing the file's write lock: SQLite's own busy wait sleeps 1, 2, 5... ms between tries;
        # `_begin` retries every 0.2 ms instead.
        self._db.execute("PRAGMA busy_timeout=0")
        with self._lock:
            _while_locked(lambda: migrate(self._db))
        # Checkpoints (copying the WAL into the file, with an fsync) happen on a background thread,
        # not inside some request's commit, where one took 24 ms.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._last_overall = self._committed_total()
        self.replay_spool()  # what processes that are gone (an earlier run of this one too) left spooled
        self._stopping = threading.Event()
        self._maintainer = threading.Thread(target=self._maintain, args=(maintenance_interval,),
                                            name="ledger-maintenance", daemon=True)
        self._maintainer.start()

    @property
    def overall_cost(self) -> float:
        """Total spend in the ledger, all time, all processes (kept by a trigger in the insert's transaction)."""
        with self._lock:
            return self._db.execute("SELECT total_cost FROM ledger_total").fetchone()[0]

    @property
    def last_overall(self) -> float:
        """The overall total as last committed, without waiting for anything (the last one seen if unreadable)."""
        return self._committed_total()

    @property
    def rows_read(self) -> int:
        """Rows fetched from the ledger into Python so far (statistics, finds, exports)."""
        return self._rows.rows

    @property
    def spooled(self) -> int:
        """This process's records waiting in the spool for the ledger."""
        return self._spool.pending

    def record(self, record: CostRecord) -> float:
        """Commit (or durably spool) one record before the response is sent; returns the overall total."""
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
        if not self._spool.pending:  # while records wait in the spool the ledger was just busy: skip the wait
            try:
                with self._lock:
                    self._begin()
                    try:
                        errors = _insert_rows(self._db, [pending.row for pending in batch], self._begin)
                        overall = self._db.execute("SELECT total_cost FROM ledger_total").fetchone()[0]
                        self._db.execute("COMMIT")
                    except BaseException:
                        if self._db.in_transaction:
                            self._db.execute("ROLLBACK")
                        raise
                self._last_overall = overall
                for pending, error in zip(batch, errors, strict=True):  # a row the schema refuses: its caller hears
                    self._settle([pending], overall, error)
                return
            except sqlite3.Error as exc:
                log.warning("ledger write did not commit within %.1f s (%s); spooling %d records",
                            self._write_timeout, exc, len(batch))
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the same failure
                self._settle(batch, error=exc)
                return
        try:
            self._spool.append([dict(zip(COLUMNS, pending.row, strict=True)) for pending in batch])
        except OSError as exc:
            self._settle(batch, error=exc)
            return
        self._settle(batch, self._committed_total() + self._spool.pending_cost)

    @staticmethod
    def _settle(batch: list[_Pending], overall: float = 0.0, error: Exception | None = None) -> None:
        for pending in batch:
            pending.overall, pending.error, pending.done = overall, error, True

    def _committed_total(self) -> float:
        """The ledger's overall total as last committed (a read: it does not need the write lock)."""
        try:
            with self._lock:
                self._last_overall = self._db.execute("SELECT total_cost FROM ledger_total").fetchone()[0]
        except sqlite3.Error:
            pass  # the last one we saw
        return self._last_overall

    def replay_spool(self) -> int:
        """Move spooled records into the ledger: ours, and those of processes that are gone. Returns how many.

        On its own connection, so waiting for the write lock here never holds up a request."""
        replayed = 0
        if not self._spool.has_work():
            return 0
        with self._replay_lock:
            try:
                if self._replayer is None:
                    # Made on whichever thread replays first (the constructor's, when it finds a spool),
                    # then used by the maintenance thread: not tied to one thread.
                    self._replayer = sqlite3.connect(self.ledger_path, isolation_level=None, timeout=0,
                                                     check_same_thread=False)
                # Wait for the write lock before sealing our file for replay: during a long outage
                # the background tries would otherwise start a new spool file every second.
                self._begin_replay()
                self._replayer.execute("ROLLBACK")
                replayed += self._spool.replay(self._insert)
                replayed += self._spool.replay_orphans(self._insert)
            except (sqlite3.Error, OSError) as exc:
                if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                    log.info("spooled ledger records wait: %s", exc)  # someone holds the lock: next tick
                else:
                    log.error("spooled ledger records cannot be replayed: %s: %s", type(exc).__name__, exc)
        return replayed

    def _insert(self, records: list[dict]) -> None:
        """Commit spooled records (already in the ledger ones are ignored); raises if the ledger is still busy."""
        rows = []
        for record in records:
            try:
                rows.append(tuple(record.get(column) if column in OPTIONAL_COLUMNS else record[column]
                                  for column in COLUMNS))
            except KeyError:
                log.warning("spooled ledger record %s lacks fields; skipped", record.get("request_id"))
        db = self._replayer
        self._begin_replay()
        try:
            for row, error in zip(rows, _insert_rows(db, rows, self._begin_replay), strict=True):
                if error is not None:
                    log.error("spooled ledger record cannot be stored (%s), dropped from the spool: %s",
                              error, json.dumps(dict(zip(COLUMNS, row, strict=True))))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _begin_replay(self) -> None:
        _while_locked(lambda: self._replayer.execute("BEGIN IMMEDIATE"), patience=self._write_timeout)

    def records(self, hours: float | None = None) -> list[CostRecord]:
        """Records of the last `hours` (all when None), oldest first (tests and tools: this loads them all)."""
        with self._snapshot() as reader:
            cursor = reader.execute(f"{SELECT} WHERE timestamp >= ? ORDER BY id", (self._since(hours),))
            return [record_of(row) for row in self._rows.each(cursor)]

    def find(self, *, client_request_id: str | None = None, request_id: str | None = None,
             limit: int = 100) -> list[CostRecord]:
        """The records carrying a client's X-Request-ID (or one gateway request id), oldest first."""
        if (client_request_id is None) == (request_id is None):
            raise ValueError("find needs exactly one of client_request_id and request_id")
        column, value = ("client_request_id", client_request_id) if request_id is None else ("request_id", request_id)
        with self._snapshot() as reader:
            cursor = reader.execute(f"{SELECT} WHERE {column} = ? ORDER BY id LIMIT ?", (value, limit))
            return [record_of(row) for row in self._rows.each(cursor)]

    def get_usage_stats(self, hours: float = 24) -> dict:
        """Requests, tokens, costs, cache savings and latency percentiles over the last `hours`.

        Computed by SQLite (gateway/storage/ledger_stats.py): the rows fetched into Python do not grow with the
        ledger, and concurrent calls for the same window share one computation. The window's
        figures and the all-time total are read from one snapshot."""
        return self._stats_calls.run(hours, lambda: self._usage_stats(hours))

    def _usage_stats(self, hours: float) -> dict:
        with self._snapshot() as reader:
            totals, by_endpoint = ledger_stats.usage_stats(reader, self._since(hours), self._rows)
            overall = self._rows.fetchall(reader.execute("SELECT total_cost FROM ledger_total"))[0][0]
        return {"window_hours": hours, **totals, "by_endpoint": by_endpoint, "overall_cost": round(overall, 10)}

    def key_usage(self, key_id: str, month: str | None = None) -> dict:
        """One key's requests, tokens, cost, cache hits and savings in a calendar month (UTC; default: this one),
        in total and by day: SQL aggregates over the (key_id, timestamp) index, at most 31 rows fetched."""
        with self._snapshot() as reader:
            return key_usage.month_usage(reader, key_id, month or key_usage.month_of(self._clock()), self._rows)

    def export_records(self, path: Path | str, hours: float | None = None) -> int:
        """Write records to `path` as JSON (a list) or CSV, by its suffix, streaming them; returns how many."""
        path = Path(path)
        kind = path.suffix.lower()
        if kind not in (".csv", ".json"):
            raise ValueError(f"export format must be .json or .csv, got {path.name!r}")
        counted = [0]
        with path.open("w", newline="", encoding="utf-8") as handle:
            for chunk in self.export_chunks(kind.removeprefix("."), hours, counted=counted):
                handle.write(chunk)
        return counted[0]

    def export_chunks(self, kind: str, hours: float | None = None, *, chunk_chars: int = EXPORT_CHUNK_CHARS,
                      counted: list[int] | None = None):
        """The records of the last `hours` (all when None), oldest first, as the text of a CSV file (header
        first) or a JSON list, in pieces of about `chunk_chars`: rows are fetched from one read snapshot as
        the pieces are taken, so memory stays bounded whatever the ledger holds (an HTTP export streams them).
        `counted[0]` is the number of rows written so far. Closing the generator early closes the snapshot."""
        if kind not in ("csv", "json"):
            raise ValueError(f"export format must be json or csv, got {kind!r}")
        counted = counted if counted is not None else [0]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS) if kind == "csv" else None
        if writer:
            writer.writeheader()
        else:
            buffer.write("[")
        with self._snapshot() as reader:
            cursor = reader.execute(f"{SELECT} WHERE timestamp >= ? ORDER BY id", (self._since(hours),))
            for row in self._rows.each(cursor):
                fields = vars(record_of(row))
                if writer:
                    writer.writerow(fields)
                else:
                    buffer.write(("," if counted[0] else "") + "\n  " + json.dumps(fields))
                counted[0] += 1
                if buffer.tell() >= chunk_chars:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
        if not writer:
            buffer.write("\n]\n")
        yield buffer.getvalue()

    def _since(self, hours: float | None) -> float:
        return 0.0 if hours is None else self._clock() - hours * 3600

    @contextlib.contextmanager
    def _snapshot(self):
        """A read transaction on its own connection: in WAL mode it sees the last commit and neither
        waits for nor blocks the writer, so reading for /stats does not hold up requests."""
        with contextlib.closing(sqlite3.connect(self.ledger_path, timeout=30)) as reader:
            reader.execute("BEGIN")
            try:
                yield reader
            finally:
                reader.execute("ROLLBACK")

    def _begin(self) -> None:
        """Start a write transaction, waiting (in short steps, at most `write_timeout`) for another's lock."""
        _while_locked(lambda: self._db.execute("BEGIN IMMEDIATE"), patience=self._write_timeout)

    def _maintain(self, every_seconds: float = 1.0, orphans_every: int = 30) -> None:
        """Background work: replay our spool when it holds records, look for orphaned spools now and
        then, and checkpoint the WAL."""
        checkpoints = sqlite3.connect(self.ledger_path, timeout=self._write_timeout)
        ticks = 0
        try:
            while not self._stopping.wait(every_seconds):
                ticks += 1
                if self._spool.pending or ticks % orphans_every == 0:
                    self.replay_spool()
                try:
                    checkpoints.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # the ledger stays correct without checkpoints; the WAL just grows
                    log.debug("ledger checkpoint skipped: %s", exc)
        finally:
            checkpoints.close()

    def close(self) -> None:
        self._stopping.set()
        self._maintainer.join(timeout=5)
        self.replay_spool()
        self._spool.close()
        with self._replay_lock:
            if self._replayer is not None:
                self._replayer.close()
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
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
            if not _is_busy(exc) or time.monotonic() > give_up_at:
                raise
            time.sleep(0.0002)


def _insert_rows(db: sqlite3.Connection, rows: list[tuple], begin: Callable[[], None]) -> list[Exception | None]:
    """Insert `rows` in `db`'s open transaction; a row the schema refuses (a NULL cost) is left out and
    its error returned in its place, and the others still go in. A duplicate request id is skipped."""
    try:
        db.executemany(INSERT, rows)
        return [None] * len(rows)
    except sqlite3.IntegrityError:
        pass
    db.execute("ROLLBACK")  # executemany stopped part way: start over, one row at a time
    begin()
    errors: list[Exception | None] = []
    for row in rows:
        try:
            db.execute(INSERT, row)
            errors.append(None)
        except sqlite3.IntegrityError as exc:  # SQLite undoes only this statement
            errors.append(exc)
    return errors


def _is_busy(exc: sqlite3.Error) -> bool:
    """True when SQLite says another connection holds the lock (worth waiting for), not a real fault."""
    return "locked" in str(exc) or "busy" in str(exc)
