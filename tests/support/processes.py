"""Servers in separate processes: free ports, a clean environment, waiting until up, stopping.

Used by the start-up, launcher and durability tests and by `bench/`. Everything binds to
127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: app.py, serve.py, gateway/


class ServerDidNotStart(RuntimeError):
    """A launched server exited, or did not answer, before its deadline."""


def free_port() -> int:
    """A port free on 127.0.0.1 right now (another program could take it before it is used)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**settings: str) -> dict[str, str]:
    """This process's environment without gateway settings that would leak into a launched server
    (GEMINI_*, RATELIMIT_*), in demo mode (no key) and development, with unbuffered output; then `settings`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GEMINI_", "RATELIMIT_"))}
    env.update({"GOOGLE_API_KEY": "", "APP_ENV": "development", "PYTHONUNBUFFERED": "1"})
    env.update(settings)
    return env


def _exit_report(process: subprocess.Popen) -> str:
    """How the process ended, with the tail of its stderr when it was captured."""
    with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
        _, err = process.communicate(timeout=5)
        if isinstance(err, bytes):
            err = err.decode("utf-8", "replace")
        if err:
            return f"exited with {process.returncode}: {err[-2000:]}"
    return f"exited with {process.returncode}"


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 30.0) -> bytes:
    """Poll `url` until the server answers with any status; its body. Fails fast if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerDidNotStart(f"{url}: the server {_exit_report(process)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.read()
        except urllib.error.HTTPError as answered:  # up, if not happy with this request
            return answered.read()
        except OSError:
            time.sleep(0.05)
    raise ServerDidNotStart(f"{url} did not answer within {timeout} s")


def wait_for_health(port: int, process: subprocess.Popen, timeout: float = 30.0) -> dict:
    """The gateway's /health answer once the server on `port` gives one."""
    return json.loads(wait_until_up(f"http://127.0.0.1:{port}/api/v1/health", process, timeout))


def stop(process: subprocess.Popen, timeout: float = 10.0) -> tuple[str | None, str | None]:
    """SIGTERM (kill after `timeout` s); the process's remaining (stdout, stderr) if they were piped."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


# --- process trees (Linux /proc; elsewhere a tree is just the launched process) ------------------

def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ... starttime."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks: with the pid, it names one process (pids are reused)."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents first: a launcher may serve itself or supervise workers that do."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue and len(tree) < 1000:
        current = queue.pop(0)
        tree.append(current)
        queue.extend(sorted(children.get(current, [])))
    return tree


def _alive(pid: int, started: str | None) -> bool:
    """The same process (pid and start time) still runs (a zombie does not count)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[19] == started and fields[0] != "Z"


def stop_tree(process: subprocess.Popen) -> None:
    """Stop a launched server and every process it started, even workers its death would orphan."""
    descendants = [(pid, _start_time(pid)) for pid in process_tree(process.pid)[1:]]
    stop(process)
    for signum in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
        alive = [pid for pid, started in descendants if _alive(pid, started)]
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        deadline = time.monotonic() + 5
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [pid for pid, started in descendants if _alive(pid, started)]
