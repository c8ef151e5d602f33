"""Measuring tools of the hostile-input benchmark: a /health prober, one timed request, a slow upload.

All on loopback, each bounded by a client timeout, a count or a duration.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.harness import quantile
from bench.loadgen import Connection, build_request

HEALTH = "/api/v1/health"


# --- /health from another thread ----------------------------------------------------------------

class HealthProbe:
    """GET /health from its own thread, one fresh connection per probe, until the `with` block ends.

    A probe still waiting 1 s after the block ends is cut short and counted with the time it had
    waited (a lower bound), so a frozen server cannot hide behind the end of the case.
    """

    def __init__(self, url: str, timeout: float, interval: float = 0.05, max_probes: int = 100_000):
        self.url, self.timeout, self.interval, self.max_probes = url + HEALTH, timeout, interval, max_probes
        self.latencies_ms: list[float] = []
        self.failed = self.unfinished = 0
        self._stop = threading.Event()
        self._current: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(1.0)  # a probe in flight on a healthy server finishes well within this
        current = self._current
        if current is not None:
            with contextlib.suppress(OSError):
                current.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        request = build_request("GET", self.url)
        for _ in range(self.max_probes):
            if self._stop.is_set():
                return
            sent = time.perf_counter()
            try:
                self._current = Connection(self.url, self.timeout)
                status, _ = self._current.exchange(request)
            except OSError:
                status = None
            finally:
                if self._current is not None:
                    self._current.close()
                self._current = None
            waited = (time.perf_counter() - sent) * 1000
            if status == 200:
                self.latencies_ms.append(waited)
            elif self._stop.is_set():
                self.unfinished += 1
                self.latencies_ms.append(waited)
            else:
                self.failed += 1
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        values = self.latencies_ms
        return {"probes": len(values) + self.failed, "p50_ms": round_ms(statistics.median(values)) if values else None,
                "p99_ms": round_ms(quantile(values, 0.99)) if values else None,
                "max_ms": round_ms(max(values)) if values else None,
                "failed": self.failed, "unfinished": self.unfinished}


# --- one request, timed --------------------------------------------------------------------------

def timed_exchange(url: str, request: bytes, timeout: float) -> dict:
    """Send `request` on a fresh connection: {"status": code | "timeout" | "closed", "seconds", "body_bytes"}."""
    started = time.perf_counter()
    connection = None
    try:
        connection = Connection(url, timeout)
        status, body = connection.exchange(request)
        outcome = {"status": status, "body_bytes": len(body),
                   "server_ms": as_float(connection.headers.get("x-response-time-ms"))}
    except TimeoutError:
        outcome = {"status": "timeout"}
    except OSError:
        outcome = {"status": "closed"}
    finally:
        if connection is not None:
            connection.close()
    return {**outcome, "seconds": round(time.perf_counter() - started, 3)}


def spooled_bytes(pids: list[int], directory: Path) -> int:
    """Bytes in the files under `directory` that the processes hold open (deleted temp files included)."""
    total, prefix = 0, str(directory)
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(path).startswith(prefix):
                    total += os.stat(path).st_size
            except OSError:
                continue
    return total


def slow_upload(url: str, *, announced: int, max_bytes: int, rate: float, max_seconds: float, answer_wait: float,
                sample=lambda: 0) -> dict:
    """POST to `url` announcing `announced` bytes; send at most `max_bytes` at about `rate` bytes/s for at most
    `max_seconds`, watching for an answer before each chunk, then wait `answer_wait` s for one.

    `sample()` is called now and then (the server's spooled bytes); its largest value is reported.
    """
    head = build_request("POST", url, headers={"Content-Type": "application/json"})
    head = head.replace(b"Content-Length: 0", f"Content-Length: {announced}".encode())
    chunk = b"[" + b"1," * 32767 + b"1"  # 64 KiB of valid-looking JSON
    sent, answer, answered_at, peak, started = 0, None, None, 0, time.perf_counter()
    sock = socket.create_connection(_address(url), timeout=5)
    try:
        sock.sendall(head)
        last_sample = 0.0
        while sent < max_bytes and time.perf_counter() - started < max_seconds:
            if select.select([sock], [], [], 0)[0]:
                answer, answered_at = _read_answer(sock), time.perf_counter()
                break
            piece = chunk[:max_bytes - sent]
            try:
                sock.sendall(piece)
            except TimeoutError:
                break  # the server stopped reading: see whether it answers
            except OSError:
                answer, answered_at = "closed", time.perf_counter()
                break
            sent += len(piece)
            if time.perf_counter() - last_sample > 0.2:
                peak, last_sample = max(peak, sample()), time.perf_counter()
            time.sleep(max(0.0, started + sent / rate - time.perf_counter()))
        sending_done = time.perf_counter()
        if answer is None:
            peak = max(peak, sample())
            if select.select([sock], [], [], answer_wait)[0]:
                answer, answered_at = _read_answer(sock), time.perf_counter()
        peak = max(peak, sample())
    finally:
        sock.close()
    return {"announced_bytes": announced, "body_bytes_sent": sent, "answer": answer or "no answer",
            "answered_after_s": None if answered_at is None else round(answered_at - started, 3),
            "sending_seconds": round(sending_done - started, 3), "peak_spooled_bytes": peak}


def _read_answer(sock: socket.socket) -> str:
    try:
        data = sock.recv(4096)
    except OSError:
        return "closed"
    if not data:
        return "closed"
    first = data.split(b"\r\n", 1)[0].decode("latin-1").split()
    return first[1] if len(first) > 1 else "closed"


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def round_ms(value: float) -> float:
    return round(value, 1)


def as_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
