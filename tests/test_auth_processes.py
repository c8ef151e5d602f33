"""API keys across real processes: the `flask --app app keys` CLI, a production server, two workers.

- In production a request without a key is a 401; with a key made by the CLI it is a 200, its
  ledger row carries the key id, and `keys usage` shows it.
- A key revoked through one worker is refused at once by the other (serve.py --workers 2).
- No key, key hash or Authorization value reaches a log file or stderr.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from gateway.auth.keys import KeyStore, hash_key
from tests.support.emulators import TEST_KEY
from tests.support.marks import several_workers
from tests.support.processes import ROOT, environment, free_port, stop, wait_for_health

FLASK = Path(sys.executable).with_name("flask")


def flask_keys(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`flask --app app keys ...` as an operator runs it (from another folder, with the checkout importable)."""
    return subprocess.run([str(FLASK), "--app", "app", "keys", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=60)


def secrets_in_outputs(log_dir: Path, texts: list[str], secrets: list[str]) -> list[str]:
    """Which of `secrets` (and their hashes) appear in any file under `log_dir` or in `texts`."""
    haystacks = [path.read_text(encoding="utf-8", errors="replace") for path in log_dir.rglob("*") if path.is_file()]
    haystacks += texts
    needles = [*secrets, *(hash_key(secret) for secret in secrets)]
    return [needle[:12] for needle in needles if any(needle in haystack for haystack in haystacks)]


def test_production_needs_a_key_and_a_cli_made_key_is_billed_and_shown_by_keys_usage(tmp_path, emulator):
    ledger, logs = tmp_path / "ledger.sqlite3", tmp_path / "logs"
    port = free_port()
    env = environment(APP_ENV="production", GOOGLE_API_KEY=TEST_KEY, GEMINI_BASE_URL=emulator.base_url,
                      COST_LEDGER_PATH=str(ledger), LOG_DIR=str(logs), HOST="127.0.0.1", PORT=str(port))
    made = flask_keys(tmp_path, env, "create", "--name", "cli-made", "--owner", "ops", "--budget", "25",
                      "--limit", "100/minute", "--tasks", "text,code", "--expires", "2999-01-01")
    assert made.returncode == 0, made.stderr
    fields = dict(line.split(": ", 1) for line in made.stdout.splitlines())
    key_id, secret = fields["id"].strip(), fields["key"].strip()

    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(port, server)
        url = f"http://127.0.0.1:{port}/api/v1/generate/text"
        refused = requests.post(url, json={"prompt": "hello"}, timeout=30)
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = requests.post(url, json={"prompt": "hello"}, headers={"X-API-Key": "mtk_" + "w" * 43}, timeout=30)
        assert wrong.status_code == 401
        answered = requests.post(url, json={"prompt": "hello"}, headers={"Authorization": f"Bearer {secret}"},
                                 timeout=30)
        assert answered.status_code == 200, answered.text
        stats = requests.get(f"http://127.0.0.1:{port}/api/v1/stats", headers={"X-API-Key": secret}, timeout=30)
        assert stats.status_code == 403  # a user key; the full stats are an admin's
    finally:
        out, err = stop(server)

    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT key_id, status FROM cost_records").fetchall() == [(key_id, 200)]
    usage = flask_keys(tmp_path, env, "usage", key_id)
    assert usage.returncode == 0, usage.stderr
    shown = json.loads(usage.stdout)
    assert shown["key_id"] == key_id and shown["requests"] == 1 and shown["monthly_budget_usd"] == 25
    assert shown["cost_usd"] == pytest.approx(float(answered.headers["X-Cost-Total"]))
    listed = flask_keys(tmp_path, env, "list")
    assert key_id in listed.stdout and "cli-made" in listed.stdout and secret not in listed.stdout
    bad = flask_keys(tmp_path, env, "usage", key_id, "--month", "2026-13")
    assert bad.returncode != 0 and "--month" in bad.stderr

    outputs = [out, err, made.stderr, usage.stdout, usage.stderr, listed.stdout, listed.stderr]
    assert secrets_in_outputs(logs, outputs, [secret, "mtk_" + "w" * 43]) == []
    assert secret not in ledger.read_bytes().decode("latin-1")


@several_workers
def test_a_key_revoked_through_one_worker_is_refused_at_once_by_every_worker(tmp_path, launch):
    store = KeyStore(tmp_path / "ledger.sqlite3")  # as `flask keys create` does, before the server starts
    _, admin = store.create(name="ops", scope="admin")
    user, secret = store.create(name="app")
    store.close()
    server, port = launch("--workers", "2", "--threads", "4", AUTH_ENABLED="true")
    base = f"http://127.0.0.1:{port}/api/v1"

    def own_usage() -> requests.Response:  # new connections: the kernel spreads them over both workers
        return requests.get(f"{base}/keys/me/usage", headers={"X-API-Token": secret, "Connection": "close"}, timeout=30)

    try:
        assert all(own_usage().status_code == 200 for _ in range(40))
        revoked = requests.delete(f"{base}/keys/{user.id}", headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        assert revoked.status_code == 200
        after = [own_usage() for _ in range(40)]
        assert {(response.status_code, response.json()["code"]) for response in after} == {(401, "key_revoked")}
    finally:
        out, err = stop(server)
    for worker in ("worker-0", "worker-1"):  # each worker served the key, then refused it
        log_file = tmp_path / "logs" / worker / "api_requests.log"
        lines = [json.loads(line) for line in log_file.read_text().splitlines()]
        statuses = [line["status"] for line in lines if line["path"] == "/api/v1/keys/me/usage"]
        assert 200 in statuses and 401 in statuses, (worker, statuses)
        assert statuses == sorted(statuses)  # never a 200 after a 401
        served = [line for line in lines if line["status"] == 200 and line["path"] == "/api/v1/keys/me/usage"]
        assert {line.get("key_id") for line in served} == {user.id}
    assert secrets_in_outputs(tmp_path / "logs", [out, err], [secret, admin]) == []
