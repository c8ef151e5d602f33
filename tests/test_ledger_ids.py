"""Request ids: the gateway's are unique and random; a client's X-Request-ID is kept apart, echoed, searchable."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
import requests

from cost_tracker import CostTracker
from tests.test_cost_tracker import make_record

TEXT = "/api/v1/generate/text"
HEX32 = re.compile(r"[0-9a-f]{32}")


def test_a_client_request_id_sent_three_times_gives_three_distinct_ledger_ids(make_app, serve):
    app = make_app(ratelimit_enabled=False)
    server = serve(app)
    responses = [requests.post(server.url + TEXT, json={"prompt": f"traced {i}"},
                               headers={"X-Request-ID": "client-trace-0001"}, timeout=10) for i in range(3)]
    ids = [response.headers["X-Request-ID"] for response in responses]
    assert all(response.status_code == 200 for response in responses)
    assert len(set(ids)) == 3 and all(HEX32.fullmatch(request_id) for request_id in ids)
    assert [response.json()["request_id"] for response in responses] == ids
    assert {response.headers["X-Client-Request-ID"] for response in responses} == {"client-trace-0001"}

    tracker = app.extensions["gateway"].tracker
    found = tracker.find(client_request_id="client-trace-0001")
    assert [record.request_id for record in found] == ids
    assert {record.client_request_id for record in found} == {"client-trace-0001"}
    assert [record.request_id for record in tracker.find(request_id=ids[1])] == [ids[1]]
    gateway = app.extensions["gateway"]
    gateway.logger.flush()
    lines = [json.loads(line) for line in (gateway.config.log_dir / "api_requests.log").read_text().splitlines()]
    assert [line["request_id"] for line in lines if line.get("client_request_id") == "client-trace-0001"] == ids


def test_gateway_request_ids_are_random_not_a_prefix_and_a_counter(make_app, serve):
    server = serve(make_app(ratelimit_enabled=False))
    ids = [requests.get(server.url + "/api/v1/health", timeout=10).headers["X-Request-ID"] for _ in range(40)]
    assert all(HEX32.fullmatch(request_id) for request_id in ids)
    assert len({request_id[:8] for request_id in ids}) == 40  # a shared process prefix would repeat
    assert len({request_id[-8:] for request_id in ids}) == 40


def test_a_spoofed_or_oversized_client_id_is_not_echoed_or_recorded(make_app, serve):
    app = make_app(ratelimit_enabled=False)
    server = serve(app)
    for bad in ("has spaces in it", "x" * 129, "a" * 60_000, "tiny"):
        response = requests.post(server.url + TEXT, json={"prompt": "hi"}, headers={"X-Request-ID": bad}, timeout=10)
        assert response.status_code == 200 and "X-Client-Request-ID" not in response.headers
    assert {record.client_request_id for record in app.extensions["gateway"].tracker.records()} == {None}


def test_the_ledger_keeps_one_row_per_request_id(tmp_path):
    tracker = CostTracker(tmp_path / "l.sqlite3")
    tracker.record(make_record("same", total_cost=0.5))
    tracker.record(make_record("same", total_cost=0.5))
    assert [record.request_id for record in tracker.records()] == ["same"]
    assert tracker.overall_cost == pytest.approx(0.5)  # the ignored copy added nothing
    with pytest.raises(ValueError):
        tracker.find()
    tracker.close()


# The ledger as versions before unique request ids wrote it.
OLD_SCHEMA = """
CREATE TABLE cost_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL, timestamp REAL NOT NULL, endpoint TEXT NOT NULL, client TEXT NOT NULL,
    model TEXT NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    input_cost REAL NOT NULL, output_cost REAL NOT NULL, total_cost REAL NOT NULL,
    cached INTEGER NOT NULL, saved_cost REAL NOT NULL, token_source TEXT NOT NULL,
    latency_ms REAL NOT NULL, status INTEGER NOT NULL
);
CREATE INDEX cost_records_by_time ON cost_records (timestamp);
CREATE TABLE ledger_total (id INTEGER PRIMARY KEY CHECK (id = 1), total_cost REAL NOT NULL);
INSERT INTO ledger_total (id, total_cost) VALUES (1, 0);
CREATE TRIGGER ledger_total_after_insert AFTER INSERT ON cost_records
BEGIN UPDATE ledger_total SET total_cost = total_cost + NEW.total_cost WHERE id = 1; END;
"""


def test_an_old_ledger_with_duplicate_ids_is_migrated_without_losing_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        for request_id in ("dup-trace-1", "solo-0000000001", "dup-trace-1", "dup-trace-1"):
            db.execute("INSERT INTO cost_records (request_id, timestamp, endpoint, client, model, input_tokens, "
                       "output_tokens, input_cost, output_cost, total_cost, cached, saved_cost, token_source, "
                       "latency_ms, status) VALUES (?, 1e6, '/api/v1/generate/text', 'c', 'm', 1, 1, 0.1, 0.1, "
                       "0.2, 0, 0, 'provider', 5, 200)", (request_id,))
    for _ in range(2):  # opening it again changes nothing more
        tracker = CostTracker(path)
        records = tracker.records()
        assert [r.request_id for r in records] == ["dup-trace-1", "solo-0000000001", "dup-trace-1~3", "dup-trace-1~4"]
        assert [r.client_request_id for r in records] == ["dup-trace-1", None, "dup-trace-1", "dup-trace-1"]
        assert len(tracker.find(client_request_id="dup-trace-1")) == 3
        assert tracker.overall_cost == pytest.approx(0.8)
        tracker.close()
    tracker = CostTracker(path)
    tracker.record(make_record("new-one", client_request_id="dup-trace-1", total_cost=0.2))
    tracker.record(make_record("new-one", total_cost=0.2))  # the unique index holds now
    assert len(tracker.find(client_request_id="dup-trace-1")) == 4
    assert tracker.overall_cost == pytest.approx(1.0)
    tracker.close()
