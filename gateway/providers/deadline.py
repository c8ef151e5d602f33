"""One deadline over a whole HTTP exchange with the provider: connect, send, headers, every body byte.

Why: httpx's timeouts bound each socket operation, not the exchange. The SDK hands httpx the
time our retry policy has left as the request's timeout, and httpcore applies it to every
single `recv` (it reads `extensions["timeout"]["read"]` once per phase, headers then body, and
passes that same value to each read). An upstream that sends a valid answer one byte every
0.5 s never trips it: a 5 s deadline held a request 24 s, and a slower drip holds it forever.

How: `DeadlineTransport` wraps httpx's own `HTTPTransport` (the same pool limits, TLS context
and proxy). Per request it fixes `deadline = start + the request's read timeout`, and while it
works on that request (sending it and reading the headers, then each body chunk as the caller
pulls it) it marks that deadline for the current thread. The pool's network backend is wrapped
so every socket connect, write and read waits at most until the marked deadline and fails with
httpcore's own timeout errors once it has passed; httpx reports them as `httpx.ReadTimeout` &c.
(the wrapper's 504), and httpcore closes the connection, as it does after any failed read.

A thread mark rather than a per-connection one: a pooled connection serves many requests in
turn, while httpcore does a request's socket work in the very thread that calls the transport
or pulls the body, inside the calls this module wraps. Cost: a thread-local read and a clock
read per socket operation, a few microseconds per call (see `bench/deadline.py`).

Streams: the SDK opens a stream with the time left as its timeout, so the deadline covers the
whole stream, from opening to the last chunk.

Size: a reply is at most `MAX_REPLY_BYTES`, and uncompressed. Bytes that arrive within the
deadline are not bounded by it, nor is the work after it: on loopback 400 MB came in 1.5 s, then
held the worker (and the GIL) 2 s more in decoding and JSON, and 2 MB of gzip inflated to 6 GB.
So each request asks for `Accept-Encoding: identity`, a body encoded anyway is refused before
anything decodes it, and reading stops past the cap; both raise httpx's `DecodingError` (each
provider's bad answer, 502). The largest genuine replies (65,536 output tokens, a stream's
per-chunk JSON included) are a few MB.
"""

from __future__ import annotations

import functools
import threading
import time
import urllib.request
from types import ModuleType
from urllib.parse import urlsplit


class _Mark(threading.local):
    deadline: float | None = None  # monotonic time by which the current exchange must be done


_mark = _Mark()
MAX_REPLY_BYTES = 64 * 2**20  # of one reply or stream, as sent (uncompressed: see "Size" above)


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    """`timeout` shortened to the time left before this thread's deadline; `error` once it has passed."""
    deadline = _mark.deadline
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the exchange with the provider ran past its deadline")
    return left if timeout is None or left < timeout else timeout


class _DeadlineStream:
    """A network stream (an httpcore connection's socket) whose every operation respects the deadline."""

    __slots__ = ("_stream", "_core")

    def __init__(self, stream, core: ModuleType):
        self._stream, self._core = stream, core

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, self._core.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, self._core.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        tls = self._stream.start_tls(ssl_context, server_hostname, _bounded(timeout, self._core.ConnectTimeout))
        return _DeadlineStream(tls, self._core)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend:
    """httpcore's network backend, handing out deadline-bound streams."""

    def __init__(self, backend, core: ModuleType):
        self._backend, self._core = backend, core

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = self._backend.connect_tcp(host, port, _bounded(timeout, self._core.ConnectTimeout),
                                           local_address, socket_options)
        return _DeadlineStream(stream, self._core)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        stream = self._backend.connect_unix_socket(path, _bounded(timeout, self._core.ConnectTimeout),
                                                   socket_options)
        return _DeadlineStream(stream, self._core)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _DeadlineBody:
    """A response body whose chunks are read under the request's deadline, in whichever call pulls them,
    and only up to `MAX_REPLY_BYTES`."""

    def __init__(self, stream, deadline: float | None, too_large: type[Exception]):
        self._stream, self._deadline, self._too_large = stream, deadline, too_large

    def __iter__(self):
        chunks, size, limit = iter(self._stream), 0, MAX_REPLY_BYTES
        while True:
            previous = _mark.deadline
            _mark.deadline = previous if self._deadline is None else self._deadline
            try:
                chunk = next(chunks, None)
            finally:
                _mark.deadline = previous
            if chunk is None:
                return
            size += len(chunk)
            if size > limit:
                raise self._too_large(f"the provider's reply is larger than {limit} bytes")
            yield chunk

    def close(self) -> None:
        self._stream.close()


@functools.cache
def _body_type(httpx_module: ModuleType) -> type:
    """`_DeadlineBody` as the `SyncByteStream` of the httpx flavour in use (httpx checks the type)."""
    return type("DeadlineBody", (_DeadlineBody, httpx_module.SyncByteStream), {})


class DeadlineTransport:
    """An httpx transport: httpx's `HTTPTransport`, with each request's timeout as a deadline over all of it."""

    def __init__(self, inner, httpx_module: ModuleType, core: ModuleType):
        pool = getattr(inner, "_pool", None)
        if pool is None or not hasattr(pool, "_network_backend"):
            raise RuntimeError("this httpx/httpcore version has no pool network backend to bound: check the pins")
        pool._network_backend = _DeadlineBackend(pool._network_backend, core)
        self.inner = inner
        self._httpx = httpx_module
        self._body = _body_type(httpx_module)

    def handle_request(self, request):
        request.headers["Accept-Encoding"] = "identity"  # see "Size" above
        timeout = (request.extensions.get("timeout") or {}).get("read")
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline is None:
            response = self.inner.handle_request(request)
        else:
            previous, _mark.deadline = _mark.deadline, deadline
            try:
                response = self.inner.handle_request(request)
            finally:
                _mark.deadline = previous
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            response.close()
            raise self._httpx.DecodingError("the provider sent a compressed reply the gateway did not ask for",
                                            request=request)
        response.stream = self._body(response.stream, deadline, self._httpx.DecodingError)
        return response

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> DeadlineTransport:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.inner.__exit__(*exc_info)


def http_modules() -> tuple[ModuleType, ModuleType]:
    """(httpx, httpcore) or (httpx2, httpcore2): whichever the google-genai SDK builds its client on."""
    from google.genai import _api_client

    if _api_client._get_http_client_backend() == "httpx2":
        import httpcore2
        import httpx2

        return httpx2, httpcore2
    import httpcore
    import httpx

    return httpx, httpcore


def build_transport(*, base_url: str, max_connections: int, verify) -> DeadlineTransport:
    """A deadline-bound transport with the pool size and TLS context given, and the proxy httpx would use.

    httpx reads proxies from the environment only when it builds its own transport, so the
    one for `base_url` (HTTPS_PROXY, ALL_PROXY, NO_PROXY, or the system's) is looked up here.
    """
    httpx_module, core = http_modules()
    limits = httpx_module.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    inner = httpx_module.HTTPTransport(verify=verify, limits=limits, proxy=environment_proxy(base_url))
    return DeadlineTransport(inner, httpx_module, core)


def environment_proxy(url: str) -> str | None:
    """The proxy the environment (or the OS settings) names for `url`, as httpx would pick it."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"
