"""Start-up as a user meets it: `python app.py`, `waitress-serve app:app`, demo and production rules.

These run the real entry points in subprocesses on free ports, so they cover what the README's
first command does on a fresh machine.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import ROOT, environment, free_port, stop, wait_for_health

WAITRESS = Path(sys.executable).with_name("waitress-serve")


def serve(command: list[str], port: int, tmp_path: Path, **settings):
    env = environment(LOG_DIR=str(tmp_path / "logs"), **settings)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_python_app_py_serves_demo_mode_and_the_example_passes(tmp_path):
    port = free_port()
    process = serve([sys.executable, str(ROOT / "app.py")], port, tmp_path, HOST="127.0.0.1", PORT=str(port))
    try:
        health = wait_for_health(port, process)
        assert health["mode"] == "demo" and health["provider"] == "demo"  # /health: the upstream, demo or live
        example = subprocess.run(
            [sys.executable, str(ROOT / "example_usage.py"), "--url", f"http://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120,
        )
        assert example.returncode == 0, example.stdout + example.stderr
        assert "Overall: 6/6 checks passed" in example.stdout
    finally:
        out, err = stop(process)
    assert f"Swagger UI available at: http://127.0.0.1:{port}/swagger/" in out
    assert "DEMO MODE" in err


def test_python_app_py_serves_with_waitress_and_the_launchers_settings(tmp_path):
    """Not Werkzeug's development server (a live key may be served on 0.0.0.0): waitress, hardened as serve.py."""
    port = free_port()
    process = serve([sys.executable, str(ROOT / "app.py")], port, tmp_path, HOST="127.0.0.1", PORT=str(port),
                    LOG_CONSOLE="false")
    try:
        wait_for_health(port, process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # refused on its headers alone
            sock.sendall(b"POST /api/v1/generate/text HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 300000000\r\n\r\n")
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 413 and json.loads(response.read())["code"] == "payload_too_large"
            assert response.getheader("Server") is None  # Werkzeug names itself and Python's version
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=10) as health:
            assert health.headers["Server"] is None
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err  # SIGTERM stops it cleanly, logs flushed
    assert f" * Running on http://127.0.0.1:{port}" in out
    assert (tmp_path / "logs" / "api_requests.log").read_text().count("/api/v1/health") >= 2


@pytest.mark.skipif(not WAITRESS.exists(), reason="waitress-serve is not installed beside this Python")
def test_waitress_serve_app_app_serves_the_api(tmp_path):
    port = free_port()
    command = [str(WAITRESS), "--host=127.0.0.1", f"--port={port}", "app:app"]
    process = serve(command, port, tmp_path, PYTHONPATH=str(ROOT))
    try:
        assert wait_for_health(port, process)["mode"] == "demo"
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/generate/text", data=json.dumps({"prompt": "hello"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            assert json.load(response)["provider"] == "gemini"  # the provider that answered (the demo's emulator)
    finally:
        stop(process)


@pytest.mark.skipif(not WAITRESS.exists(), reason="waitress-serve is not installed beside this Python")
def test_sigterm_to_waitress_serve_app_app_writes_every_answered_requests_line(tmp_path):
    """Found by attack: plain `waitress-serve app:app` died on SIGTERM (what `docker stop` sends) without running
    exit handlers, so the requests answered in the log writer's last 20 ms (queued while it lingered) had no line."""
    port = free_port()
    command = [str(WAITRESS), "--host=127.0.0.1", f"--port={port}", "app:app"]
    process = serve(command, port, tmp_path, PYTHONPATH=str(ROOT), LOG_CONSOLE="false")
    answered = []
    try:
        wait_for_health(port, process)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for index in range(60):  # answered in quick succession, the SIGTERM right after the last
            connection.request("GET", f"/api/v1/no-such-path/{index}")
            response = connection.getresponse()
            response.read()
            answered.append(response.getheader("X-Request-ID"))
        connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert process.returncode == 0  # a clean stop: exit handlers ran
    with (tmp_path / "logs" / "api_requests.log").open(encoding="utf-8") as requests_log:
        logged = {json.loads(line)["request_id"] for line in requests_log}
    assert len(answered) == 60 and set(answered) <= logged


@pytest.mark.parametrize("command", [[sys.executable, str(ROOT / "app.py")],
                                     [str(WAITRESS), "--port=0", "app:app"]])
def test_production_without_a_key_refuses_to_start_with_one_line(tmp_path, command):
    result = subprocess.run(command, cwd=tmp_path, env=environment(APP_ENV="production", PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: cannot start: APP_ENV=production needs a provider key: GOOGLE_API_KEY, OPENAI_API_KEY or "
                     "ANTHROPIC_API_KEY "
                     "(demo mode is for development only)"]


def test_a_key_that_does_not_look_like_googles_draws_a_warning(tmp_path):
    port = free_port()
    process = serve([sys.executable, str(ROOT / "app.py")], port, tmp_path, HOST="127.0.0.1", PORT=str(port),
                    GOOGLE_API_KEY="sk-not-a-google-key", GEMINI_BASE_URL="http://127.0.0.1:9")
    try:
        assert wait_for_health(port, process)["mode"] == "live"
    finally:
        _, err = stop(process)
    assert "does not start with 'AIza'" in err
    assert "sk-not-a-google-key" not in err
