"""serve.py: several worker processes on one port share the ledger; each keeps its own log files."""

from __future__ import annotations

import socket
import sys

import pytest
import requests

from tests.test_startup import ROOT, environment, free_port, stop, wait_for_health

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="several workers need SO_REUSEPORT")


def test_two_workers_share_one_port_and_one_ledger(tmp_path):
    import subprocess

    port = free_port()
    env = environment(RATELIMIT_ENABLED="false", LOG_CONSOLE="false", LOG_DIR=str(tmp_path / "logs"),
                      COST_LEDGER_PATH=str(tmp_path / "ledger.sqlite3"), GEMINI_POOL_SHARDS="2")
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "2", "--threads", "8"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(port, server)
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
    assert "2 workers serving" in out
    for worker in ("worker-0", "worker-1"):
        assert (tmp_path / "logs" / worker / "api_requests.log").exists()
    served = sum(len((tmp_path / "logs" / w / "api_requests.log").read_text().splitlines())
                 for w in ("worker-0", "worker-1"))
    assert served >= 31  # 30 tasks + stats (+ health checks), split over the two workers


def test_settings_come_from_the_dotenv_file_next_to_the_launcher(tmp_path):
    import shutil
    import subprocess

    checkout = tmp_path / "gateway"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".git", "logs", "*.sqlite3*", ".env",
                                                                  "__pycache__", ".pytest_cache", "bench", "tests"))
    port = free_port()
    (checkout / ".env").write_text(f"HOST=127.0.0.1\nPORT={port}\nLOG_DIR={tmp_path / 'env-logs'}\n"
                                   f"COST_LEDGER_PATH={tmp_path / 'ledger.sqlite3'}\n")
    env = environment(LOG_CONSOLE="false")
    for name in ("HOST", "PORT", "LOG_DIR", "COST_LEDGER_PATH", "WORKERS"):
        env.pop(name, None)
    server = subprocess.Popen([sys.executable, str(checkout / "serve.py")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_health(port, server)["status"] == "ok"
    finally:
        out, _ = stop(server)
    assert f"http://127.0.0.1:{port}" in out
    assert (tmp_path / "env-logs" / "api_requests.log").exists()
