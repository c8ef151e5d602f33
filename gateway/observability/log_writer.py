"""The log writer thread: plain fields in, redacted JSON lines (and console summaries) out.

Why it looks like this:

- A request thread's whole share of logging is one `SimpleQueue.put` of values it already has
  (dicts of plain fields and a `time.time()` stamp). Redaction, JSON encoding, the console summary,
  rotation and the writes all happen here, on one thread per `LogWriter`: measured on a cache hit,
  the request thread's logging went from about 125 µs (three lines formatted there) to 2-3 µs.
- One finished request is one queued item (`FINISHED`): its summary line, and its performance and
  cost lines when it has them, expanded here into the same lines in the same files as before.
- Files are flushed when the queue runs empty, not after every line. Then the thread lingers
  (`LINGER_SECONDS`, 20 ms) before it looks again, so under load one wake-up, one GIL hand-over and
  one flush per file cover a batch of requests; when idle, the next line wakes it at once. A line
  reaches its file at most about 20 ms after its request ended, plus the time to write the batch.
  `flush()` waits for everything queued before it; `close()` drains the queue and closes the files.
- A line that cannot be written (a field whose `str()` raises, a dict key JSON refuses) is replaced
  by a stand-in line naming the failure and is reported through Python logging; the thread goes on
  with the next one, so one bad field never costs later lines.
- The queue is unbounded, as the `QueueListener`'s was: a writer slower than the requests for a long
  time would grow memory rather than slow requests down or drop lines.

It knows nothing of Flask or of what the fields mean beyond `status` (a request line's level) and
the few fields the console summary shows; the redactor comes from `enhanced_logging.py`.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

LOG_FILES: dict[str, str] = {  # channel -> file name under the log folder
    "requests": "api_requests.log",
    "security": "security_audit.log",
    "errors": "api_errors.log",
    "performance": "performance.log",
    "cost": "cost_tracking.log",
}
EVENTS: dict[str, str] = {"requests": "request", "security": "security", "errors": "error",
                          "performance": "performance", "cost": "cost"}  # channel -> the lines' `event`
FINISHED = "finished"  # the channel of one finished request's item: (request, performance or None, cost or None)
_STOP = object()
# After writing all it found, the thread waits this long before looking again (unless flush() or close() calls),
# so that under load it wakes once per batch of requests, not once per request. Measured on the hit path
# (bench.request_profile): the writer's CPU per request 105-120 µs without it, 45-55 µs at 20 ms, 40 µs at
# 100 ms, and the request thread 80-100 µs less (fewer GIL hand-overs). An idle thread still wakes at once.
LINGER_SECONDS = 0.02

log = logging.getLogger("gateway.logs")


class Redacts(Protocol):
    def redact(self, value: Any) -> Any: ...


class JsonLinesFile(logging.handlers.RotatingFileHandler):
    """A size-rotated JSON-lines file that counts the bytes it writes and flushes only when told.

    The standard handler formats every record a second time to decide on rotation, stats the file
    twice and seeks to its end per line (Python 3.11.7), and flushes after each line. This one keeps
    the standard rotation (names, backups) but writes lines straight to the stream. Like the
    standard handler it never rotates what is not a regular file: a log path linked to /dev/stdout,
    a pipe or /dev/null (as containers do) is written to and left in place.
    """

    def __init__(self, path: Path, *, max_bytes: int, backup_count: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8",
                         errors="backslashreplace", delay=False)
        self._rotates = max_bytes > 0 and os.path.isfile(self.baseFilename)
        self._size = self.stream.tell() if self._rotates else 0  # opened in append mode: the current size

    def write_line(self, line: str) -> None:
        """Append one line (rotating first if it would not fit); the caller flushes."""
        size = (len(line) if line.isascii() else len(line.encode("utf-8", "backslashreplace"))) + 1
        if self.stream is None:  # a rollover that could not reopen (no descriptor left...): reopen, never rotate again
            self.stream = self._open()
            self._size = self.stream.tell() if self._rotates else 0
        elif self._rotates and self._size and self.maxBytes < self._size + size:
            self.doRollover()
            self._size = 0
        self.stream.write(line + "\n")
        self._size += size


class LogWriter:
    """One background thread writing the JSON-lines files of one log folder. `put` is safe from any thread."""

    def __init__(self, log_dir: Path, *, redactor: Redacts, max_bytes: int, backup_count: int,
                 console: TextIO | None = None, console_level: int = logging.INFO,
                 linger: float = LINGER_SECONDS) -> None:
        self.redactor = redactor
        self.files = {channel: JsonLinesFile(log_dir / name, max_bytes=max_bytes, backup_count=backup_count)
                      for channel, name in LOG_FILES.items()}
        self._console, self._console_level = console, console_level
        self._console_lines: list[str] = []
        self._dirty: set[JsonLinesFile] = set()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # never queue behind close()'s stop marker: that item would be lost
        self._closed = False
        self._linger = linger
        self._wake = threading.Event()  # set by flush() and close(): stop lingering
        self._thread = threading.Thread(target=self._run, name=f"log-writer {log_dir}", daemon=True)
        self._thread.start()

    # --- the request threads' side -------------------------------------------------------

    def put(self, item: tuple[float, str, Any]) -> None:
        """Queue (time.time(), channel, fields) -- or (time.time(), FINISHED, (request, performance, cost)).
        The dicts are handed over: the caller must not change them afterwards. Ignored after close()."""
        with self._lock:
            if not self._closed:
                self._queue.put(item)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until everything queued before this call is written and flushed; False if `timeout` ran out."""
        done = threading.Event()
        with self._lock:
            if self._closed:
                return True
            self._queue.put(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self) -> None:
        """Write everything queued, stop the thread, close the files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._wake.set()
        self._thread.join()
        for file in self.files.values():
            try:
                file.close()
            except Exception:  # noqa: BLE001 - a full disk fails the last flush: close the rest, let the caller go on
                log.exception("could not close %s", file.baseFilename)

    # --- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        item = self._queue.get()
        while True:
            while item is not None:  # write it and everything queued behind it
                if item is _STOP:
                    self._flush()
                    return
                if item.__class__ is tuple:
                    try:
                        self._write_item(item)
                    except Exception:  # noqa: BLE001 - a malformed item: report it, keep the thread for the next
                        log.exception("a queued log item could not be written")
                elif isinstance(item, threading.Event):  # a flush() marker: all before it is written
                    self._flush()
                    item.set()
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            self._flush()  # the queue ran empty: what was written goes out now
            if self._linger:  # let the next requests' items gather (flush() and close() cut this short)
                self._wake.wait(self._linger)
                self._wake.clear()
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                item = self._queue.get()  # idle: the next item wakes the thread at once

    def _write_item(self, item: tuple[float, str, Any]) -> None:
        created, channel, fields = item
        stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if channel == FINISHED:
            request, performance, cost = fields
            if cost is not None:
                self._write_line(created, stamp, "cost", cost)
            if performance is not None:
                self._write_line(created, stamp, "performance", performance)
            self._write_line(created, stamp, "requests", request)
        else:
            self._write_line(created, stamp, channel, fields)

    def _write_line(self, created: float, stamp: str, channel: str, fields: Mapping[str, Any]) -> None:
        event = EVENTS[channel]
        clean = None
        try:
            clean = self.redactor.redact(fields)
            clean.pop("ts", None)  # the line's own fields come first and cannot be overridden
            clean.pop("event", None)
            entry = {"ts": stamp, "event": event}
            entry.update(clean)
            line = json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":"))
        except Exception as exc:  # noqa: BLE001 - one bad field must not cost this line's place, nor later lines
            log.exception("a %s log line could not be encoded; a stand-in line was written instead", event)
            line = self._stand_in(stamp, event, fields, exc)
            clean = None
        file = self.files[channel]
        try:
            file.write_line(line)
        except Exception:  # noqa: BLE001 - as logging does: report, never stop the writer thread
            log.exception("could not write to %s", file.baseFilename)
        self._dirty.add(file)
        if self._console is not None and clean is not None and channel in _CONSOLE:
            try:
                level = _level(channel, clean)
                if level >= self._console_level:
                    self._console_lines.append(f"{_local_time(created)} {logging.getLevelName(level)} "
                                               f"{_CONSOLE[channel](clean)}\n")
            except Exception:  # noqa: BLE001 - the file has the line; the console only misses its summary
                log.exception("a console summary could not be formatted")

    def _stand_in(self, stamp: str, event: str, fields: Any, exc: Exception) -> str:
        """The line written instead of one that could not be encoded: when, what, which request, why."""
        request_id = fields.get("request_id") if isinstance(fields, Mapping) else None
        entry = {"ts": stamp, "event": event,
                 "request_id": self.redactor.redact(request_id) if isinstance(request_id, str) else None,
                 "log_error": f"{type(exc).__name__}: this line's fields could not be written"}
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))

    def _flush(self) -> None:
        for file in self._dirty:
            try:
                file.flush()
            except Exception:  # noqa: BLE001
                log.exception("could not flush %s", file.baseFilename)
        self._dirty.clear()
        if self._console_lines:
            text, self._console_lines = "".join(self._console_lines), []
            try:
                self._console.write(text)
                self._console.flush()
            except (OSError, ValueError):  # a closed or broken stderr: the files still have every line
                pass


def _level(channel: str, fields: Mapping[str, Any]) -> int:
    if channel == "errors":
        return logging.ERROR
    status = fields.get("status")
    if isinstance(status, int):
        return logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    return logging.INFO


def _local_time(created: float) -> str:
    """What logging's %(asctime)s shows: local time, comma, milliseconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + f",{int(created % 1 * 1000):03d}"


def _one_line(value: Any, limit: int = 200) -> str:
    return " ".join(str(value).split())[:limit]


def _request_summary(fields: Mapping[str, Any]) -> str:
    head = " ".join(str(fields[k]) for k in ("method", "path", "status") if k in fields)
    if "latency_ms" in fields:
        head += f" {fields['latency_ms']}ms"
    extras = " ".join(f"{k}={_one_line(fields[k], 80)}" for k in ("request_id", "client", "model", "tokens", "cost",
                                                                  "cached") if k in fields)
    return f"{head} {extras}".strip()


def _error_summary(fields: Mapping[str, Any]) -> str:
    return f"error request_id={fields.get('request_id')} {fields.get('error_type')}: {_one_line(fields.get('message'))}"


_CONSOLE = {"requests": _request_summary, "errors": _error_summary}  # the channels with a console summary
