"""Start what a benchmark needs as separate processes on loopback, and measure requests.

The emulator and the gateway each run in their own process (as in production: the gateway
under waitress with APP_ENV=production), so the load generator does not share their GIL.
Everything binds to 127.0.0.1 on free ports and is stopped when the `with` block ends. Ports,
waiting and stopping processes are `tests/support/processes.py`, shared with the tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.support.emulators import emulator_process
from tests.support.processes import ROOT, free_port, process_tree, stop, stop_tree, wait_until_up

BENCH_KEY = "bench-key-not-a-secret"


def memory_kb(pid: int, field: str = "VmHWM") -> int | None:
    """A memory figure of /proc/PID/status in kB (VmHWM: peak resident; VmRSS: resident now)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")), None)


def tree_memory_mb(pid: int, field: str = "VmHWM") -> dict[int, float]:
    """{pid: MB} of `field` for each live process of the tree rooted at `pid`."""
    figures = {p: memory_kb(p, field) for p in process_tree(pid)}
    return {p: round(kb / 1024, 1) for p, kb in figures.items() if kb is not None}


emulator = emulator_process  # a Gemini emulator process; yields its base URL


# The load runs without client API keys (production turns AUTH_ENABLED on by default); what a key
# check adds per request is measured on its own (the report of the access-control issue: microseconds).
ANONYMOUS = {"AUTH_ENABLED": "false", "AUTH_ALLOW_ANONYMOUS": "true"}


@contextlib.contextmanager
def gateway(upstream_url: str, *, threads: int = 16, extra_env: dict | None = None, waitress_args=()):
    """The gateway under waitress with production settings, pointed at `upstream_url`; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as workdir:
        env = {**os.environ, "APP_ENV": "production", "GOOGLE_API_KEY": BENCH_KEY, "GEMINI_BASE_URL": upstream_url,
               "RATELIMIT_TASK_LIMITS": "10000000 per minute", "LOG_CONSOLE": "false", **ANONYMOUS,
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
            stop(process)


@dataclass
class Launched:
    """A running serve.py: its URL, the launched process and the folder holding its ledger and logs."""

    url: str
    process: subprocess.Popen
    workdir: Path

    def pids(self) -> list[int]:
        return process_tree(self.process.pid)


@contextlib.contextmanager
def launcher(upstream: str, *, workers: int, threads: int, prepare=None, extra_env: dict | None = None,
             settle: float | None = None):
    """serve.py with production settings, pointed at `upstream`; yields a `Launched`.

    `prepare(workdir)` runs before the server starts (to prefill its ledger, say); the folder is
    removed afterwards, ledger included.
    """
    port = free_port()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"gateway-bench-{uuid.uuid4().hex[:8]}"
    (workdir / "tmp").mkdir(parents=True)
    env = {**os.environ, "APP_ENV": "production", "GOOGLE_API_KEY": BENCH_KEY, "GEMINI_BASE_URL": upstream,
           "RATELIMIT_TASK_LIMITS": "100000000 per minute", "LOG_CONSOLE": "false", **ANONYMOUS,
           "LOG_DIR": str(workdir / "logs"),
           "COST_LEDGER_PATH": str(workdir / "ledger.sqlite3"), "PYTHONPATH": str(ROOT),
           "TMPDIR": str(workdir / "tmp"), **(extra_env or {})}  # its own TMPDIR: spooled bodies can be seen
    command = [sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers), "--threads", str(threads)]
    try:
        if prepare is not None:
            prepare(workdir)
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(url + "/api/v1/health", process)
            time.sleep((1.0 if workers > 1 else 0.0) if settle is None else settle)  # every worker started
            yield Launched(url, process, workdir)
        finally:
            stop_tree(process)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def quantile(values, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
