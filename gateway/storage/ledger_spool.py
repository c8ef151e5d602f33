"""A durable local spool for ledger records that could not be committed promptly.

When another connection holds the ledger's write lock (a backup, a long transaction, a stuck
process), an answered request must neither wait for it nor go unbilled. `CostTracker` then
appends the record here, one JSON line per record, and fsyncs before the answer leaves; a
background thread (and every start-up) replays spooled lines into the ledger.

Exactly once: each record carries its unique `request_id` and replay uses `ON CONFLICT(request_id) DO NOTHING`
against the ledger's unique index on it, so a line replayed twice (a crash between the
ledger's commit and the removal of the spool file) is ignored the second time, and the
ledger_total trigger does not fire for an ignored row.

Appends never wait for a replay: a replay first seals the file being appended to (later
records go to the next file, `<token>-<n+1>.jsonl`), then commits the sealed files and deletes
each one after its records are in the ledger.

Several processes: each process appends only to its own files, `<ledger>.spool/<token>-<n>.jsonl`,
and holds an OS file lock on `<token>.lock` (filelock: flock on POSIX, msvcrt on Windows) for as
long as it lives. The OS releases it when the process dies, so another process may replay and
delete a token's files only when it can take that token's lock: their owner is gone.
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
    """This process's spool files beside the ledger, and the replay of any files whose owner is gone."""

    def __init__(self, ledger_path: Path):
        self.directory = ledger_path.parent / f"{ledger_path.name}.spool"
        self.token = uuid.uuid4().hex
        self._owner_lock = _lock_of(self.directory, self.token)
        self._lock = threading.Lock()  # the open file and the counts
        self._replay_lock = threading.Lock()  # one replay of our files at a time
        self._file = None  # opened on the first append after a seal: most processes never spool
        self._sequence = 0
        self._open = (0, 0.0)  # records and cost in the open file
        self._sealed: list[tuple[Path, int, float]] = []  # closed files waiting for replay
        self._count, self._cost = 0, 0.0

    @property
    def pending(self) -> int:
        """Records in this process's spool that are not yet in the ledger."""
        return self._count

    @property
    def pending_cost(self) -> float:
        return self._cost

    def has_work(self) -> bool:
        """Our records wait, or the spool folder holds another process's files (maybe an orphan's)."""
        if self._count:
            return True
        if not self.directory.is_dir():
            return False
        return any(not path.name.startswith(self.token) for path in self.directory.iterdir())

    def append(self, records: list[dict]) -> None:
        """Write `records` durably (append + fsync) before returning; raises OSError if it cannot."""
        data = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records).encode("utf-8")
        cost = math.fsum(record["total_cost"] for record in records)
        with self._lock:
            if self._file is None:
                if not self._owner_lock.is_locked:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self._owner_lock.acquire()  # before any file exists, so no one takes ours for an orphan
                self._sequence += 1
                self._file = open(self._path(self._sequence), "ab")  # noqa: SIM115 - closed when sealed
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._open = (self._open[0] + len(records), self._open[1] + cost)
            self._count, self._cost = self._count + len(records), self._cost + cost

    def replay(self, insert: Insert) -> int:
        """Move this process's spooled records into the ledger; returns how many. If `insert` raises,
        the files not yet committed stay for the next try (those committed are gone, or ignored)."""
        with self._replay_lock:
            self._seal()
            replayed = 0
            while self._sealed:
                path, count, cost = self._sealed[0]
                _replay_file(path, insert)
                with self._lock:
                    self._sealed.pop(0)
                    self._count, self._cost = self._count - count, self._cost - cost
                replayed += count
            return replayed

    def replay_orphans(self, insert: Insert) -> int:
        """Replay and delete the spool files of processes that are gone (their lock is free)."""
        if not self.directory.is_dir():
            return 0
        files: dict[str, list[Path]] = {}
        for path in self.directory.glob("*.jsonl"):
            files.setdefault(path.stem.split("-")[0], []).append(path)
        tokens = set(files) | {path.stem for path in self.directory.glob("*.lock")}
        replayed = 0
        for token in sorted(tokens - {self.token}):
            lock = _lock_of(self.directory, token)
            try:
                lock.acquire()
            except Timeout:
                continue  # its process is alive and replays its own files
            try:
                for path in sorted(files.get(token, [])):
                    if path.exists():  # another process may have replayed it since our glob
                        replayed += _replay_file(path, insert)
                _remove(lock)
            finally:
                lock.release()
        return replayed

    def close(self) -> None:
        """Seal our file and give up our lock; files not replayed stay for the next start (orphans now)."""
        self._seal()
        if self._owner_lock.is_locked:
            if not self._count:
                _remove(self._owner_lock)
            self._owner_lock.release()

    def _seal(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                self._sealed.append((self._path(self._sequence), *self._open))
                self._open = (0, 0.0)

    def _path(self, sequence: int) -> Path:
        return self.directory / f"{self.token}-{sequence:06d}.jsonl"


def _lock_of(directory: Path, token: str) -> FileLock:
    return FileLock(directory / f"{token}.lock", timeout=0, thread_local=False)


def _replay_file(path: Path, insert: Insert) -> int:
    """Commit one spool file's records, then delete it (a crash in between replays it again: ignored)."""
    count = 0
    for chunk in _chunks(_read_records(path)):
        insert(chunk)
        count += len(chunk)
    path.unlink()
    log.info("replayed %d spooled ledger records from %s", count, path.name)
    return count


def _remove(lock: FileLock) -> None:
    """Delete a held lock's file once its spool files are gone (the token is never used again)."""
    with contextlib.suppress(OSError):  # Windows cannot delete an open file: it stays, harmless
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
    """The file's records; a torn last line (a crash mid-append, never acknowledged) is skipped."""
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
