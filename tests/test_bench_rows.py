"""Issue 12's benchmark rows measure what their labels say: the bare Flask-RESTX server, the 404 row,
and the targets' ratios printed under the table."""

from __future__ import annotations

import json

from bench import bare_restx
from bench.loadgen import Connection, build_request, run_concurrent, run_sequential
from bench.run import bare_framework, get_request, table, target_lines


def test_the_bare_resource_answers_ok_and_has_no_hooks():
    app = bare_restx.create_app()
    response = app.test_client().get(bare_restx.PATH)
    assert response.status_code == 200 and response.get_json() == {"ok": True}
    assert not any(app.before_request_funcs.values()) and not any(app.after_request_funcs.values())
    assert not app.error_handler_spec.get(None)


def test_the_bare_process_serves_the_resource_under_waitress():
    with bare_framework(threads=4) as url:
        connection = Connection(url)
        try:
            status, body = connection.exchange(build_request("GET", url))
        finally:
            connection.close()
    assert status == 200 and json.loads(body) == {"ok": True}


def test_an_expected_status_is_an_answer_and_others_are_errors(serve):
    server = serve(bare_restx.create_app(), threads=4)
    url, make = get_request(server.url + "/api/v1/no-such-resource")
    counted = run_sequential(url, make, 5, expect=404)
    assert len(counted.latencies_ms) == 5 and counted.errors == 0
    refused = run_sequential(url, make, 5)
    assert not refused.latencies_ms and refused.errors == 5
    concurrent = run_concurrent(url, make, clients=2, seconds=0.3, expect=404)
    assert concurrent.errors == 0 and concurrent.latencies_ms
    wrong = run_sequential(server.url + bare_restx.PATH, get_request(server.url + bare_restx.PATH)[1], 3, expect=404)
    assert wrong.errors == 3


def _row(seq: float, rps: float | None) -> dict:
    return {"seq_median_ms": seq, "seq_p99_ms": seq * 2, "rps_16": rps, "median_16_ms": None if rps is None else 5.0,
            "p99_16_ms": 9.0, "errors": 0}


def _results(**rows) -> dict:
    return {"machine": {"cores": 2, "python": "3.11"}, "settings": {"workers": 2, "runs": 3}, **rows}


def test_the_targets_are_ratios_of_the_rows_with_their_goals():
    results = _results(floor=_row(0.2, 5000), bare=_row(0.3, 1000), hit_1w=_row(1.0, 600), miss_1w=_row(3.2, 300),
                       miss=_row(2.2, 450), portkey_miss=_row(1.2, 400), stream_ttfb_direct_ms=0.5,
                       stream_ttfb_gateway_ms=6.0,
                       slow={"rps": 185.0, "share_of_ideal": 0.925, "p99_ms": 1100.0, "errors": 0,
                             "peak_rss_mb": 320.0})
    lines = target_lines(results)
    assert lines[0].endswith("600 / 1000 = 0.60 (goal >= 0.6): met")
    assert "(1 worker, the launcher's default) / Portkey, req/s @16: 300 / 400 = 0.75 (goal >= 1): NOT met" in lines[1]
    assert lines[2].endswith("3.00 ms, Portkey 1.00 ms, ratio 3.00 (goal <= 1): NOT met")
    assert lines[3].endswith("(2 workers) / Portkey, req/s @16: 450 / 400 = 1.12 (goal >= 1): met")
    assert lines[4].endswith("2.00 ms, Portkey 1.00 ms, ratio 2.00 (goal <= 1): NOT met")
    assert lines[5].endswith("5.50 ms (goal < 5 ms): NOT met")
    assert lines[6].endswith("92.5% of ideal (goal >= 90%): met; peak RSS 320.0 MB (goal < 300 MB): NOT met")
    assert "issue 12's targets" in table(results)


def test_missing_rows_give_no_ratio_and_a_failed_row_prints_dashes():
    results = _results(floor=_row(0.2, 5000), hit_1w=_row(1.0, None), miss=_row(2.0, 400))
    assert target_lines(results) == []
    printed = table(results)
    assert "gateway hit (1 worker)" in printed and "issue 12's targets" not in printed
    assert printed.splitlines()[2].split()[-4:] == ["-", "-", "9.00", "0"]
