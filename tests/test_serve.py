"""serve.py, the production launcher, through real processes: a supervisor and its waitress workers.

Covers the workers sharing one port and one ledger, the waitress settings (poll loop past
descriptor 1023, connections capped below the descriptor limit, bodies over REQUEST_MAX_BYTES
refused before they are read) and supervision (a dead worker is replaced, workers exit when the
supervisor is killed, SIGTERM stops everything cleanly with the logs flushed).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.support.marks import linux_only, posix_only, several_workers
from tests.support.processes import ROOT, environment, free_port, stop, wait_for_health


def health_pid(port: int) -> int:
    """The pid of the worker that answers /health on a new connection."""
    response = requests.get(f"http://127.0.0.1:{port}/api/v1/health", headers={"Connection": "close"}, timeout=10)
    return response.json()["pid"]


def worker_pids(port: int, count: int, attempts: int = 400) -> set[int]:
    """Ask /health on new connections until `count` different workers have answered."""
    seen: set[int] = set()
    for _ in range(attempts):
        seen.add(health_pid(port))
        if len(seen) == count:
            return seen
    raise AssertionError(f"only workers {seen} answered in {attempts} new connections")


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan's reaper may be slow or absent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def port_is_free(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def poll(condition, timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll a condition until it holds or the timeout passes (a bounded wait for a state, not a retry)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def post_task(connection: http.client.HTTPConnection, prompt: str) -> tuple[int, dict]:
    connection.request("POST", "/api/v1/generate/text", body=json.dumps({"prompt": prompt}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def get_health(connection: http.client.HTTPConnection) -> dict:
    connection.request("GET", "/api/v1/health")
    return json.loads(connection.getresponse().read())


def task_lines(log_file: Path) -> int:
    return sum(1 for line in log_file.read_text().splitlines() if json.loads(line)["path"] == "/api/v1/generate/text")


# --- several workers ----------------------------------------------------------------------------

@several_workers
def test_two_workers_share_one_port_and_one_ledger(tmp_path, launch):
    server, port = launch("--workers", "2", "--threads", "8")
    try:
        worker_pids(port, 2)  # both workers serve before the burst starts
        spent, overall = 0.0, []
        for i in range(30):  # new connections: the kernel spreads them over both workers
            response = requests.post(f"http://127.0.0.1:{port}/api/v1/generate/text",
                                     json={"prompt": f"worker check {i}"}, headers={"Connection": "close"},
                                     timeout=30)
            assert response.status_code == 200
            spent += float(response.headers["X-Cost-Total"])
            overall.append(float(response.headers["X-Cost-Overall"]))
        assert overall == sorted(overall)  # one ledger: the running total only grows
        assert overall[-1] == pytest.approx(spent, abs=1e-9)
        stats = requests.get(f"http://127.0.0.1:{port}/api/v1/stats", timeout=10).json()
        assert stats["usage"]["requests"] == 30
    finally:
        out, _ = stop(server)
    assert server.returncode == 0
    assert "2 workers serving" in out
    served = [task_lines(tmp_path / "logs" / worker / "api_requests.log") for worker in ("worker-0", "worker-1")]
    assert sum(served) == 30 and min(served) > 0, served  # each worker served task requests


def _mirror(source: Path, target: Path) -> None:
    """`target` as a link to `source` (a copy where links are not allowed, as on Windows by default)."""
    try:
        target.symlink_to(source, target_is_directory=source.is_dir())
    except OSError:
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def launcher_elsewhere(folder: Path) -> Path:
    """A checkout in `folder` whose launcher files are real copies and the rest links to this one.

    The launcher finds `.env` from where its own files are, and starts its workers through the
    `serve.py` beside them, so those two files must really be in `folder`; the rest is linked."""
    (folder / "gateway").mkdir(parents=True)
    for name in ("serve.py", "gateway/serve.py"):
        shutil.copy2(ROOT / name, folder / name)
    for source in [*ROOT.glob("*.py"), ROOT / "data", *(ROOT / "gateway").iterdir()]:
        target = folder / source.relative_to(ROOT)
        if not target.exists() and source.name != "__pycache__":
            _mirror(source, target)
    return folder


def test_settings_come_from_the_dotenv_file_next_to_the_launcher(tmp_path):
    """`python serve.py` reads the `.env` beside it, not the working folder's: the address, the port,
    LOG_DIR and the ledger it uses are that file's, and a request is served, logged and billed there."""
    checkout = launcher_elsewhere(tmp_path / "checkout")
    port, other_port = free_port(), free_port()
    logs, ledger = tmp_path / "env-logs", tmp_path / "env-ledger.sqlite3"
    (checkout / ".env").write_text(f"HOST=127.0.0.1\nPORT={port}\nLOG_DIR={logs}\nCOST_LEDGER_PATH={ledger}\n"
                                   "RATELIMIT_ENABLED=false\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".env").write_text(f"HOST=127.0.0.1\nPORT={other_port}\nLOG_DIR={tmp_path / 'cwd-logs'}\n")
    env = environment(LOG_CONSOLE="false")
    for name in ("HOST", "PORT", "LOG_DIR", "COST_LEDGER_PATH", "WORKERS"):
        env.pop(name, None)
    server = subprocess.Popen([sys.executable, str(checkout / "serve.py")], cwd=elsewhere, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(port, server)
        answer = requests.post(f"http://127.0.0.1:{port}/api/v1/generate/text", json={"prompt": "from .env"},
                               timeout=30)
        assert answer.status_code == 200, answer.text
        assert port_is_free(other_port)
    finally:
        out, err = stop(server)
    assert server.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in out
    assert task_lines(logs / "api_requests.log") == 1
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        assert db.execute("SELECT request_id FROM cost_records").fetchall() == [(answer.headers["X-Request-ID"],)]
    assert not (tmp_path / "cwd-logs").exists() and not (elsewhere / "logs").exists()


# --- waitress settings (issue 8, items 2, 4) ----------------------------------------------------------

def _raise_own_descriptor_limit(wanted: int) -> None:
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _descriptors_settle(pid: int, quiet: float = 0.5, timeout: float = 30.0) -> int:
    """The process's descriptor count once it has not changed for `quiet` seconds (or after `timeout`)."""
    count, since = len(os.listdir(f"/proc/{pid}/fd")), time.monotonic()
    deadline = since + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = len(os.listdir(f"/proc/{pid}/fd"))
        if now != count:
            count, since = now, time.monotonic()
    return count


def _highest_descriptor(pid: int) -> int:
    return max((int(name) for name in os.listdir(f"/proc/{pid}/fd")), default=0)


@posix_only
@linux_only
def test_a_worker_keeps_serving_with_descriptors_past_1023(tmp_path, launch):
    """Item 2: select() raised ValueError on a descriptor past 1023 and the worker died."""
    _raise_own_descriptor_limit(4096)
    server, port = launch("--threads", "16")
    idle: list[socket.socket] = []
    try:
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        worker = get_health(probe)["pid"]
        with ThreadPoolExecutor(16) as pool:  # a burst of upstream calls opens the worker's own sockets
            assert set(pool.map(lambda i: requests.post(f"http://127.0.0.1:{port}/api/v1/generate/text",
                                                        json={"prompt": f"burst {i}"}, timeout=30).status_code,
                                range(32))) == {200}
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        assert poll(lambda: _highest_descriptor(worker) > 1023), "the worker never held a descriptor past 1023"
        assert post_task(probe, "still serving")[0] == 200
        assert get_health(probe)["pid"] == worker  # the same process: it did not die and get replaced
    finally:
        for sock in idle:
            sock.close()
        _, err = stop(server)
    assert "filedescriptor out of range" not in err
    assert "exited with" not in err


@posix_only
@linux_only
def test_more_connections_than_descriptors_leave_room_for_the_upstream_and_the_server_survives(tmp_path, launch):
    """Connections are capped below the descriptor limit: a flood cannot take the descriptors a task needs."""
    import resource

    limit, reserve = 400, 32
    lower = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # noqa: E731
    server, port = launch("--threads", "8", preexec_fn=lower, GEMINI_MAX_CONNECTIONS=str(reserve),
                          RETRY_MAX_ATTEMPTS="1")
    idle: list[socket.socket] = []
    try:
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        worker = get_health(probe)["pid"]
        before = len(os.listdir(f"/proc/{worker}/fd"))
        for _ in range(limit + 100):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        assert poll(lambda: _descriptors_settle(worker) >= before + 100)  # it has taken all it will take
        status, body = post_task(probe, "a task during the flood")
        assert status == 200, body
        held = len(os.listdir(f"/proc/{worker}/fd"))
        assert held < limit - reserve, f"{held} of {limit} descriptors held: no room left for upstream sockets"
    finally:
        for sock in idle:
            sock.close()
    try:
        assert poll(lambda: health_pid(port) == worker)  # the same worker answers once they close
    finally:
        _, err = stop(server)
    assert "accept() threw an exception" not in err  # it never tried to accept past its descriptors


def _raw_request(port: int, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode("ascii"))
    return sock


def _read_response(sock: socket.socket) -> tuple[int, http.client.HTTPMessage, bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.headers, response.read()


def test_a_body_over_the_limit_is_refused_before_it_is_sent(tmp_path, launch):
    """Item 4: waitress spooled a 300 MB body to a temporary file before the app refused it."""
    server, port = launch()
    try:
        sock = _raw_request(port, "POST /api/v1/generate/text HTTP/1.1\r\nHost: gateway\r\n"
                                  "Content-Type: application/json\r\nContent-Length: 300000000\r\n\r\n")
        with sock:  # not one byte of the body is sent: the answer comes from the headers alone
            status, headers, body = _read_response(sock)
        assert status == 413
        assert headers["Content-Type"] == "application/json"
        error = json.loads(body)
        assert error["code"] == "payload_too_large" and error["request_id"] == headers["X-Request-ID"]
        assert "Server" not in headers and b"waitress" not in body

        sent, chunk = 0, b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        sock = _raw_request(port, "POST /api/v1/generate/text HTTP/1.1\r\nHost: gateway\r\n"
                                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        with sock:
            sock.settimeout(0.5)
            try:
                while sent < 64 * 2**20:  # refused after about 1 MiB, not after 300 MB
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass  # the server closed the connection after answering
            sock.settimeout(10)
            status, _, body = _read_response(sock)
        assert status == 413 and json.loads(body)["code"] == "payload_too_large"
        assert sent < 64 * 2**20

        sock = _raw_request(port, f"GET /api/v1/health HTTP/1.1\r\nHost: gateway\r\nX-Big: {'y' * 300_000}\r\n\r\n")
        with sock:  # waitress's other refusals share the shape
            status, headers, body = _read_response(sock)
        assert status == 431 and json.loads(body)["code"] == "headers_too_large"

        sock = _raw_request(port, "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                                  "Content-Type: application/json\r\nContent-Length: 300000000\r\n\r\n")
        with sock:  # on the OpenAI-compatible surface, in OpenAI's error shape
            status, headers, body = _read_response(sock)
        assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
        assert json.loads(body)["error"]["type"] == "invalid_request_error" and headers["X-Request-ID"]

        at_limit = json.dumps({"prompt": "x"}).ljust(1048576).encode()  # REQUEST_MAX_BYTES itself still passes
        assert requests.post(f"http://127.0.0.1:{port}/api/v1/generate/text", data=at_limit,
                             headers={"Content-Type": "application/json"}, timeout=30).status_code == 200
    finally:
        stop(server)


# --- supervision (issue 8, item 12) -----------------------------------------------------------------

@posix_only
@several_workers
def test_killing_the_supervisor_makes_every_worker_exit(tmp_path, launch):
    server, port = launch("--workers", "2", "--threads", "8")
    workers = worker_pids(port, 2)
    server.kill()  # SIGKILL: no chance to stop its workers itself
    server.wait(timeout=10)
    try:
        assert poll(lambda: not any(is_running(pid) for pid in workers)), "a worker outlived its supervisor"
        assert poll(lambda: port_is_free(port))
    finally:
        for pid in workers:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        server.communicate(timeout=10)


@posix_only
def test_a_dead_worker_is_replaced_with_a_growing_back_off(tmp_path, launch):
    server, port = launch("--threads", "8")  # one worker: supervised too
    try:
        first = health_pid(port)
        os.kill(first, signal.SIGKILL)
        assert poll(lambda: _answering_pid(port) not in (None, first))
        second = health_pid(port)
        os.kill(second, signal.SIGKILL)  # dies young again: the next restart waits longer
        assert poll(lambda: _answering_pid(port) not in (None, second))
        assert server.poll() is None
    finally:
        _, err = stop(server)
    assert server.returncode == 0
    assert f"pid {first}) exited with -9" in err and f"pid {second}) exited with -9" in err
    delays = [line.rsplit("restarting in ", 1)[1] for line in err.splitlines() if "restarting in" in line]
    assert delays == ["0.5 s", "1.0 s"]


def _answering_pid(port: int) -> int | None:
    try:
        return health_pid(port)
    except requests.RequestException:
        return None


@posix_only
def test_sigterm_stops_the_workers_with_their_logs_flushed_and_exits_0(tmp_path, launch):
    server, port = launch("--threads", "8")
    worker = health_pid(port)
    for i in range(5):
        assert requests.post(f"http://127.0.0.1:{port}/api/v1/generate/text", json={"prompt": f"flush {i}"},
                             timeout=30).status_code == 200
    server.send_signal(signal.SIGTERM)
    out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert not is_running(worker)
    assert task_lines(tmp_path / "logs" / "api_requests.log") == 5  # queued log lines were written before exit
    assert port_is_free(port)


@posix_only
def test_a_worker_whose_supervisor_pipe_closes_stops_cleanly(tmp_path):
    """The every-OS path: the worker watches the pipe its supervisor holds (PR_SET_PDEATHSIG is Linux only)."""
    port = free_port()
    env = environment(LOG_CONSOLE="false", LOG_DIR=str(tmp_path / "logs"), COST_LEDGER_PATH=str(tmp_path / "l.db"))
    worker = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--worker", "0", "--host", "127.0.0.1",
                               "--port", str(port), "--threads", "4"], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(port, worker)
        _, err = worker.communicate(timeout=30)  # closes its stdin: as when the supervisor dies
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert "supervisor gone" in err
    assert (tmp_path / "logs" / "api_requests.log").read_text().count("/api/v1/health") >= 1


def test_a_worker_that_cannot_start_stops_the_launcher_with_exit_2(tmp_path):
    with socket.socket() as taken:  # the port is held by another program, without SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", str(port)],
                                cwd=tmp_path, env=environment(LOG_DIR=str(tmp_path / "logs")),
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"error: cannot start: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "restarting" not in result.stderr


def test_bad_settings_stop_the_launcher_with_one_line_before_any_worker_starts(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--port", "0"], cwd=tmp_path,
                            env=environment(APP_ENV="production"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: cannot start: APP_ENV=production needs a provider key: GOOGLE_API_KEY, OPENAI_API_KEY or "
        "ANTHROPIC_API_KEY (demo mode is for development only)"]


@several_workers
def test_a_second_launcher_on_a_port_already_served_exits_2(tmp_path, launch):
    """SO_REUSEPORT would let it bind too and take half the traffic with its own settings."""
    first, port = launch("--workers", "2")
    env = environment(RATELIMIT_ENABLED="false", LOG_CONSOLE="false", LOG_DIR=str(tmp_path / "logs2"),
                      COST_LEDGER_PATH=str(tmp_path / "other.sqlite3"), APP_ENV="testing")
    second = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot start: another serve.py already serves "
                                                   f"127.0.0.1:{port}"), second.stderr
    assert {requests.get(f"http://127.0.0.1:{port}/api/v1/health", headers={"Connection": "close"},
                         timeout=10).json()["environment"] for _ in range(20)} == {"development"}
    stop(first)
    again = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", str(port)],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the lock went with the first launcher
        wait_for_health(port, again)
    finally:
        stop(again)


@pytest.mark.parametrize("arguments, words", [
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--threads", "-1"], "--threads must be at least 1, got -1"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--connection-limit", "0"], "--connection-limit must be at least 1, got 0"),
    (["--port", "99999"], "--port must be between 0 and 65535, got 99999"),
])
def test_launcher_arguments_that_cannot_work_exit_2_with_one_line(tmp_path, arguments, words):
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", "0", *arguments],
                            cwd=tmp_path, env=environment(LOG_DIR=str(tmp_path / "logs")), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [f"error: cannot start: {words}"]


def test_a_worker_that_cannot_build_the_app_stops_the_launcher_with_exit_2(tmp_path):
    """Any failure while building the app would recur on every restart: exit 2, not a restart loop."""
    (tmp_path / "ledger-is-a-folder").mkdir()
    env = environment(LOG_DIR=str(tmp_path / "logs"), LOG_CONSOLE="false",
                      COST_LEDGER_PATH=str(tmp_path / "ledger-is-a-folder"))
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", str(free_port())],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "error: cannot start: OperationalError" in result.stderr and "restarting" not in result.stderr


def test_a_worker_given_a_port_out_of_range_exits_2(tmp_path):
    worker = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--worker", "0", "--host", "127.0.0.1",
                               "--port", "99999"], cwd=tmp_path, env=environment(LOG_DIR=str(tmp_path / "logs")),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker.wait(timeout=30)  # its stdin stays open, as its supervisor's pipe would
    finally:
        if worker.poll() is None:
            worker.kill()
        _, err = worker.communicate()
    assert worker.returncode == 2, err
    assert "error: cannot start: cannot listen on 127.0.0.1:99999" in err
