"""A lean HTTP/1.1 load generator: keep-alive sockets with TCP_NODELAY, prebuilt request bytes.

A general-purpose client (requests, httpx) spends more CPU per request than the gateway's hot
path, and on a 2-core machine that CPU is taken from the server being measured. This one
writes prebuilt bytes and parses just enough of the response (status, Content-Length or
chunked framing). Closed loop: each client sends its next request when the previous answer
has arrived. Bounded by a request count or a duration, loopback only.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


def build_post(url: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    return build_request("POST", url, body, {"Content-Type": "application/json", **(headers or {})})


def build_request(method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one HTTP/1.1 request; the URL's path is sent as it is (no re-encoding)."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}"]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: keep-alive")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive connection; `exchange` sends a request and reads the whole response."""

    def __init__(self, url: str, timeout: float = 30.0):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.headers: dict[str, str] = {}  # of the last response, names in lower case

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    def _read_until(self, marker: bytes) -> bytes:
        while (index := self.buffer.find(marker)) < 0:
            self._fill()
        head, self.buffer = self.buffer[:index], self.buffer[index + len(marker):]
        return head

    def _read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def exchange(self, request: bytes, on_first_body_byte: Callable[[], None] | None = None) -> tuple[int, bytes]:
        """Send `request`; return (status, body). `on_first_body_byte` marks time to first byte."""
        self.sock.sendall(request)
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status = int(head.split(" ", 2)[1])
        headers = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
                   for line in head.split("\r\n")[1:] if ":" in line}
        self.headers = headers
        if "content-length" in headers:
            if on_first_body_byte and int(headers["content-length"]):
                if not self.buffer:
                    self._fill()
                on_first_body_byte()
            return status, self._read_exactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")
                    return status, b"".join(chunks)
                if on_first_body_byte and not chunks:
                    on_first_body_byte()
                chunks.append(self._read_exactly(size))
                self._read_exactly(2)
        body = self.buffer  # no framing: read to close (HTTP/1.0 style)
        self.buffer = b""
        while data := self.sock.recv(65536):
            body += data
        return status, body


@dataclass
class LoadResult:
    """Latencies in ms of successful requests, error count, wall time of the run."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


def _is_answer(status: int, expect: int | None) -> bool:
    """A counted answer: `expect` when given (a 404 row measures 404s), else any 2xx."""
    return status == expect if expect is not None else 200 <= status < 300


def run_sequential(url: str, make_request: Callable[[int], bytes], count: int,
                   expect: int | None = None) -> LoadResult:
    result, connection = LoadResult(), Connection(url)
    started = time.perf_counter()
    try:
        for i in range(count):
            request = make_request(i)
            sent = time.perf_counter()
            status, _ = connection.exchange(request)
            if _is_answer(status, expect):
                result.latencies_ms.append((time.perf_counter() - sent) * 1000)
            else:
                result.errors += 1
    finally:
        connection.close()
    result.seconds = time.perf_counter() - started
    return result


def run_concurrent(url: str, make_request: Callable[[int], bytes], clients: int, seconds: float,
                   timeout: float = 30.0, expect: int | None = None) -> LoadResult:
    """`clients` closed-loop clients for `seconds`; requests still in flight at the end are not counted.

    Answers with another status than `expect` (default: any 2xx) count as errors."""
    result, lock = LoadResult(), threading.Lock()
    counter = iter(range(10**9))
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client() -> None:
        latencies, errors = [], 0
        try:
            connection = Connection(url, timeout)
        except OSError:
            start.wait()
            with lock:
                result.errors += 1
            return
        start.wait()
        while True:
            request = make_request(next(counter))
            sent = time.perf_counter()
            if sent >= stop_at[0]:
                break
            try:
                status, _ = connection.exchange(request)
            except OSError:
                errors += 1
                connection.close()
                try:
                    connection = Connection(url, timeout)
                except OSError:
                    break
                continue
            done = time.perf_counter()
            if done > stop_at[0]:
                break
            if _is_answer(status, expect):
                latencies.append((done - sent) * 1000)
            else:
                errors += 1
        connection.close()
        with lock:
            result.latencies_ms.extend(latencies)
            result.errors += errors

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join(timeout + seconds + 5)
    result.seconds = min(time.perf_counter() - started, seconds)
    return result


def time_to_first_byte(url: str, make_request: Callable[[int], bytes], count: int) -> list[float]:
    """Sequential requests, ms from sending each to its first body byte (for streams: the first event).

    A fresh connection each time, for every server alike: waitress closes the connection after
    a chunked (streamed) response, so keep-alive is not on offer there.
    """
    samples = []
    for i in range(count):
        connection, request, mark = Connection(url), make_request(i), []
        try:
            sent = time.perf_counter()
            status, _ = connection.exchange(request, on_first_body_byte=lambda m=mark: m.append(time.perf_counter()))
        finally:
            connection.close()
        if 200 <= status < 300 and mark:
            samples.append((mark[0] - sent) * 1000)
    return samples
