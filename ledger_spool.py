"""A durable local spool for ledger records that could not be committed promptly.

When another connection holds the ledger's write lock (a backup, a long transaction, a stuck
process), an answered request must neither wait for it nor go unbilled. `CostTracker` then
appends the record here, one JSON line per record, and fsyncs before the answer leaves; a
background thread (and every start-up) replays spooled lines into the ledger.

Exactly once: each record carries its unique `request_id` and replay uses `INSERT OR IGNORE`
against the ledger's unique index on it, so a line replayed twice (a crash between the
ledger's commit and the spool's truncation) is ignored the second time, and the ledger_total
trigger does not fire for an ignored row.

Several processes: each process appends only to its own file, `<ledger>.spool/<token>.jsonl`,
and holds an OS file lock on `<token>.lock` (filelock: flock on POSIX, msvcrt on Windows) for as
long as it lives. The lock is released when the process dies, so another process may replay
and delete a spool file only when it can take that file's lock: its owner is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("gateway.cost")

REPLAY_CHUNK = 1000  # records per replay transaction
Insert = Callable[[list[dict]], None]  # commits the records to the ledger, or raises


class LedgerSpool:
    """This process's spool file beside the ledger, and the replay of any file whose owner is gone."""

    def __init__(self, ledger_path: Path):
        self.directory = ledger_path.parent / f"{ledger_path.name}.spool"
        token = uuid.uuid4().hex
        self.path = self.directory / f"{token}.jsonl"
        self._owner_lock = FileLock(self.directory / f"{token}.lock", timeout=0, thread_local=False)
        self._lock = threading.Lock()  # appends, replays and truncation of our file, one at a time
        self._file = None  # opened on the first append: most processes never spool
        self._count = 0
        self._cost = 0.0

    @property
    def pending(self) -> int:
        """Records in this process's spool that are not yet in the ledger."""
        return self._count

    @property
    def pending_cost(self) -> float:
        return self._cost

    def append(self, records: list[dict]) -> None:
        """Write `records` durably (append + fsync) before returning; raises OSError if it cannot."""
        data = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records).encode("utf-8")
        with self._lock:
            if self._file is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._owner_lock.acquire()  # before the file exists, so no one takes it for an orphan
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the process's life
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._count += len(records)
            self._cost += math.fsum(record["total_cost"] for record in records)

    def replay(self, insert: Insert) -> int:
        """Move this process's spooled records into the ledger; returns how many were replayed.

        The spool's lock is held from reading to truncation, so a record appended meanwhile is
        neither lost nor truncated before it is in the ledger. If `insert` raises, nothing changes."""
        with self._lock:
            if self._file is None or not self._count:
                return 0
            for chunk in _chunks(_read_records(self.path)):
                insert(chunk)
            self._file.truncate(0)  # only after the ledger committed: a crash before this replays again, ignored
            self._file.flush()
            os.fsync(self._file.fileno())
            replayed, self._count, self._cost = self._count, 0, 0.0
            return replayed

    def replay_orphans(self, insert: Insert) -> int:
        """Replay and delete the spool files of processes that are gone (their lock is free)."""
        if not self.directory.is_dir():
            return 0
        replayed = 0
        owners = {path.stem for path in self.directory.glob("*.jsonl")} | {
            path.stem for path in self.directory.glob("*.lock")}
        for token in sorted(owners - {self.path.stem}):
            path, lock = self.directory / f"{token}.jsonl", FileLock(self.directory / f"{token}.lock", timeout=0,
                                                                     thread_local=False)
            try:
                lock.acquire()
            except Timeout:
                continue  # its process is alive and replays its own file
            try:
                if path.exists():
                    count = 0
                    for chunk in _chunks(_read_records(path)):
                        insert(chunk)
                        count += len(chunk)
                    path.unlink()  # after the commits: a crash before this replays it again, ignored
                    replayed += count
                    log.info("replayed %d spooled ledger records from %s", count, path.name)
                _remove(lock)
            finally:
                lock.release()
        return replayed

    def close(self) -> None:
        """Close our file; remove it if empty and give up its lock (a non-empty one is an orphan now)."""
        with self._lock:
            if self._file is None:
                return
            self._file.close()
            self._file = None
            if not self._count:
                self.path.unlink(missing_ok=True)
                _remove(self._owner_lock)
            self._owner_lock.release()


def _remove(lock: FileLock) -> None:
    """Delete a held lock's file once its spool is gone (the token is never used again); Windows keeps it."""
    with contextlib.suppress(OSError):
        Path(lock.lock_file).unlink()


def _chunks(records: Iterator[dict], size: int = REPLAY_CHUNK) -> Iterator[list[dict]]:
    """Records in lists of `size`: a long outage's spool is replayed in bounded memory."""
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _read_records(path: Path) -> Iterator[dict]:
    """The spool's records; a torn last line (a crash mid-append, never acknowledged) is skipped."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "request_id" not in record:
                    raise ValueError("not a ledger record")
            except ValueError:
                log.warning("skipping unreadable line %d of ledger spool %s", number, path.name)
                continue
            yield record
