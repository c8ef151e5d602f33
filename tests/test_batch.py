"""POST /api/v1/generate/batch: items answered in order, one failing item never fails the others,
identical items share one upstream call, each item is one ledger row counted by the key's rate limit,
tokens and budget, and a hostile envelope or a slow upstream cannot hold the gateway."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

BATCH = "/api/v1/generate/batch"
TEXT = "/api/v1/generate/text"


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def rows(app, prefix: str | None = None) -> list:
    records = app.extensions["gateway"].tracker.records()
    return [record for record in records if prefix is None or record.request_id.startswith(prefix)]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    body = response.get_json()
    assert body["code"] == code and body["error"] and body["request_id"]
    return body


def test_a_failing_item_and_invalid_items_fail_alone_and_the_order_is_kept(make_app, emulator):
    app = make_app(ratelimit_enabled=False, batch_concurrency=1, retry_max_attempts=1)
    emulator.inject("bad_request")  # the first upstream call: item 0 with one worker (FIFO)
    items = [
        {"task": "text", "prompt": "first, refused by the provider"},
        {"task": "text", "prompt": "second"},
        {"task": "code", "prompt": "reverse a string", "language": "python"},
        {"task": "classify", "text": "I loved it", "categories": ["positive", "negative"]},
        {"task": "text"},  # no prompt
        {"task": "translate", "prompt": "x"},  # no such task
        "not an object",
        {"task": "text", "prompt": {"nested": [[["garbage"]]]}},
        {"task": "text", "prompt": "ok", "temperature": 7},
        {"task": "text", "prompt": "ok", "model": "no-such-model"},
        {"task": "classify", "text": "fine", "categories": ["a"]},
        {"task": "text", "prompt": "as a stream, please", "stream": True},
    ]
    response = app.test_client().post(BATCH, json={"items": items})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    answers = body["items"]
    assert [answer["index"] for answer in answers] == list(range(len(items)))
    assert [answer["status"] for answer in answers] == [502, 200, 200, 200, 400, 400, 400, 400, 400, 400, 400, 400]
    assert answers[0]["code"] == "upstream_rejected" and answers[0]["error"]
    assert "second" in answers[1]["generated_text"]
    assert answers[2]["generated_code"] and answers[2]["language"] == "python"
    assert answers[3]["classification"] == "positive" and answers[3]["categories"] == ["positive", "negative"]
    assert answers[4]["details"]["fields"] == {"prompt": "is required"}
    assert answers[5]["task"] is None and "task" in answers[5]["details"]["fields"]
    assert answers[6]["details"]["fields"] == {"item": "must be an object"}
    assert answers[7]["details"]["fields"]["prompt"] == "must be a string"
    assert "temperature" in answers[8]["details"]["fields"]
    assert "model" in answers[9]["details"]["fields"]
    assert "categories" in answers[10]["details"]["fields"]
    assert answers[11]["details"]["fields"] == {"stream": "is not available in a batch"}
    for answer in answers[4:]:
        assert answer["code"] == "invalid_request" and "generated_text" not in answer
    assert body["totals"]["succeeded"] == 3 and body["totals"]["failed"] == 9
    assert emulator.request_count == 4  # the refused call and three answers; invalid items never reach it


def test_identical_items_share_one_upstream_call_even_with_no_store(make_app, emulator):
    app = make_app(ratelimit_enabled=False)
    same = {"task": "text", "prompt": "the same question", "temperature": 0.3}
    items = [same, dict(same), {"task": "text", "prompt": "another"}, dict(same), dict(same)]
    response = app.test_client().post(BATCH, json={"items": items}, headers={"Cache-Control": "no-store, no-cache"})
    body = response.get_json()
    assert response.status_code == 200
    assert emulator.request_count == 2  # one call for the four identical items, one for the other
    first, *copies = (body["items"][index] for index in (0, 1, 3, 4))
    assert first["cached"] is False and first["cost"]["total"] > 0
    for copy in copies:
        assert copy["generated_text"] == first["generated_text"] and copy["shared_with"] == 0
        assert copy["cached"] is True and copy["cost"]["total"] == 0
        assert copy["cost"]["saved"] == pytest.approx(first["cost"]["total"])
    records = {record.request_id: record for record in rows(app)}
    assert len(records) == 5
    for index in (1, 3, 4):
        record = records[f"{body['request_id']}.{index}"]
        assert record.cached and record.total_cost == 0 and record.saved_cost == pytest.approx(first["cost"]["total"])
    assert body["totals"]["cache_hits"] == 3
    # no-store: nothing was cached, so the same item alone calls again
    again = app.test_client().post(TEXT, json={"prompt": "the same question", "temperature": 0.3})
    assert again.get_json()["cached"] is False and emulator.request_count == 3


def test_items_differing_only_in_options_are_not_shared(make_app, emulator):
    app = make_app(ratelimit_enabled=False)
    items = [{"task": "text", "prompt": "p"}, {"task": "text", "prompt": "p", "max_tokens": 50},
             {"task": "classify", "text": "p", "categories": ["A", "B"]},
             {"task": "classify", "text": "p", "categories": ["a", "b"]}]
    body = app.test_client().post(BATCH, json={"items": items}, headers={"Cache-Control": "no-cache"}).get_json()
    assert all(answer["status"] == 200 for answer in body["items"])
    assert emulator.request_count == 4
    assert body["items"][2]["classification"] in ("A", "B")  # each caller's own spelling
    assert body["items"][3]["classification"] in ("a", "b")


@pytest.mark.parametrize("envelope, field", [
    ([{"task": "text", "prompt": "x"}], "body"),
    ({"items": {"task": "text", "prompt": "x"}}, "items"),
    ({"items": []}, "items"),
    ({"items": "x"}, "items"),
    ({"items": [{"task": "text", "prompt": "x"}], "cache": {"no_store": True}}, "body"),
    ({}, "body"),
    ("items", "body"),
])
def test_an_envelope_that_is_not_a_list_of_items_is_a_400_before_any_work(make_app, emulator, envelope, field):
    app = make_app(ratelimit_enabled=False)
    body = assert_error(app.test_client().post(BATCH, json=envelope), 400, "invalid_request")
    assert field in body["details"]["fields"]
    assert emulator.request_count == 0 and rows(app) == []


def test_more_items_than_the_limit_is_a_400_naming_it(make_app, emulator):
    app = make_app(ratelimit_enabled=False, batch_max_items=3)
    items = [{"task": "text", "prompt": f"item {number}"} for number in range(4)]
    body = assert_error(app.test_client().post(BATCH, json={"items": items}), 400, "invalid_request")
    assert "at most 3 items" in body["error"] and "BATCH_MAX_ITEMS" in body["error"]
    assert body["details"]["max_items"] == 3 and body["details"]["items"] == 4
    assert emulator.request_count == 0 and rows(app) == []


def test_a_million_items_are_refused_by_count_before_any_work(make_app, emulator):
    app = make_app(request_max_bytes=4 * 1024 * 1024, ratelimit_task_limits="5 per minute")
    payload = '{"items": [' + ",".join(["{}"] * 1_000_000) + "]}"
    started = time.perf_counter()
    response = app.test_client().post(BATCH, data=payload, content_type="application/json")
    body = assert_error(response, 400, "invalid_request")
    assert time.perf_counter() - started < 10
    assert body["details"]["items"] == 1_000_000
    assert emulator.request_count == 0 and rows(app) == []
    # ... and counted as one request by the rate limit, not a million (nor 50)
    assert app.test_client().post(TEXT, json={"prompt": "still allowed"}).status_code == 200


def test_a_body_over_the_size_limit_is_a_413(make_app, emulator):
    app = make_app(ratelimit_enabled=False, request_max_prompt_chars=32000)
    items = [{"task": "text", "prompt": "x" * 30000} for _ in range(50)]  # each item valid, the whole 1.5 MB
    assert_error(app.test_client().post(BATCH, json={"items": items}), 413, "payload_too_large")
    assert emulator.request_count == 0


def test_a_50_item_batch_in_demo_mode_answers_every_item_in_order(make_app):
    app = make_app(google_api_key="", ratelimit_enabled=False)
    assert app.extensions["gateway"].upstream.mode == "demo"
    tasks = ["text", "code", "classify"]
    items = []
    for number in range(50):
        task = tasks[number % 3]
        if task == "classify":
            items.append({"task": task, "text": f"review {number}: I loved it", "categories": ["positive", "negative"]})
        else:
            items.append({"task": task, "prompt": f"request number {number}"})
    response = app.test_client().post(BATCH, json={"items": items})
    assert response.status_code == 200
    body = response.get_json()
    assert len(body["items"]) == 50 and body["totals"]["succeeded"] == 50
    for number, answer in enumerate(body["items"]):
        assert answer["index"] == number and answer["status"] == 200 and answer["task"] == tasks[number % 3]
        if answer["task"] == "text":
            assert f"request number {number}" in answer["generated_text"]
        elif answer["task"] == "code":
            assert answer["generated_code"]
        else:
            assert answer["classification"] == "positive"
        assert answer["request_id"] == f"{body['request_id']}.{number}"
    assert len(rows(app, body["request_id"])) == 50


def test_each_item_is_one_ledger_row_with_cost_and_key_and_the_batch_adds_none(make_app, emulator):
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    key, secret = app.extensions["gateway"].keys.create(name="batcher")
    items = [{"task": "text", "prompt": "a"}, {"task": "code", "prompt": "b"},
             {"task": "classify", "text": "c", "categories": ["x", "y"]}, {"task": "text"}]
    response = app.test_client().post(BATCH, json={"items": items},
                                      headers={**bearer(secret), "X-Request-ID": "client-batch-0001"})
    body = response.get_json()
    assert response.status_code == 200 and response.headers["X-Request-ID"] == body["request_id"]
    records = sorted(rows(app), key=lambda record: int(record.request_id.rsplit(".", 1)[1]))  # written as answered
    assert [record.request_id for record in records] == [f"{body['request_id']}.{index}" for index in range(4)]
    assert [record.endpoint for record in records] == [TEXT, "/api/v1/generate/code", "/api/v1/classify/text", TEXT]
    assert [record.status for record in records] == [200, 200, 200, 400]
    for record, answer in zip(records, body["items"], strict=True):
        assert record.key_id == key.id and record.client_request_id == "client-batch-0001"
        if answer["status"] == 200:
            assert record.total_cost == pytest.approx(answer["cost"]["total"]) and record.total_cost > 0
            assert record.model == answer["model"] == "gemini-2.0-flash"
            assert record.input_tokens == answer["usage"]["input_tokens"]
    assert records[3].total_cost == 0
    assert not any(record.endpoint == BATCH for record in records)
    logger = app.extensions["gateway"].logger
    assert logger.flush()
    cost_lines = [json.loads(line) for line in (logger.log_dir / "cost_tracking.log").read_text().splitlines()]
    assert sorted(line["request_id"] for line in cost_lines) == [record.request_id for record in records]
    requests_log = [json.loads(line) for line in (logger.log_dir / "api_requests.log").read_text().splitlines()]
    assert [line["request_id"] for line in requests_log] == [body["request_id"]]  # the batch's own line, once


def test_the_totals_add_up(make_app, emulator):
    app = make_app(ratelimit_enabled=False)
    items = [{"task": "text", "prompt": f"p{number % 3}"} for number in range(7)] + [{"task": "code"}]
    response = app.test_client().post(BATCH, json={"items": items})
    body = response.get_json()
    answered = [answer for answer in body["items"] if answer["status"] == 200]
    totals = body["totals"]
    assert totals["items"] == 8 and totals["succeeded"] == 7 and totals["failed"] == 1
    assert totals["input_tokens"] == sum(answer["usage"]["input_tokens"] for answer in answered)
    assert totals["output_tokens"] == sum(answer["usage"]["output_tokens"] for answer in answered)
    assert totals["total_tokens"] == totals["input_tokens"] + totals["output_tokens"]
    assert totals["cost"] == pytest.approx(sum(answer["cost"]["total"] for answer in answered))
    assert totals["saved"] == pytest.approx(sum(answer["cost"]["saved"] for answer in answered)) and totals["saved"] > 0
    assert totals["cache_hits"] == sum(answer["cached"] for answer in answered) == 4
    assert totals["cost"] == pytest.approx(sum(record.total_cost for record in rows(app)))
    assert float(response.headers["X-Cost-Total"]) == pytest.approx(totals["cost"])
    assert int(response.headers["X-Tokens-Input"]) == totals["input_tokens"]


def test_a_keys_own_rate_limit_counts_every_item(make_app, emulator):
    app = make_app(auth_enabled=True, ratelimit_task_limits="100 per minute")
    _, secret = app.extensions["gateway"].keys.create(name="tight", rate_limit="3/minute")
    client = app.test_client()
    four = [{"task": "text", "prompt": f"p{number}"} for number in range(4)]
    assert_error(client.post(BATCH, json={"items": four}, headers=bearer(secret)), 429, "rate_limited")
    assert emulator.request_count == 0
    assert client.post(BATCH, json={"items": four[:3]}, headers=bearer(secret)).status_code == 200
    assert_error(client.post(TEXT, json={"prompt": "one more"}, headers=bearer(secret)), 429, "rate_limited")


def test_the_endpoint_limit_counts_items_too(make_app, emulator):
    app = make_app(ratelimit_task_limits="5 per minute")
    client = app.test_client()
    five = [{"task": "classify", "text": f"t{number}", "categories": ["a", "b"]} for number in range(5)]
    assert client.post(BATCH, json={"items": five}).status_code == 200
    assert_error(client.post(BATCH, json={"items": five[:1]}), 429, "rate_limited")
    assert_error(client.post(BATCH, json={"items": [*five, five[0]]}), 429, "rate_limited")


def test_allowed_tasks_and_models_are_checked_per_item(make_app, emulator):
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    _, secret = app.extensions["gateway"].keys.create(name="text only", allowed_tasks=["text"],
                                                      allowed_models=["gemini-2.0-flash"])
    items = [{"task": "text", "prompt": "allowed"}, {"task": "classify", "text": "no", "categories": ["a", "b"]},
             {"task": "text", "prompt": "other model", "model": "gemini-2.5-flash"}]
    response = app.test_client().post(BATCH, json={"items": items}, headers=bearer(secret))
    answers = response.get_json()["items"]
    assert response.status_code == 200
    assert answers[0]["status"] == 200
    assert answers[1]["status"] == 403 and answers[1]["code"] == "task_not_allowed"
    assert answers[2]["status"] == 403 and answers[2]["code"] == "model_not_allowed"
    assert emulator.request_count == 1
    assert [record.status for record in rows(app)] == [200]  # refusals are unbilled, as for single requests


def test_a_spent_key_gets_a_402_for_the_whole_batch_before_any_call(make_app, emulator):
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    gateway = app.extensions["gateway"]
    key, secret = gateway.keys.create(name="capped", monthly_budget_usd=0.00001)
    client = app.test_client()
    items = [{"task": "text", "prompt": f"tell me about budgets, part {number}"} for number in range(6)]
    first = client.post(BATCH, json={"items": items}, headers=bearer(secret))
    assert first.status_code == 200
    assert [answer["status"] for answer in first.get_json()["items"]] == [200] + [402] * 5
    assert sum(record.total_cost for record in rows(app)) >= 0.00001  # admitted with money left, it passed it
    assert gateway.budgets.state(key.id)["reserved"] == 0  # released once accounted for
    calls = emulator.request_count
    refused = client.post(BATCH, json={"items": items[:1]}, headers=bearer(secret))
    assert_error(refused, 402, "budget_exceeded")
    assert emulator.request_count == calls and len(rows(app)) == 1


def test_a_batch_holds_a_reservation_for_all_its_items(make_app, emulator, serve):
    """While a batch of a budgeted key runs, it holds what its items may cost: three items, three times
    what one request holds (the estimate is dominated by the output limit, the same for each)."""
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    gateway = app.extensions["gateway"]
    key, secret = gateway.keys.create(name="capped", monthly_budget_usd=1.0)
    server = serve(app)

    def held_while_running(path: str, body: dict, slow_calls: int) -> float:
        emulator.inject("slow", times=slow_calls, seconds=1.0)
        with ThreadPoolExecutor(1) as client:
            running = client.submit(requests.post, server.url + path, json=body, headers=bearer(secret), timeout=30)
            deadline = time.monotonic() + 5
            while gateway.budgets.state(key.id)["reserved"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            held = gateway.budgets.state(key.id)["reserved"]
            assert running.result().status_code == 200
        assert gateway.budgets.state(key.id)["reserved"] == 0  # released once accounted for
        return held

    one = held_while_running(TEXT, {"prompt": "p0"}, 1)
    three = held_while_running(BATCH, {"items": [{"task": "text", "prompt": f"p{n}"} for n in range(1, 4)]}, 3)
    assert one > 0 and three == pytest.approx(3 * one, rel=0.05)


def test_a_slow_upstream_cannot_hold_the_batch_past_its_deadline(make_app, emulator):
    app = make_app(ratelimit_enabled=False, batch_concurrency=1, retry_max_attempts=1, gemini_deadline_seconds=0.5)
    emulator.inject("hang", times=10)
    items = [{"task": "text", "prompt": f"slow {number}"} for number in range(5)]
    started = time.perf_counter()
    response = app.test_client().post(BATCH, json={"items": items})
    elapsed = time.perf_counter() - started
    body = response.get_json()
    assert response.status_code == 200
    assert elapsed < 3, elapsed  # the batch deadline plus one call deadline at most, not 5 hung calls
    assert [answer["status"] for answer in body["items"]] == [504] * 5
    assert body["items"][0]["code"] == "upstream_timeout"
    not_started = [answer for answer in body["items"] if answer["details"].get("started") is False]
    assert len(not_started) >= 3  # never called: the worker was busy until the deadline
    assert emulator.request_count <= 2
    assert len(rows(app)) == 5 and all(record.total_cost == 0 for record in rows(app))


def test_one_pool_bounds_the_upstream_calls_of_many_concurrent_batches(make_app, emulator, serve):
    app = make_app(ratelimit_enabled=False, batch_concurrency=2)
    emulator.reply_delay = 0.1
    server = serve(app, threads=16)
    def batch(number: int) -> requests.Response:
        items = [{"task": "text", "prompt": f"batch {number} item {item}"} for item in range(4)]
        return requests.post(server.url + BATCH, json={"items": items}, timeout=60)

    started = time.perf_counter()
    with ThreadPoolExecutor(6) as clients:
        answers = list(clients.map(batch, range(6)))
    elapsed = time.perf_counter() - started
    assert all(answer.status_code == 200 for answer in answers)
    assert all(item["status"] == 200 for answer in answers for item in answer.json()["items"])
    assert emulator.request_count == 24
    # 24 calls of 0.1 s each: at most two at a time takes at least 1.2 s (six batches with a pool each: 0.4 s)
    assert elapsed >= 24 * 0.1 / 2 * 0.95, elapsed
    assert app.extensions["batch_runner"].threads == 2  # one pool for every batch, not threads per request


def test_the_spec_documents_the_batch_operation(make_app):
    spec = make_app().test_client().get("/swagger.json").get_json()
    operation = spec["paths"]["/generate/batch"]["post"]
    assert operation["summary"] == ("Run up to BATCH_MAX_ITEMS text, code and classify requests in one call, "
                                    "each answered on its own")
    assert {"200", "400", "402", "429"} <= set(operation["responses"])


# -- Findings of the issue-11 attack (each test failed before its fix) --------------------------------------------


@pytest.mark.parametrize("task", [{}, [], ["text"], 1.5])
def test_an_item_whose_task_is_not_a_string_is_its_own_400_and_the_other_items_are_billed(make_app, emulator, task):
    """An unhashable `task` once crashed the accounting loop (500) after every item had run, so the other items'
    upstream calls reached neither the ledger nor the key's budget or tokens window."""
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    gateway = app.extensions["gateway"]
    key, secret = gateway.keys.create(name="billed", monthly_budget_usd=1.0, tokens_per_minute=1_000_000)
    items = [{"task": task}, {"task": "text", "prompt": "unbilled 1"}, {"task": "code", "prompt": "unbilled 2"}]
    response = app.test_client().post(BATCH, json={"items": items}, headers=bearer(secret))
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    body = response.get_json()
    answers = body["items"]
    assert [answer["status"] for answer in answers] == [400, 200, 200]
    assert answers[0]["code"] == "invalid_request" and answers[0]["task"] is None
    assert "task" in answers[0]["details"]["fields"]
    assert emulator.request_count == 2
    records = {record.request_id: record for record in rows(app, body["request_id"])}
    batch = body["request_id"]
    assert sorted(records) == [f"{batch}.0", f"{batch}.1", f"{batch}.2"]
    assert records[f"{batch}.0"].status == 400 and records[f"{batch}.0"].total_cost == 0
    billed = [records[f"{batch}.1"], records[f"{batch}.2"]]
    assert all(record.status == 200 and record.total_cost > 0 and record.key_id == key.id for record in billed)
    assert gateway.budgets.state(key.id)["spent"] == pytest.approx(sum(record.total_cost for record in billed))
    assert gateway.tokens.used(key.id) == sum(answer["usage"]["total_tokens"] for answer in answers[1:])


def test_each_items_row_is_written_as_soon_as_it_is_answered(make_app, emulator, serve):
    """A row is written by the worker that got the item's answer, not after the whole batch: whatever happens
    to the batch afterwards, no upstream call goes unrecorded."""
    app = make_app(ratelimit_enabled=False, batch_concurrency=1)
    emulator.inject("slow", seconds=0)  # item 0: at once
    emulator.inject("slow", seconds=2)  # item 1: the batch is still running 2 s later
    server = serve(app)
    items = [{"task": "text", "prompt": "quick"}, {"task": "text", "prompt": "slow"}]
    with ThreadPoolExecutor(1) as client:
        running = client.submit(requests.post, server.url + BATCH, json={"items": items}, timeout=30)
        deadline = time.monotonic() + 5
        while not rows(app) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not running.done()  # item 1 is still with the provider...
        first = rows(app)
        assert len(first) == 1 and first[0].request_id.endswith(".0") and first[0].total_cost > 0  # ...item 0 is billed
        assert running.result().status_code == 200
    assert sorted(record.request_id[-2:] for record in rows(app)) == [".0", ".1"]


def test_batches_over_the_in_flight_bound_are_refused_at_once_and_plain_requests_still_answer(make_app, emulator,
                                                                                              serve):
    """Each batch holds a server thread while its items wait for the pool: 200 one-item batches against a slow
    provider once took every thread (plain requests and /health waited seconds). A batch over
    BATCH_MAX_IN_FLIGHT is refused with 503 `batch_busy` before any item is read, reserved or counted."""
    app = make_app(auth_enabled=True, batch_max_in_flight=1, ratelimit_task_limits="3 per minute")
    gateway = app.extensions["gateway"]
    key, secret = gateway.keys.create(name="busy", monthly_budget_usd=1.0)
    server = serve(app, threads=4)
    emulator.inject("slow", seconds=2)  # the first batch's one item
    with ThreadPoolExecutor(1) as client:
        first = client.submit(requests.post, server.url + BATCH, headers=bearer(secret), timeout=30,
                              json={"items": [{"task": "text", "prompt": "slow batch"}]})
        deadline = time.monotonic() + 5
        while emulator.request_count == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.perf_counter()
        second = requests.post(server.url + BATCH, headers=bearer(secret), timeout=30,
                               json={"items": [{"task": "text", "prompt": "second batch"}]})
        assert time.perf_counter() - started < 1
        assert second.status_code == 503 and second.json()["code"] == "batch_busy", second.text
        assert second.json()["details"]["max_in_flight"] == 1 and int(second.headers["Retry-After"]) >= 1
        started = time.perf_counter()
        assert requests.get(server.url + "/api/v1/health", timeout=30).status_code == 200
        plain = requests.post(server.url + TEXT, json={"prompt": "plain"}, headers=bearer(secret), timeout=30)
        assert plain.status_code == 200 and time.perf_counter() - started < 1
        assert not first.done()  # all of that while the first batch was still running
        assert first.result().status_code == 200
    assert emulator.request_count == 2  # the refused batch made no call...
    assert gateway.budgets.state(key.id)["reserved"] == 0  # ...held no reservation...
    third = requests.post(server.url + BATCH, headers=bearer(secret), timeout=30,  # ...and used no rate limit
                          json={"items": [{"task": "text", "prompt": "third batch"}]})
    assert third.status_code == 200 and third.json()["items"][0]["status"] == 200


def test_a_keys_tokens_per_minute_are_checked_before_each_item(make_app, emulator):
    """Checked once before the batch, a 50-item batch ran 2,180 tokens against a 200 tokens/minute key. Now each
    item is checked before its call and adds its tokens when answered: with one worker, the key passes its
    limit by at most one item, and the items over it get their own 429 without a call or a row."""
    app = make_app(auth_enabled=True, ratelimit_enabled=False, batch_concurrency=1)
    gateway = app.extensions["gateway"]
    key, secret = gateway.keys.create(name="tpm", tokens_per_minute=1)
    items = [{"task": "text", "prompt": f"tokens {number}"} for number in range(4)]
    response = app.test_client().post(BATCH, json={"items": items}, headers=bearer(secret))
    assert response.status_code == 200
    answers = response.get_json()["items"]
    assert [answer["status"] for answer in answers] == [200, 429, 429, 429]
    for answer in answers[1:]:
        assert answer["code"] == "token_limit_exceeded" and answer["details"]["tokens_per_minute"] == 1
        assert answer["details"]["retry_after"] >= 1
    assert emulator.request_count == 1
    assert gateway.tokens.used(key.id) == answers[0]["usage"]["total_tokens"]
    assert [record.status for record in rows(app)] == [200]  # refusals are unbilled, as for single requests
    assert_error(app.test_client().post(BATCH, json={"items": items[:1]}, headers=bearer(secret)),
                 429, "token_limit_exceeded")  # at the limit: the whole batch is refused before any item


def test_a_budget_admits_only_the_items_that_fit_and_refuses_the_rest_with_their_own_402(make_app, emulator):
    """`reserve` admits whenever money is left, whatever the estimate, so one reservation for a whole batch let a
    $0.0001 key spend $0.00016 in one 9-item batch. Items are now admitted one by one, in order, as requests of
    their own would be: each while the spend plus what the earlier items and the key's requests in flight hold
    is under the budget. So a batch passes the budget by at most one item, like a lone request."""
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    gateway = app.extensions["gateway"]
    key, secret = gateway.keys.create(name="tiny", monthly_budget_usd=0.0001)
    client = app.test_client()
    items = [{"task": "text", "prompt": f"budget item {number}"} for number in range(9)]
    response = client.post(BATCH, json={"items": items}, headers=bearer(secret))
    assert response.status_code == 200
    answers = response.get_json()["items"]
    assert [answer["status"] for answer in answers] == [200] + [402] * 8  # one item's estimate exceeds $0.0001
    for answer in answers[1:]:
        assert answer["code"] == "budget_exceeded" and answer["details"]["budget"] == 0.0001
    assert emulator.request_count == 1 and len(rows(app)) == 1  # the refused items: no call, no row
    assert sum(record.total_cost for record in rows(app)) < 0.0001
    assert gateway.budgets.state(key.id)["reserved"] == 0
    for round_ in range(1, 20):  # one admitted item per batch until spent
        if gateway.budgets.state(key.id)["spent"] >= 0.0001:
            break
        more = [{"task": "text", "prompt": f"budget round {round_} item {number}"} for number in range(9)]
        answers = client.post(BATCH, json={"items": more}, headers=bearer(secret)).get_json()["items"]
        assert [answer["status"] for answer in answers] == [200] + [402] * 8
    assert emulator.request_count == round_ < 10
    spent = gateway.budgets.state(key.id)["spent"]
    assert spent - 0.0001 <= max(record.total_cost for record in rows(app))  # passed by at most one item
    calls = emulator.request_count
    assert_error(client.post(BATCH, json={"items": items}, headers=bearer(secret)), 402, "budget_exceeded")
    assert emulator.request_count == calls


def test_a_batch_is_admitted_item_by_item_against_what_is_left(tmp_path):
    from gateway.auth.budgets import BudgetGuard

    guard = BudgetGuard(tmp_path / "ledger.sqlite3")
    try:
        guard._db.execute("CREATE TABLE cost_records (key_id TEXT, timestamp REAL, total_cost REAL)")
        admitted, refusal = guard.reserve_many("k", 1.0, [0.4, 0.4, 0.4, 0.4])
        assert [reservation.amount for reservation in admitted] == [0.4, 0.4, 0.4]  # 0, 0.4, 0.8 < 1.0
        assert refusal is not None and refusal.code == "budget_exceeded" and refusal.details["in_flight"] == 1.2
        assert guard.state("k")["reserved"] == pytest.approx(1.2)
        with pytest.raises(Exception) as none_fit:  # what is left is held: not even the first item is admitted
            guard.reserve_many("k", 1.0, [0.01])
        assert none_fit.value.code == "budget_exceeded"
        for reservation in admitted:
            guard.release(reservation)
        assert guard.state("k")["reserved"] == 0
        assert len(guard.reserve_many("k", 1.0, [0.01] * 5)[0]) == 5 and guard.reserve_many("k", 1.0, [])[0] == []
    finally:
        guard.close()


def test_an_item_whose_answer_the_task_refuses_is_billed_for_the_call_and_counted_in_the_totals(make_app, emulator):
    """A classification off the list is the item's 502, but the provider answered (20 + 2 tokens) and billed it."""
    app = make_app(ratelimit_enabled=False)
    emulator.inject("raw", body={"candidates": [{"content": {"role": "model", "parts": [{"text": "spam"}]},
                                                 "finishReason": "STOP"}],
                                 "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 2,
                                                   "totalTokenCount": 22}})
    response = app.test_client().post(BATCH, json={"items": [{"task": "classify", "text": "off the list",
                                                              "categories": ["a", "b"]}]})
    body = response.get_json()
    [item] = body["items"]
    assert (item["status"], item["code"]) == (502, "upstream_bad_answer")
    [row] = rows(app)
    assert (row.status, row.input_tokens, row.output_tokens) == (502, 20, 2) and row.total_cost > 0
    totals = body["totals"]
    assert (totals["succeeded"], totals["failed"], totals["input_tokens"], totals["output_tokens"]) == (0, 1, 20, 2)
    assert totals["cost"] == pytest.approx(row.total_cost)
