"""Token counting offline, the price table, and the ledger: records, restarts, stats, exports."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import sqlite3
import threading

import pytest

from cost_tracker import CL100K_FILE, Cost, CostRecord, CostTracker, PriceTable, TokenCounter, percentiles
from gateway.providers import registry


def make_record(request_id: str, **changes) -> CostRecord:
    fields = {"request_id": request_id, "timestamp": 1_000_000.0, "endpoint": "/api/v1/generate/text",
              "client": "127.0.0.1", "model": "gemini-2.0-flash", "input_tokens": 100, "output_tokens": 50,
              "input_cost": 0.00001, "output_cost": 0.00002, "total_cost": 0.00003, "cached": False,
              "saved_cost": 0.0, "token_source": "provider", "latency_ms": 10.0, "status": 200}
    fields.update(changes)
    return CostRecord(**fields)


def test_token_counter_uses_the_bundled_cl100k_offline():
    counter = TokenCounter()
    assert counter.exact
    assert counter.count("hello world") == 2  # cl100k_base: "hello", " world"
    assert counter.count("") == 0
    assert counter.count("antidisestablishmentarianism") > 1


def test_token_counter_falls_back_to_an_estimate_and_says_so(tmp_path, caplog):
    broken = tmp_path / "cl100k_base.tiktoken"
    broken.write_bytes(CL100K_FILE.read_bytes()[:1000])  # wrong hash
    with caplog.at_level(logging.WARNING, logger="gateway.cost"):
        counter = TokenCounter(broken)
    assert not counter.exact
    assert counter.count("x" * 40) == 10
    assert "token estimates fall back" in caplog.text


def test_gemini_flash_prices_per_million_tokens():
    prices = PriceTable(registry.load().prices())
    cost = prices.cost("gemini-2.0-flash", 1_000_000, 1_000_000)
    assert cost.input == pytest.approx(0.10) and cost.output == pytest.approx(0.40)
    assert prices.cost("gemini-2.0-flash", 1234, 567).total == pytest.approx(1234 * 0.10e-6 + 567 * 0.40e-6)


def test_price_overrides_and_unknown_models(tmp_path):
    prices = PriceTable(registry.load(input_price=1.0).prices())
    assert prices.cost("gemini-2.0-flash", 1_000_000, 1_000_000) == Cost(1.0, 0.40)
    custom = tmp_path / "models.json"
    custom.write_text(json.dumps({"models": {"my-model": {"provider": "openai", "input_per_million": 2,
                                                          "output_per_million": 3}}}))
    table = PriceTable(registry.load(custom, default_model="my-model").prices())
    assert table.knows("my-model") and not table.knows("gemini-2.0-flash")
    assert table.cost("my-model", 1_000_000, 0) == Cost(2.0, 0.0)
    assert table.cost("gemini-2.0-flash", 10, 10) == Cost()


def test_records_survive_a_restart(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    first = CostTracker(path)
    first.record(make_record("a", total_cost=0.5))
    assert first.record(make_record("b", total_cost=0.25)) == pytest.approx(0.75)
    first.close()
    second = CostTracker(path)
    assert second.overall_cost == pytest.approx(0.75)
    assert [record.request_id for record in second.records()] == ["a", "b"]
    second.close()


def test_each_record_is_passed_on_for_the_cost_log(tmp_path):
    seen = []
    tracker = CostTracker(tmp_path / "l.sqlite3", on_record=seen.append)
    tracker.record(make_record("r1"))
    assert seen[0]["request_id"] == "r1" and seen[0]["total_cost"] == pytest.approx(0.00003)


def test_concurrent_records_are_neither_lost_nor_double_counted(tmp_path):
    tracker = CostTracker(tmp_path / "l.sqlite3")
    threads = [threading.Thread(target=lambda i=i: tracker.record(make_record(f"r{i}", total_cost=0.001)))
               for i in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = tracker.records()
    assert len(records) == 200 and len({record.request_id for record in records}) == 200
    assert tracker.overall_cost == pytest.approx(0.2)
    assert tracker.get_usage_stats(hours=10_000_000)["cost"]["total"] == pytest.approx(0.2)


def test_reading_stats_does_not_wait_for_a_commit_in_progress(tmp_path):
    tracker = CostTracker(tmp_path / "l.sqlite3")
    tracker.record(make_record("committed"))
    seen, stats = [], []
    with tracker._lock:  # the writer's connection is busy, as during a long group commit
        reader = threading.Thread(target=lambda: (seen.extend(tracker.records()),
                                                  stats.append(tracker.get_usage_stats(hours=10_000_000))))
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive(), "reading waited for the writer's connection"
    assert [record.request_id for record in seen] == ["committed"]
    assert stats[0]["requests"] == 1 and stats[0]["overall_cost"] == pytest.approx(0.00003)
    tracker.close()


def test_usage_stats_by_endpoint_with_cache_savings(tmp_path):
    now = 2_000_000.0
    tracker = CostTracker(tmp_path / "l.sqlite3", clock=lambda: now)
    tracker.record(make_record("old", timestamp=now - 3 * 3600))  # outside a 2-hour window
    tracker.record(make_record("m1", timestamp=now - 60, latency_ms=100.0))
    tracker.record(make_record("h1", timestamp=now - 30, cached=True, total_cost=0.0, input_cost=0.0,
                               output_cost=0.0, saved_cost=0.00003, latency_ms=1.0))
    tracker.record(make_record("c1", timestamp=now - 10, endpoint="/api/v1/classify/text", latency_ms=20.0))
    tracker.record(make_record("e1", timestamp=now - 5, status=502, total_cost=0.0, input_cost=0.0, output_cost=0.0,
                               input_tokens=0, output_tokens=0, token_source="none", latency_ms=5.0))
    stats = tracker.get_usage_stats(hours=2)
    assert stats["requests"] == 4
    assert stats["by_status"] == {"200": 3, "502": 1}
    assert stats["cache"] == {"hits": 1, "hit_rate": pytest.approx(1 / 3, abs=1e-4)}
    assert stats["cost"]["total"] == pytest.approx(0.00006)
    assert stats["cost_saved_by_cache"] == pytest.approx(0.00003)
    assert stats["cost_reduction"] == pytest.approx(0.3333, abs=1e-4)
    text = stats["by_endpoint"]["/api/v1/generate/text"]
    assert text["requests"] == 3 and text["latency_ms"]["p50"] == 5.0 and text["latency_ms"]["p99"] == 100.0
    assert stats["token_sources"] == {"provider": 3, "none": 1}
    assert stats["overall_cost"] == pytest.approx(0.00009)  # all time, the old record included


def test_export_to_json_and_csv(tmp_path):
    tracker = CostTracker(tmp_path / "l.sqlite3")
    for i in range(3):
        tracker.record(make_record(f"r{i}", timestamp=__import__("time").time()))
    assert tracker.export_records(tmp_path / "out.json", hours=1) == 3
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [row["request_id"] for row in rows] == ["r0", "r1", "r2"]
    assert tracker.export_records(tmp_path / "out.csv") == 3
    with (tmp_path / "out.csv").open() as handle:
        assert [row["request_id"] for row in csv.DictReader(handle)] == ["r0", "r1", "r2"]
    with pytest.raises(ValueError):
        tracker.export_records(tmp_path / "out.xml")


def test_percentiles_by_nearest_rank():
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    values = list(range(1, 101))
    assert percentiles(values) == {"p50": 50, "p95": 95, "p99": 99}


def test_several_processes_can_open_a_new_ledger_at_once(tmp_path):
    """Worker processes start together; none may fail on SQLite's 'database is locked'."""
    import subprocess
    import sys
    import time

    ledger, go = tmp_path / "shared.sqlite3", tmp_path / "go"
    code = (
        "import sys, pathlib, time\n"
        "from cost_tracker import CostTracker\n"
        "from tests.test_cost_tracker import make_record\n"
        "pathlib.Path(sys.argv[3]).touch()\n"  # ready
        "go = pathlib.Path(sys.argv[4])\n"
        "while not go.exists(): pass\n"  # all open the new file at the same moment
        "t = CostTracker(sys.argv[1]); t.record(make_record(sys.argv[2])); t.close()\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", code, str(ledger), f"p{i}", str(tmp_path / f"ready{i}"),
                                   str(go)], stderr=subprocess.PIPE, text=True) for i in range(6)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(6)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    errors = [p.communicate(timeout=60)[1] for p in processes]
    assert all(p.returncode == 0 for p in processes), errors
    tracker = CostTracker(ledger)
    assert sorted(r.request_id for r in tracker.records()) == [f"p{i}" for i in range(6)]
    assert tracker.overall_cost == pytest.approx(6 * 0.00003)
    tracker.close()


def spooled_lines(ledger) -> list[dict]:
    spool = ledger.parent / f"{ledger.name}.spool"
    return [json.loads(line) for path in sorted(spool.glob("*.jsonl")) for line in path.read_text().splitlines()]


def ledger_ids(ledger) -> list[str]:
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        return [row[0] for row in db.execute("SELECT request_id FROM cost_records ORDER BY id")]


def test_a_write_that_cannot_take_the_lock_is_spooled_and_replayed_exactly_once(tmp_path):
    ledger = tmp_path / "l.sqlite3"
    tracker = CostTracker(ledger, write_timeout=0.1)
    assert tracker.record(make_record("before", total_cost=0.25)) == pytest.approx(0.25)
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
    assert tracker.record(make_record("during-1", total_cost=0.5)) == pytest.approx(0.75)  # spooled, counted
    assert tracker.record(make_record("during-2", total_cost=0.125)) == pytest.approx(0.875)
    assert [line["request_id"] for line in spooled_lines(ledger)] == ["during-1", "during-2"]
    assert tracker.spooled == 2 and ledger_ids(ledger) == ["before"]
    assert tracker.replay_spool() == 0  # still locked: nothing moves, nothing is lost
    holder.execute("ROLLBACK")
    tracker.replay_spool()  # (the background thread may have done it already)
    assert ledger_ids(ledger) == ["before", "during-1", "during-2"]
    assert tracker.spooled == 0 and spooled_lines(ledger) == []
    assert tracker.overall_cost == pytest.approx(0.875)
    tracker.record(make_record("after", total_cost=1.0))  # straight to the ledger again
    assert ledger_ids(ledger)[-1] == "after" and spooled_lines(ledger) == []
    tracker.close()


def test_a_spool_left_by_a_crash_after_its_replay_committed_adds_nothing_twice(tmp_path):
    """A crash between the ledger's commit and the spool's truncation leaves lines already in the ledger."""
    ledger = tmp_path / "l.sqlite3"
    tracker = CostTracker(ledger, write_timeout=0.1)
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    tracker.record(make_record("spooled", total_cost=0.5))
    leftover = next((ledger.parent / f"{ledger.name}.spool").glob("*.jsonl")).read_bytes()
    holder.execute("ROLLBACK")
    tracker.replay_spool()
    tracker.close()
    orphan = ledger.parent / f"{ledger.name}.spool" / "0123456789abcdef0123456789abcdef.jsonl"
    orphan.write_bytes(leftover + b'{"request_id": "torn", "timesta')  # and a torn last line
    restarted = CostTracker(ledger)  # replays orphans at start-up
    assert ledger_ids(ledger) == ["spooled"] and restarted.overall_cost == pytest.approx(0.5)
    assert not orphan.exists()
    restarted.close()


def test_another_processes_live_spool_is_left_to_it(tmp_path):
    ledger = tmp_path / "l.sqlite3"
    # no background replay in this test: the owner replays when told to
    owner, other = (CostTracker(ledger, write_timeout=0.1, maintenance_interval=3600) for _ in range(2))
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    owner.record(make_record("owned", total_cost=0.5))
    holder.execute("ROLLBACK")
    assert other.replay_spool() == 0  # the owner's file is locked while it lives
    assert ledger_ids(ledger) == [] and [line["request_id"] for line in spooled_lines(ledger)] == ["owned"]
    owner.replay_spool()
    assert ledger_ids(ledger) == ["owned"]
    owner.close()
    other.close()


def wait_for(condition, seconds: float = 20.0) -> bool:
    """Poll `condition` until it holds or `seconds` pass (a bounded wait for the background thread)."""
    import time

    give_up_at = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > give_up_at:
            return False
        time.sleep(0.02)
    return True


def test_the_maintenance_thread_replays_after_a_start_that_found_a_spool(tmp_path, caplog):
    """The first replay runs on the constructor's thread when a spool is left over; the later ones
    run on the maintenance thread and must be able to use the same connection."""
    ledger = tmp_path / "l.sqlite3"
    orphan = ledger.parent / f"{ledger.name}.spool" / "0123456789abcdef0123456789abcdef-000001.jsonl"
    orphan.parent.mkdir()
    orphan.write_text(json.dumps(vars(make_record("left-over"))) + "\n")  # a killed process's spool
    tracker = CostTracker(ledger, write_timeout=0.05, maintenance_interval=0.05)  # replays at start-up
    assert ledger_ids(ledger) == ["left-over"]
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a backup, say, while requests arrive: they are spooled
    tracker.record(make_record("during-1"))
    tracker.record(make_record("during-2"))
    assert tracker.spooled == 2
    holder.execute("ROLLBACK")
    with caplog.at_level(logging.INFO, logger="gateway.cost"):
        assert wait_for(lambda: ledger_ids(ledger) == ["left-over", "during-1", "during-2"]), caplog.text
    assert tracker.spooled == 0
    tracker.record(make_record("after"))  # straight to the ledger again
    assert ledger_ids(ledger)[-1] == "after"
    tracker.close()


def test_a_row_the_schema_refuses_is_reported_never_silently_dropped(tmp_path):
    """Only a repeated request id is skipped; a NULL (NaN) cost raises to its caller, and the
    other records of the same commit still go in."""
    ledger = tmp_path / "l.sqlite3"
    tracker = CostTracker(ledger)
    tracker.record(make_record("good", total_cost=0.5))
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        tracker.record(make_record("nan-cost", total_cost=float("nan")))  # SQLite stores NaN as NULL
    assert tracker.record(make_record("good", total_cost=0.5)) == pytest.approx(0.5)  # a duplicate: skipped
    assert ledger_ids(ledger) == ["good"] and tracker.overall_cost == pytest.approx(0.5)
    tracker.close()


def test_a_spooled_row_the_schema_refuses_is_logged_in_full_and_the_others_replayed(tmp_path, caplog):
    ledger = tmp_path / "l.sqlite3"
    orphan = ledger.parent / f"{ledger.name}.spool" / "0123456789abcdef0123456789abcdef-000001.jsonl"
    orphan.parent.mkdir()
    bad = {**vars(make_record("null-cost")), "total_cost": None}
    orphan.write_text("".join(json.dumps(record) + "\n" for record in (vars(make_record("a")), bad,
                                                                        vars(make_record("b")))))
    with caplog.at_level(logging.ERROR, logger="gateway.cost"):
        tracker = CostTracker(ledger, maintenance_interval=3600)  # replays orphans at start-up
    assert ledger_ids(ledger) == ["a", "b"] and not orphan.exists()
    assert '"request_id": "null-cost"' in caplog.text and "cannot be stored" in caplog.text
    tracker.close()
