"""Production launcher: the gateway under waitress, in one or several processes.

    python serve.py [--host 0.0.0.0] [--port 8081] [--workers 2] [--threads 64]

One Python process runs one core at a time (the GIL). `--workers N` starts N processes that
each bind the same port with SO_REUSEPORT (Linux, BSD, macOS), so the kernel spreads
connections over them and the gateway uses N cores. On Windows, or with `--workers 1`, it is
one process, the same as `waitress-serve app:app`.

What several workers share and what they do not:
- shared: the cost ledger (one SQLite file in WAL mode; its overall total is kept in the file).
- per worker: the response cache and single flight, Flask-Limiter's `memory://` counters (a
  client gets N times the limit: set `RATELIMIT_STORAGE_URI=redis://...` to share them), and
  the log files (worker k writes under `LOG_DIR/worker-k/`, because size-based rotation of one
  file by several processes would lose lines).

The waitress settings are the measured defaults in `WAITRESS_DEFAULTS` (see README).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

WAITRESS_DEFAULTS = {
    # Each in-flight provider call holds a thread for its whole duration (the upstream is slow, the
    # gateway is synchronous): 200 concurrent 1 s calls need about 200 threads across the workers.
    # Measured with 2 workers: 32 threads each gave 48 requests/s on that load, 128 gave 138.
    "threads": 128,
    # waitress stops accepting at connection_limit (default 100) until connections close; 200 slow
    # clients must all be let in.
    "connection_limit": 1000,
    # send_bytes stays at waitress's 18,000: sending as soon as 1 byte is ready (send_bytes=1) cut
    # cache-miss throughput from 419 to 296 requests/s and did not shorten the time to first byte.
}


def _listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def run_worker(host: str, port: int, threads: int, reuse_port: bool) -> None:
    """Serve the app from this process (a worker, or the only process)."""
    from waitress import serve

    import app as gateway_app

    application = gateway_app.app  # built from the environment; exits with a one-line reason if unusable
    settings = {**WAITRESS_DEFAULTS, "threads": threads}
    serve(application, sockets=[_listening_socket(host, port, reuse_port)], **settings)


def run_workers(args) -> int:
    """Serve as worker 0 and start workers 1..N-1 on the same port; stop them when this one stops.

    This process is a worker itself rather than an idle supervisor: that saves a whole
    interpreter (13 MB) on a machine where memory per core is what the gateway is compared on.
    """
    log_dir = Path(os.environ.get("LOG_DIR", "logs"))
    children = []
    for index in range(1, args.workers):
        env = {**os.environ, "LOG_DIR": str(log_dir / f"worker-{index}")}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--host", args.host,
                   "--port", str(args.port), "--threads", str(args.threads)]
        children.append(subprocess.Popen(command, env=env))

    def stop(*_):
        raise SystemExit(0)  # unwinds waitress in this process; `finally` stops the others

    signal.signal(signal.SIGTERM, stop)
    os.environ["LOG_DIR"] = str(log_dir / "worker-0")
    try:
        run_worker(args.host, args.port, args.threads, reuse_port=True)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    from dotenv import load_dotenv

    load_dotenv()  # before HOST, PORT, WORKERS and LOG_DIR are read, as the app itself would load it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8081")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", "1")))
    parser.add_argument("--threads", type=int, default=WAITRESS_DEFAULTS["threads"], help="threads per worker")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    can_share_port = hasattr(socket, "SO_REUSEPORT")
    if args.worker:
        run_worker(args.host, args.port, args.threads, reuse_port=True)
        return 0
    if args.workers > 1 and not can_share_port:
        print("error: --workers > 1 needs SO_REUSEPORT (Linux, BSD, macOS); use one worker here", file=sys.stderr)
        return 2
    if args.workers > 1:
        print(f" * {args.workers} workers serving http://{args.host}:{args.port} (Swagger UI at /swagger/)")
        return run_workers(args)
    print(f" * Serving http://{args.host}:{args.port} (Swagger UI at /swagger/)")
    run_worker(args.host, args.port, args.threads, reuse_port=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
