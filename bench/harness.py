"""Start what a benchmark needs as separate processes on loopback, and measure requests.

The emulator and the gateway each run in their own process (as in production: the gateway
under waitress with APP_ENV=production), so the load generator does not share their GIL.
Everything binds to 127.0.0.1 on free ports and is stopped when the `with` block ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BENCH_KEY = "bench-key-not-a-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited early with {process.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@contextlib.contextmanager
def emulator(delay: float = 0.0):
    """A Gemini emulator process; yields its base URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "gemini_emulator.py"), "--port", str(port),
                                "--delay", str(delay)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/_emulator/stats", process)
        yield url
    finally:
        stop_process(process)


@contextlib.contextmanager
def gateway(upstream_url: str, *, threads: int = 16, extra_env: dict | None = None, waitress_args=()):
    """The gateway under waitress with production settings, pointed at `upstream_url`; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as workdir:
        env = {**os.environ, "APP_ENV": "production", "GOOGLE_API_KEY": BENCH_KEY, "GEMINI_BASE_URL": upstream_url,
               "RATELIMIT_TASK_LIMITS": "10000000 per minute", "LOG_CONSOLE": "false",
               "LOG_DIR": str(Path(workdir) / "logs"), "COST_LEDGER_PATH": str(Path(workdir) / "ledger.sqlite3"),
               "PYTHONPATH": str(ROOT), **(extra_env or {})}
        command = [str(Path(sys.executable).with_name("waitress-serve")), "--host=127.0.0.1", f"--port={port}",
                   f"--threads={threads}", *waitress_args, "app:app"]
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(url + "/api/v1/health", process)
            yield url, process
        finally:
            stop_process(process)


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def quantile(values, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
