"""`GET /api/v1/usage/export` through HTTP: the ledger's rows as CSV or JSON, admin-only, validated,
streamed with bounded memory (usage_routes.py, CostTracker.export_chunks)."""

from __future__ import annotations

import csv
import io
import json
import re
import time
import tracemalloc

import pytest
import requests

from gateway.serve import waitress_settings
from gateway.storage.ledger_schema import COLUMNS
from tests.test_ledger_stats import bulk_insert

EXPORT = "/api/v1/usage/export"
TEXT = "/api/v1/generate/text"


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def secured(make_app):
    app = make_app(auth_enabled=True, ratelimit_enabled=False)
    keys = app.extensions["gateway"].keys
    _, admin = keys.create(name="ops", scope="admin")
    user, user_secret = keys.create(name="app")
    return app, admin, user, user_secret


def test_the_export_matches_the_ledger_in_csv_and_json(secured, serve):
    app, admin, user, user_secret = secured
    server = serve(app)
    for number in range(5):
        assert requests.post(server.url + TEXT, json={"prompt": f"export me {number}"}, headers=bearer(user_secret),
                             timeout=10).status_code == 200
    ledger = [vars(record) for record in app.extensions["gateway"].tracker.records()]
    assert len(ledger) == 5 and all(row["key_id"] == user.id for row in ledger)

    as_csv = requests.get(server.url + EXPORT + "?format=csv&hours=1", headers=bearer(admin), timeout=10)
    assert as_csv.status_code == 200 and as_csv.headers["Content-Type"].startswith("text/csv")
    assert re.fullmatch(r'attachment; filename="usage-\d{8}T\d{6}Z\.csv"', as_csv.headers["Content-Disposition"])
    assert as_csv.headers["Cache-Control"] == "no-store"
    lines = as_csv.text.splitlines()
    assert lines[0] == ",".join(COLUMNS)  # the header row
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [row["request_id"] for row in rows] == [row["request_id"] for row in ledger]
    assert [float(row["total_cost"]) for row in rows] == [row["total_cost"] for row in ledger]
    assert {row["key_id"] for row in rows} == {user.id}

    as_json = requests.get(server.url + EXPORT + "?format=json", headers=bearer(admin), timeout=10)
    assert as_json.status_code == 200 and as_json.headers["Content-Type"] == "application/json"
    assert as_json.headers["Content-Disposition"].endswith('.json"')
    assert as_json.json() == ledger


def test_hours_selects_the_window_and_an_empty_ledger_is_a_valid_file(secured):
    app, admin, _, _ = secured
    client = app.test_client()
    empty = client.get(EXPORT + "?format=json", headers=bearer(admin))
    assert empty.status_code == 200 and json.loads(empty.get_data()) == []
    assert client.get(EXPORT, headers=bearer(admin)).get_data(as_text=True).splitlines() == [",".join(COLUMNS)]
    bulk_insert(app.extensions["gateway"].tracker.ledger_path, 100, time.time() - 7200)  # 2 to 2.8 hours old
    assert json.loads(client.get(EXPORT + "?format=json&hours=1", headers=bearer(admin)).get_data()) == []
    assert len(json.loads(client.get(EXPORT + "?format=json&hours=3", headers=bearer(admin)).get_data())) == 100


def test_a_user_key_gets_403_and_no_key_401(secured):
    app, _, _, user_secret = secured
    client = app.test_client()
    forbidden = client.get(EXPORT, headers=bearer(user_secret))
    assert forbidden.status_code == 403 and forbidden.get_json()["code"] == "forbidden"
    assert client.get(EXPORT).status_code == 401


@pytest.mark.parametrize(("query", "field"), [
    ("hours=abc", "hours"), ("hours=0", "hours"), ("hours=-1", "hours"), ("hours=nan", "hours"),
    ("hours=inf", "hours"), ("hours=1e300", "hours"), ("hours=", "hours"), ("format=xml", "format"),
    ("format=", "format"),
])
def test_bad_parameters_are_a_400_naming_the_field(secured, query, field):
    app, admin, _, _ = secured
    response = app.test_client().get(f"{EXPORT}?{query}", headers=bearer(admin))
    assert response.status_code == 400
    body = response.get_json()
    assert body["code"] == "invalid_request" and list(body["details"]["fields"]) == [field]


def test_rows_are_fetched_as_the_client_reads_them(secured):
    app, admin, _, _ = secured
    tracker = app.extensions["gateway"].tracker
    bulk_insert(tracker.ledger_path, 20_000, time.time())
    before = tracker.rows_read
    response = app.test_client().get(EXPORT + "?format=json", headers=bearer(admin), buffered=False)
    assert response.status_code == 200
    pieces = iter(response.response)
    first = next(pieces)
    assert 0 < tracker.rows_read - before < 2_000  # one 64 KB piece: a few hundred rows, not the ledger
    assert first.startswith(b"[")
    response.close()  # the client leaves: the snapshot is closed, nothing more is read
    assert tracker.rows_read - before < 2_000


@pytest.fixture
def production_server(serve):
    """production_server(app) -> URL: waitress with the launcher's own settings (gateway.serve.waitress_settings)."""
    return lambda app: serve(app, **waitress_settings(app.extensions["gateway"].config, threads=8)).url


@pytest.mark.parametrize("rows", [5_000, 25_000])
def test_a_large_export_streams_in_bounded_memory(secured, production_server, rows):
    app, admin, _, _ = secured
    bulk_insert(app.extensions["gateway"].tracker.ledger_path, rows, time.time())
    url = production_server(app)
    for kind in ("csv", "json"):
        tracemalloc.start()
        try:
            received, lines = 0, 0
            with requests.get(f"{url}{EXPORT}?format={kind}", headers=bearer(admin), stream=True,
                              timeout=60) as response:
                assert response.status_code == 200
                for piece in response.iter_content(65536):
                    received += len(piece)
                    lines += piece.count(b"\n")
            peak = tracemalloc.get_traced_memory()[1]  # the server's and this client's, one process
        finally:
            tracemalloc.stop()
        assert lines >= rows and received > 100 * rows, kind  # ~130 bytes a CSV row, ~400 a JSON one
        assert peak < 3_000_000, (kind, rows, peak)  # the same for 5x the rows (10 MB of JSON)


def test_the_spec_documents_the_export(secured):
    app, *_ = secured
    spec = app.test_client().get("/swagger.json").get_json()
    operation = spec["paths"]["/usage/export"]["get"]
    assert {"200", "400", "401", "403"} <= operation["responses"].keys()
    assert {parameter["name"] for parameter in operation["parameters"]} >= {"hours", "format"}
