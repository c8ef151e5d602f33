"""Production launcher: the gateway under waitress, in supervised worker processes.

    python serve.py [--host 0.0.0.0] [--port 8081] [--workers 2] [--threads 128] [--connection-limit N]

This process is a light supervisor (no Flask, no gateway): it starts `--workers` worker
processes, restarts one that dies (with a growing back-off, so a crash loop does not spin),
and stops them cleanly on SIGTERM/SIGINT. Each worker serves the app under waitress with the
settings of `waitress_settings` and exits when the supervisor dies, however it dies: on Linux
the kernel sends it SIGTERM (PR_SET_PDEATHSIG), and on every OS it sees the end of the pipe the
supervisor holds on its stdin. Even one worker is supervised: a single crashing process is the
common deployment, and an idle supervisor costs a few megabytes (see README).

One Python process runs one core at a time (the GIL). With several workers each binds the same
port with SO_REUSEPORT (Linux, BSD, macOS), so the kernel spreads connections over them. What
the workers share and what they do not:
- shared: the cost ledger (one SQLite file in WAL mode; its overall total is kept in the file).
- per worker: the response cache and single flight, Flask-Limiter's `memory://` counters (a
  client gets N times the limit: set `RATELIMIT_STORAGE_URI=redis://...` to share them), and
  the log files (worker k writes under `LOG_DIR/worker-k/`, because size-based rotation of one
  file by several processes would lose lines).

`python app.py` serves through `serve_app` too, with the same settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

# Each in-flight provider call holds a thread for its whole duration (the upstream is slow, the
# gateway is synchronous): with 2 workers, 32 threads each gave 48 requests/s on 200 concurrent
# 1 s calls, 128 gave 138.
THREADS = 128
# Connections per worker. waitress's default, 100, let 120 slow clients lock everyone out; 200
# slow clients must all be let in. Higher is not free: waitress's loop walks every connection on
# each wake-up (measured, one worker: /health 1,295 req/s with no idle connections, 489 with
# 1,000, 86 with 4,000). The descriptor limit may lower it further (`connection_limit`).
CONNECTION_LIMIT = 1000
# Seconds a connection may stay silent (no byte either way, no request running) before waitress
# closes it; its default, 120, lets idle or trickling clients hold connection slots four times as long.
CHANNEL_TIMEOUT = 30
# Bytes of a response waitress queues for one connection before the app's thread waits for the
# client: its default, 16 MB, let a streamed ledger export (/usage/export) run that far ahead of a
# slow reader in memory (19 MB measured for a 27 MB export); at 1 MB the export holds about 2 MB.
OUTBUF_HIGH_WATERMARK = 1024 * 1024
# Requests waitress reads ahead on a connection while one runs. Above 0 it keeps reading the socket
# during a request, so a client that closes its connection is seen at once (and told to the app by
# `waitress.client_disconnected`): a stream stops its upstream at the next chunk and is billed 499.
# At 0 (waitress's default) the close was seen only when a write failed, chunks later or never.
CHANNEL_REQUEST_LOOKAHEAD = 1
# Descriptors a worker keeps besides its client connections: stdio, the listening socket and
# waitress's trigger, the ledger (database, WAL, shared memory, readers), log files, imports.
RESERVED_DESCRIPTORS = 64
# Python's select() on Windows takes at most 512 sockets, and waitress falls back to it there.
WINDOWS_SELECT_SOCKETS = 512
EXIT_CANNOT_START = 2  # a worker that exits with this cannot start (bad settings, port taken): not restarted
STOP_GRACE_SECONDS = 15.0  # waitress gives in-flight requests 5 s, then the logs are flushed
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 0.5, 30.0, 30.0  # seconds

log = logging.getLogger("gateway.serve")
LAUNCHER = Path(__file__).resolve().parents[1] / "serve.py"  # workers start through the root door


# --- waitress settings ---------------------------------------------------------------------------

def raise_descriptor_limit() -> int | None:
    """Raise the soft open-file limit towards the hard one; return the soft limit (None on Windows).

    Linux ships a soft limit of 1024 under a much higher hard limit; macOS refuses values above
    its per-process maximum, so smaller targets are tried after the hard limit."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    targets = [hard] if hard != resource.RLIM_INFINITY else []
    for target in [*targets, 1 << 20, 1 << 16, 10240]:
        if soft < target <= (hard if hard != resource.RLIM_INFINITY else target):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return target
            except (ValueError, OSError):
                continue
    return soft


def connection_limit(config, threads: int, descriptor_limit: int | None, wanted: int = CONNECTION_LIMIT) -> int:
    """How many connections waitress may hold without running the process out of descriptors.

    Every thread may hold a descriptor of its own (a ledger reader) and the upstream pool holds
    up to GEMINI_MAX_CONNECTIONS sockets; each connection may hold two (its socket, and a
    temporary file while it receives a body over waitress's 512 KB in-memory buffer)."""
    if descriptor_limit is None:
        return max(1, min(wanted, WINDOWS_SELECT_SOCKETS - 12))
    spare = descriptor_limit - config.gemini_max_connections - threads - RESERVED_DESCRIPTORS
    return max(1, min(wanted, spare // 2))


def waitress_settings(config, *, threads: int = THREADS, connections: int = CONNECTION_LIMIT,
                      descriptor_limit: int | None = None) -> dict:
    """The waitress settings of the launcher and of `python app.py` (README lists the equivalent flags)."""
    return {
        "threads": threads,
        "connection_limit": connection_limit(config, threads, descriptor_limit, connections),
        "asyncore_use_poll": True,  # select() fails on a descriptor past 1023 and the process exits
        # waitress refuses a Content-Length at or above this before reading the body (and stops a
        # chunked body there), so REQUEST_MAX_BYTES itself is still let through to Flask's check.
        "max_request_body_size": config.request_max_bytes + 1,
        "ident": "",  # no Server header
        "channel_timeout": CHANNEL_TIMEOUT,
        "outbuf_high_watermark": OUTBUF_HIGH_WATERMARK,
        "channel_request_lookahead": CHANNEL_REQUEST_LOOKAHEAD,
    }


# The errors waitress answers itself, before the app sees the request (listed in the README's table too).
SERVER_ERRORS = {413: ("payload_too_large", "The request body is larger than the gateway accepts"),
                 431: ("headers_too_large", "The request line and headers are larger than the gateway accepts")}


def _json_error_channel():
    """A waitress channel whose own errors (413, 431, 400 on a malformed request) are our JSON shape.

    They are answered by waitress before the app sees the request, as text/plain by default."""
    import json
    import uuid

    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    from gateway.http import openai_wire
    from gateway.http.security_headers import SERVER_ERROR_HEADERS

    class JsonErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            default = ("invalid_request", "The HTTP request is malformed") if error.code < 500 else \
                ("internal_error", "The request could not be handled")
            code, message = SERVER_ERRORS.get(error.code, default)
            request_id = uuid.uuid4().hex
            payload = {"error": message, "code": code, "details": {}, "request_id": request_id}
            if openai_wire.is_openai_path(getattr(self.request, "path", None) or ""):  # OpenAI's clients: its shape
                payload = openai_wire.error_body(payload, error.code)
            body = json.dumps(payload).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.extend([("Content-Type", "application/json"), ("X-Request-ID", request_id),
                                          *SERVER_ERROR_HEADERS])
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask

    return JsonErrorChannel


def install_stop_handlers() -> None:
    """SIGTERM, SIGINT (and SIGBREAK on Windows) stop serving once: later ones do not cut the shutdown short."""
    names = ("SIGTERM", "SIGINT", "SIGBREAK")

    def stop(signum, _frame):
        for name in names:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        log.info("signal %s: stopping", signum)
        raise SystemExit(0)  # waitress's loop catches it, lets running requests finish (5 s) and returns

    for name in names:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)


def serve_app(application, *, threads: int = THREADS, connections: int = CONNECTION_LIMIT,
              sock: socket.socket | None = None) -> None:
    """Serve a gateway app under waitress until SIGTERM/SIGINT, then flush its logs and close its ledger."""
    from waitress.server import BaseWSGIServer, create_server

    gateway = application.extensions["gateway"]
    config = gateway.config
    descriptors = raise_descriptor_limit()
    settings = waitress_settings(config, threads=threads, connections=connections, descriptor_limit=descriptors)
    listen = {"sockets": [sock]} if sock is not None else {"host": config.host, "port": config.port}
    install_stop_handlers()
    try:
        try:
            server = create_server(application, **listen, **settings)
        except (OSError, OverflowError, ValueError) as exc:
            print(f"error: cannot start: cannot listen on {config.host}:{config.port}: "
                  f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            raise SystemExit(EXIT_CANNOT_START) from None
        channel = _json_error_channel()
        servers = [server] if isinstance(server, BaseWSGIServer) else server.map.values()
        for listener in servers:
            if isinstance(listener, BaseWSGIServer):
                listener.channel_class = channel
        log.info("waitress: threads=%d connection_limit=%d (open-file limit %s) poll=on max_body=%d "
                 "channel_timeout=%d", settings["threads"], settings["connection_limit"], descriptors,
                 config.request_max_bytes, settings["channel_timeout"])
        server.run()  # returns after SIGTERM/SIGINT (waitress catches the SystemExit)
    finally:
        gateway.close()


# --- worker --------------------------------------------------------------------------------------

def _listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    if os.name != "nt":  # on Windows SO_REUSEADDR would let another process take the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def exit_with_supervisor(stdin_fd: int = 0) -> None:
    """End this worker when its supervisor ends, including by SIGKILL.

    Linux: the kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG). Every OS: a thread
    reads the pipe the supervisor holds on our stdin; the supervisor never writes, so the read
    returns only when every writer is gone. (os.getppid() would not do on Windows, which does not
    re-parent orphans.) Either way the worker shuts down as on SIGTERM, logs flushed; if that takes
    longer than the grace period it exits hard."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    def watch() -> None:
        try:
            while os.read(stdin_fd, 1024):
                pass
        except OSError:
            pass
        log.warning("supervisor gone: stopping this worker")
        import _thread

        backstop = threading.Timer(STOP_GRACE_SECONDS, os._exit, (1,))
        backstop.daemon = True  # a clean stop ends the process before it fires
        backstop.start()
        _thread.interrupt_main()  # runs the SIGINT handler in the main thread: a clean stop

    threading.Thread(target=watch, name="supervisor-watchdog", daemon=True).start()


def run_worker(args) -> int:
    """Serve the app from this process, a worker of the supervisor."""
    install_stop_handlers()
    exit_with_supervisor()
    try:
        sock = _listening_socket(args.host, args.port, reuse_port=args.workers > 1)
    except (OSError, OverflowError, ValueError) as exc:  # a port out of range is an OverflowError
        print(f"error: cannot start: cannot listen on {args.host}:{args.port}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return EXIT_CANNOT_START
    import app as gateway_app

    try:
        application = gateway_app.app  # exits with EXIT_CANNOT_START and a one-line reason if unusable
    except Exception as exc:  # noqa: BLE001 - whatever stops the app being built, a restart would hit it again
        log.exception("cannot build the app")
        print(f"error: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    serve_app(application, threads=args.threads, connections=args.connection_limit, sock=sock)
    return 0


# --- supervisor ----------------------------------------------------------------------------------

class Supervisor:
    """Keeps `count` workers running; a dead one is restarted after a back-off that doubles while it
    keeps dying young (BACKOFF_FIRST .. BACKOFF_MAX) and resets once one has lived HEALTHY_AFTER."""

    def __init__(self, args, count: int) -> None:
        self.args, self.count = args, count
        self.stopping = threading.Event()
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.started = [0.0] * count
        self.restart_at = [0.0] * count
        self.failures = [0] * count

    def _start(self, index: int) -> None:
        env = dict(os.environ)
        if self.count > 1:
            env["LOG_DIR"] = str(Path(os.environ.get("LOG_DIR", "logs")) / f"worker-{index}")
        args = self.args
        command = [sys.executable, str(LAUNCHER), "--worker", str(index), "--workers", str(self.count),
                   "--host", args.host, "--port", str(args.port), "--threads", str(args.threads),
                   "--connection-limit", str(args.connection_limit)]
        flags = subprocess.CREATE_NEW_PROCESS_GROUP if os.name == "nt" else 0  # so CTRL_BREAK reaches only it
        self.processes[index] = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, creationflags=flags)
        self.started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, self.processes[index].pid)

    def run(self) -> int:
        for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), lambda signum, _frame: self.stopping.set())
        for index in range(self.count):
            self._start(index)
        while not self.stopping.is_set():
            if self._tend() == EXIT_CANNOT_START:
                log.error("a worker cannot start: stopping")
                self._stop_all()
                return EXIT_CANNOT_START
            self.stopping.wait(0.5)
        log.info("stopping %d worker(s)", self.count)
        return self._stop_all()

    def _tend(self) -> int | None:
        """Notice dead workers and start the ones whose back-off is over; EXIT_CANNOT_START if one cannot start."""
        now = time.monotonic()
        for index, process in enumerate(self.processes):
            if process is not None and process.poll() is not None:
                if process.returncode == EXIT_CANNOT_START:
                    return EXIT_CANNOT_START
                lived = now - self.started[index]
                self.failures[index] = 0 if lived >= HEALTHY_AFTER else self.failures[index] + 1
                delay = 0.0 if not self.failures[index] else \
                    min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures[index] - 1))
                log.warning("worker %d (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                            index, process.pid, process.returncode, lived, delay)
                process.stdin.close()
                self.processes[index], self.restart_at[index] = None, now + delay
            if self.processes[index] is None and now >= self.restart_at[index]:
                self._start(index)
        return None

    def _stop_all(self) -> int:
        """SIGTERM every worker (CTRL_BREAK on Windows), wait for them, kill what outlives the grace: 0 or 1."""
        alive = [process for process in self.processes if process is not None and process.poll() is None]
        for process in alive:
            process.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGTERM)
        deadline, code = time.monotonic() + STOP_GRACE_SECONDS, 0
        for process in alive:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in %.0f s: killed", process.pid, STOP_GRACE_SECONDS)
                process.kill()
                process.wait()
                code = 1
        return code


def main(argv: list[str] | None = None) -> int:
    from dotenv import load_dotenv

    load_dotenv()  # before HOST, PORT, WORKERS and LOG_DIR are read, as the app itself would load it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8081")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))
    parser.add_argument("--threads", type=int, default=THREADS, help="threads per worker")
    parser.add_argument("--connection-limit", type=int, default=CONNECTION_LIMIT,
                        help="connections per worker (lowered to fit the descriptor limit)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return run_worker(args)  # logging is configured by the app, from LOG_LEVEL
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = _argument_problem(args)
    if problem:
        print(f"error: cannot start: {problem}", file=sys.stderr)
        return EXIT_CANNOT_START
    if args.workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        print("error: --workers > 1 needs SO_REUSEPORT (Linux, BSD, macOS); use one worker here", file=sys.stderr)
        return EXIT_CANNOT_START
    from gateway.config import Config, ConfigError

    try:
        Config.load()  # one line now rather than one per worker
    except ConfigError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    port_lock = _port_lock(args.host, args.port)  # port 0: each launcher gets its own port, nothing to share
    try:
        if args.port:
            port_lock.acquire()
    except Timeout:
        print(f"error: cannot start: another serve.py already serves {args.host}:{args.port} "
              f"(it holds {port_lock.lock_file})", file=sys.stderr)
        return EXIT_CANNOT_START
    try:
        what = f"{args.workers} workers serving" if args.workers > 1 else "Serving"
        print(f" * {what} http://{args.host}:{args.port} (Swagger UI at /swagger/)", flush=True)
        return Supervisor(args, args.workers).run()
    finally:
        if port_lock.is_locked:
            port_lock.release()


def _argument_problem(args) -> str | None:
    """Why these launcher arguments cannot work (checked once, before any worker starts), or None."""
    if not 0 <= args.port <= 65535:
        return f"--port must be between 0 and 65535, got {args.port}"
    for name in ("workers", "threads", "connection_limit"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    return None


def _port_lock(host: str, port: int) -> FileLock:
    """A lock the supervisor holds while it serves host:port. Workers share the port with SO_REUSEPORT,
    which would also let a second launcher (same user) bind it and take half the traffic with its own
    settings; the lock refuses that launcher instead. The OS frees it when the supervisor dies."""
    name = re.sub(r"[^A-Za-z0-9.-]", "_", host or "all") + f"-{port}"
    return FileLock(Path(tempfile.gettempdir()) / f"llm-gateway-serve-{name}.lock", timeout=0, thread_local=False)


