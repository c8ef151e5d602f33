"""Monthly budgets of API keys through HTTP: 402 `budget_exceeded` before any provider call, the
spend bound under concurrent requests, reservations released on every way out (budgets.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import requests

from gateway.auth import budgets
from gateway.errors import BudgetExceeded
from gateway.storage.key_usage import month_of

TEXT = "/api/v1/generate/text"
STREAM = "/api/v1/generate/text/stream"
CLASSIFY = "/api/v1/classify/text"


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def next_month_iso() -> str:
    now = datetime.now(UTC)
    return datetime(now.year + now.month // 12, now.month % 12 + 1, 1).date().isoformat()


def key_spend(app, key_id: str) -> tuple[float, list[float]]:
    rows = [record for record in app.extensions["gateway"].tracker.records() if record.key_id == key_id]
    return sum(record.total_cost for record in rows), [record.total_cost for record in rows]


@pytest.fixture
def budgeted(make_app):
    def build(budget: float, **overrides):
        app = make_app(auth_enabled=True, ratelimit_enabled=False, **overrides)
        key, secret = app.extensions["gateway"].keys.create(name="capped", monthly_budget_usd=budget)
        return app, key, secret

    return build


def test_a_key_with_a_tiny_budget_is_refused_with_402_once_spent_before_any_upstream_call(budgeted, emulator):
    app, key, secret = budgeted(0.0001)
    client = app.test_client()
    answered = 0
    for number in range(200):
        response = client.post(TEXT, json={"prompt": f"tell me about budgets, part {number}"}, headers=bearer(secret))
        if response.status_code != 200:
            break
        answered += 1
    assert response.status_code == 402, response.get_data(as_text=True)
    spent, costs = key_spend(app, key.id)
    assert answered >= 2 and spent >= 0.0001  # it ran until the money was spent, not before
    assert spent - costs[-1] < 0.0001  # ... and the last admitted request was the one that crossed it
    body = response.get_json()
    assert body["code"] == "budget_exceeded" and body["request_id"]
    assert body["details"]["budget"] == 0.0001
    assert body["details"]["spent"] == pytest.approx(spent)
    assert body["details"]["reset"] == next_month_iso()
    assert body["details"]["key_id"] == key.id
    calls = emulator.request_count
    refused = client.post(CLASSIFY, json={"text": "x", "categories": ["a", "b"]}, headers=bearer(secret))
    assert refused.status_code == 402
    assert emulator.request_count == calls  # refused before any upstream call
    assert len([r for r in app.extensions["gateway"].tracker.records() if r.key_id == key.id]) == answered  # no row
    assert app.extensions["gateway"].budgets.state(key.id)["reserved"] == 0


def test_20_concurrent_requests_overshoot_the_budget_by_at_most_one_request_each(budgeted, emulator, serve):
    # A cap on output tokens makes the estimate close to the real cost, so several requests fit at once.
    app, key, secret = budgeted(0.0004, gemini_max_output_tokens=64)
    server = serve(app, threads=24)
    emulator.reply_delay = 0.05  # the provider takes a moment: the requests overlap
    start = threading.Barrier(20)

    def one(number: int) -> requests.Response:
        start.wait()
        return requests.post(server.url + TEXT, json={"prompt": f"concurrent question number {number}"},
                             headers=bearer(secret), timeout=30)

    statuses: list[int] = []
    refusals = []
    for wave in range(20):  # waves of 20 at once until the key is refused throughout
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda n, w=wave: one(w * 100 + n), range(20)))
        statuses += [answer.status_code for answer in answers]
        refusals += [answer.json() for answer in answers if answer.status_code == 402]
        if all(answer.status_code == 402 for answer in answers):
            break
    assert set(statuses) == {200, 402}, statuses
    spent, costs = key_spend(app, key.id)
    assert spent >= 0.0004
    assert spent <= 0.0004 + 20 * max(costs)  # overshoot at most one request's cost per concurrent request
    assert refusals and all(body["code"] == "budget_exceeded" for body in refusals)
    for body in refusals:
        details = body["details"]
        assert details["budget"] == 0.0004 and details["reset"] == next_month_iso()
        assert isinstance(details["spent"], float) and details["spent"] <= spent + 1e-12
    assert refusals[-1]["details"]["spent"] == pytest.approx(spent)  # the last wave saw the whole spend
    assert app.extensions["gateway"].budgets.state(key.id)["reserved"] == 0  # every reservation released


def test_requests_in_flight_hold_what_is_left(budgeted, serve, emulator):
    """The default estimate (8192 output tokens) bounds a request's cost: with one request in flight
    and less than its estimate left, the next one is refused and the spend never passes the budget
    by more than that one request."""
    app, key, secret = budgeted(0.001)
    server = serve(app)
    emulator.reply_delay = 0.3
    start = threading.Barrier(10)

    def one(number: int) -> requests.Response:
        start.wait()
        return requests.post(server.url + TEXT, json={"prompt": f"question {number}"}, headers=bearer(secret),
                             timeout=30)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(one, range(10)))
    estimate = app.extensions["gateway"].service.price_of(
        "gemini-2.0-flash", *budgets.estimated_tokens(len('{"prompt": "question 0"}'), None)).total
    assert estimate > 0.001  # one request's estimate is more than the whole budget
    refused = [answer.json() for answer in answers if answer.status_code == 402]
    assert any(answer.status_code == 200 for answer in answers) and refused
    for body in refused:  # refused while the month was not spent: what was left was held in flight
        assert body["details"]["spent"] < 0.001 and body["details"]["in_flight"] >= estimate * 0.99
        assert "in flight" in body["error"]
    spent, costs = key_spend(app, key.id)
    assert spent < 0.001  # nothing overspent


def test_a_key_without_a_budget_is_unaffected_and_never_reads_the_ledger_for_it(make_app):
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    gateway = app.extensions["gateway"]
    _, secret = gateway.keys.create(name="free")
    client = app.test_client()
    for number in range(30):
        assert client.post(TEXT, json={"prompt": f"free {number}"}, headers=bearer(secret)).status_code == 200
    assert gateway.budgets.reads == 0


def test_a_zero_budget_refuses_every_task(budgeted):
    app, key, secret = budgeted(0)
    response = app.test_client().post(TEXT, json={"prompt": "hi"}, headers=bearer(secret))
    assert response.status_code == 402
    assert response.get_json()["details"]["spent"] == 0


def test_the_cli_budget_is_enforced(make_app):
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    result = app.test_cli_runner().invoke(args=["keys", "create", "--name", "cli", "--budget", "0.00005"])
    assert result.exit_code == 0, result.output
    secret = next(line.split()[1] for line in result.output.splitlines() if line.startswith("key:"))
    client = app.test_client()
    statuses = [client.post(TEXT, json={"prompt": f"cli {number}"}, headers=bearer(secret)).status_code
                for number in range(40)]
    assert statuses[0] == 200 and 402 in statuses
    first_refusal = statuses.index(402)
    assert set(statuses[first_refusal:]) == {402}
    assert app.extensions["gateway"].keys.list()[0].monthly_budget_usd == 0.00005


def test_reservations_are_released_by_streams_cache_hits_errors_and_bad_input(budgeted, emulator):
    app, key, secret = budgeted(1.0)
    guard = app.extensions["gateway"].budgets
    client = app.test_client()
    stream = client.post(STREAM, json={"prompt": "stream please"}, headers=bearer(secret))
    assert stream.status_code == 200 and "event: done" in stream.get_data(as_text=True)
    assert client.post(TEXT, json={"prompt": "same"}, headers=bearer(secret)).status_code == 200
    hit = client.post(TEXT, json={"prompt": "same"}, headers=bearer(secret))
    assert hit.status_code == 200 and hit.headers["X-Cached"] == "true"
    emulator.inject("server_error", times=10)
    assert client.post(TEXT, json={"prompt": "fails"}, headers=bearer(secret)).status_code >= 500
    assert client.post(TEXT, json={"prompt": ""}, headers=bearer(secret)).status_code == 400
    assert guard.state(key.id)["reserved"] == 0
    spent, _ = key_spend(app, key.id)
    assert guard.state(key.id)["spent"] == pytest.approx(spent)  # its own records counted as they were committed


def test_another_process_spend_is_read_from_the_shared_ledger(make_app):
    first = make_app(auth_enabled=True, ratelimit_enabled=False)
    second = make_app(auth_enabled=True, ratelimit_enabled=False)  # another worker on the same ledger file
    key, secret = first.extensions["gateway"].keys.create(name="shared", monthly_budget_usd=0.00003)
    one = first.test_client()
    statuses = [one.post(TEXT, json={"prompt": f"spend {number}"}, headers=bearer(secret)).status_code
                for number in range(10)]
    assert statuses[0] == 200 and statuses[-1] == 402
    response = second.test_client().post(TEXT, json={"prompt": "elsewhere"}, headers=bearer(secret))
    assert response.status_code == 402
    assert response.get_json()["details"]["spent"] >= 0.00003


def test_the_spend_is_re_read_at_most_every_refresh_interval(tmp_path, make_app):
    app = make_app(auth_enabled=True)
    path = app.extensions["gateway"].config.cost_ledger_path
    now = [100.0]
    guard = budgets.BudgetGuard(path, monotonic=lambda: now[0])
    for _ in range(5):
        guard.release(guard.reserve("key_x", 1.0, 0.01))
    assert guard.reads == 1
    now[0] += budgets.REFRESH_SECONDS
    guard.release(guard.reserve("key_x", 1.0, 0.01))
    assert guard.reads == 2
    guard.close()


def test_a_new_month_starts_from_the_ledger(tmp_path, make_app):
    app = make_app(auth_enabled=True)
    path = app.extensions["gateway"].config.cost_ledger_path
    moment = [datetime(2026, 11, 30, 23, 59, tzinfo=UTC).timestamp()]
    guard = budgets.BudgetGuard(path, clock=lambda: moment[0])
    guard.reserve("key_y", 1.0, 0.5)
    guard.recorded("key_y", 0.9)
    with pytest.raises(BudgetExceeded) as refused:
        guard.reserve("key_y", 1.0, 0.1)
    assert refused.value.details["reset"] == "2026-12-01" and month_of(moment[0]) == "2026-11"
    moment[0] += 120  # December
    guard.reserve("key_y", 1.0, 0.1)
    guard.close()


def test_the_spec_documents_402_on_the_task_endpoints(make_app):
    spec = make_app().test_client().get("/swagger.json").get_json()
    for path in ("/generate/text", "/generate/code", "/generate/text/stream", "/classify/text"):
        assert "402" in spec["paths"][path]["post"]["responses"]


def test_a_budget_holds_while_the_ledger_is_locked_and_records_wait_in_the_spool(budgeted, emulator):
    """Found by attack: with the write lock held elsewhere, records went to the spool, the re-read SUM
    did not see them and the key's own spend was dropped at each re-read: 6-20 times the budget."""
    import sqlite3

    app, key, secret = budgeted(0.0001, cost_ledger_write_timeout_seconds=0.05)
    gateway = app.extensions["gateway"]
    gateway.budgets._refresh = 0.0  # re-read the ledger before every request: the case that lost the spend
    client = app.test_client()
    holder = sqlite3.connect(gateway.config.cost_ledger_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        statuses = [client.post(TEXT, json={"prompt": f"locked ledger, part {n}"}, headers=bearer(secret)).status_code
                    for n in range(60)]
        assert gateway.tracker.spooled > 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert 402 in statuses and statuses.index(402) >= 2
    gateway.tracker.replay_spool()
    spent, costs = key_spend(app, key.id)
    assert spent - max(costs) < 0.0001  # at most the one request that crossed the budget
