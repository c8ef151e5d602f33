"""LRUCache and ResponseCache: eviction, TTL on a fake clock, counters, thread safety, single flight."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading

import pytest

from gateway.errors import UpstreamRateLimited
from lru_cache import LRUCache, ResponseCache
from tests.fakes import FakeClock
from tests.support.processes import ROOT

SAFETY = 5.0  # seconds; only a net under Event/Barrier waits that should return at once


def make_cache(max_size: int = 3, default_ttl: float | None = None) -> tuple[LRUCache, FakeClock]:
    clock = FakeClock()
    return LRUCache(max_size, default_ttl, clock=clock.now), clock


# --- LRUCache ---------------------------------------------------------------------------------


def test_evicts_least_recently_used_and_get_refreshes_recency():
    cache, _ = make_cache(3)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == "A"  # "b" is now the oldest
    cache.put("d", "D")
    assert "b" not in cache
    assert [cache.get(k) for k in "acd"] == ["A", "C", "D"]
    assert len(cache) == 3
    assert cache.stats()["evictions"] == 1


def test_put_existing_key_replaces_value_and_refreshes_recency():
    cache, _ = make_cache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)  # "b" is now the oldest
    cache.put("c", 3)
    assert cache.get("a") == 10
    assert "b" not in cache
    assert len(cache) == 2


def test_capacity_is_never_exceeded():
    cache, _ = make_cache(5)
    for i in range(100):
        cache.put(i, i)
        assert len(cache) <= 5
    assert sorted(k for k in range(100) if k in cache) == [95, 96, 97, 98, 99]
    assert cache.stats()["evictions"] == 95


def test_max_size_must_be_positive():
    with pytest.raises(ValueError):
        LRUCache(0)
    assert LRUCache(1).max_size == 1


def test_expired_entry_is_never_served_and_is_counted():
    cache, clock = make_cache(3, default_ttl=10.0)
    cache.put("a", 1)
    clock.advance(9.999)
    assert cache.get("a") == 1
    clock.advance(0.001)
    assert "a" not in cache
    assert len(cache) == 1  # expiry is lazy: still stored until looked up
    assert cache.get("a", "gone") == "gone"
    assert len(cache) == 0
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["expirations"]) == (1, 1, 1)


def test_per_put_ttl_overrides_default_and_none_default_never_expires():
    cache, clock = make_cache(3, default_ttl=10.0)
    cache.put("short", 1, ttl=1.0)
    cache.put("long", 2, ttl=100.0)
    cache.put("default", 3)
    clock.advance(50.0)
    assert (cache.get("short"), cache.get("long"), cache.get("default")) == (None, 2, None)

    forever, clock = make_cache(3)
    forever.put("a", 1)
    clock.advance(10**9)
    assert forever.get("a") == 1


def test_ttl_zero_or_negative_stores_nothing_and_drops_older_value():
    cache, _ = make_cache(3, default_ttl=10.0)
    cache.put("a", 1, ttl=0)
    cache.put("b", 2, ttl=-5)
    assert len(cache) == 0
    cache.put("c", 3)
    cache.put("c", 4, ttl=0)
    assert "c" not in cache
    assert len(cache) == 0
    zero_default, _ = make_cache(3, default_ttl=0)
    zero_default.put("a", 1)
    assert len(zero_default) == 0


def test_refreshing_a_key_resets_its_ttl():
    cache, clock = make_cache(3, default_ttl=10.0)
    cache.put("a", 1)
    clock.advance(8.0)
    cache.put("a", 2)
    clock.advance(8.0)
    assert cache.get("a") == 2


def test_counters_hit_rate_delete_clear_and_contains():
    cache, _ = make_cache(3)
    assert cache.stats() == {
        "size": 0, "max_size": 3, "hits": 0, "misses": 0, "evictions": 0, "expirations": 0, "hit_rate": 0.0,
    }
    cache.put("a", 1)
    cache.get("a")
    cache.get("a")
    cache.get("a")
    cache.get("missing")
    assert "a" in cache and "missing" not in cache  # no counter change
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (3, 1, 0.75)
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    cache.put("b", 2)
    cache.clear()
    assert len(cache) == 0
    assert cache.stats()["hits"] == 3  # clear keeps the lifetime counters


def test_falsy_values_are_cached():
    cache, _ = make_cache(3)
    cache.put("zero", 0)
    cache.put("none", None)
    assert cache.get("zero", "default") == 0
    assert cache.get("none", "default") is None
    assert cache.stats()["hits"] == 2


def test_thread_safety_under_mixed_load():
    cache = LRUCache(max_size=32)
    threads_count, ops = 16, 2000
    gets = [0] * threads_count
    wrong: list[tuple[int, object]] = []
    start = threading.Barrier(threads_count)

    def worker(n: int) -> None:
        rng = random.Random(n)
        start.wait(SAFETY)
        for _ in range(ops):
            key = rng.randrange(64)
            if rng.random() < 0.5:
                gets[n] += 1
                value = cache.get(key)
                if value is not None and value != key * 2:
                    wrong.append((key, value))
            else:
                cache.put(key, key * 2)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY * 6)
    assert not any(t.is_alive() for t in threads)
    stats = cache.stats()
    assert wrong == []
    assert len(cache) <= 32 and stats["size"] == len(cache)
    assert stats["hits"] + stats["misses"] == sum(gets)
    assert stats["hits"] > 0 and stats["evictions"] > 0


# --- ResponseCache: keys ----------------------------------------------------------------------

BASE = {"model": "gemini-2.0-flash", "temperature": 0.0, "prompt": "hi", "categories": ["neg", "pos"]}


def test_make_key_is_64_lowercase_hex_digits_whatever_the_input():
    for params in (BASE, {}, {"prompt": "x" * 100_000}, {"prompt": "héllo ✓ \u0000"}):
        assert re.fullmatch(r"[0-9a-f]{64}", ResponseCache.make_key("classify", **params)), params


def test_make_key_ignores_the_order_of_the_parameters():
    key = ResponseCache.make_key("classify", **BASE)
    assert key == ResponseCache.make_key("classify", **dict(reversed(list(BASE.items()))))
    make_key = ResponseCache.make_key
    assert make_key("text", prompt="p", model="m") == make_key("text", model="m", prompt="p")


def test_make_key_is_the_same_in_every_process():
    """Workers share no memory but must agree on keys (a shared cache, logs): nothing per process, such
    as `hash()` with its random seed or a set's order, may go into a key."""
    script = ("import json, sys; from lru_cache import ResponseCache; "
              "print(ResponseCache.make_key('classify', **json.loads(sys.argv[1])))")
    keys = {subprocess.run([sys.executable, "-c", script, json.dumps(BASE)], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, check=True, timeout=60).stdout.strip()
            for seed in ("1", "2")}
    assert keys == {ResponseCache.make_key("classify", **BASE)}


@pytest.mark.parametrize(
    "change",
    [{"prompt": "hi!"}, {"temperature": 0.2}, {"model": "gemini-2.5-pro"}, {"categories": ["neg", "pos", "neutral"]},
     {"categories": ["pos", "neg"]}, {"language": "python"}],
)
def test_make_key_changes_with_any_parameter(change):
    assert ResponseCache.make_key("classify", **BASE) != ResponseCache.make_key("classify", **{**BASE, **change})


def test_make_key_changes_with_task_and_handles_unicode():
    assert ResponseCache.make_key("text", prompt="hi") != ResponseCache.make_key("code", prompt="hi")
    assert ResponseCache.make_key("text", prompt="héllo ✓") != ResponseCache.make_key("text", prompt="hello ✓")


@pytest.mark.parametrize("one, other", [
    ({"prompt": "a", "language": "b"}, {"prompt": "b", "language": "a"}),  # values swapped between names
    ({"prompt": "a", "language": "b"}, {"prompt": 'a","language":"b'}),  # what naive joining would confuse
    ({"prompt": "a b"}, {"prompt": "a", "b": None}),
    ({"temperature": 0}, {"temperature": 0.0}),  # compared as JSON: callers normalise numbers first
    ({"categories": ["a", "b"]}, {"categories": "a,b"}),
    ({"prompt": ""}, {}),
])
def test_make_key_tells_apart_inputs_that_differ_only_in_shape(one, other):
    assert ResponseCache.make_key("text", **one) != ResponseCache.make_key("text", **other)


def test_make_key_refuses_values_it_cannot_compare():
    with pytest.raises(TypeError):
        ResponseCache.make_key("classify", categories={"neg", "pos"})  # a set has no stable order


# --- ResponseCache: get_or_compute ------------------------------------------------------------

LIMITS = {"text": (2, 10.0), "code": (3, 100.0)}


class Counter:
    """A compute function that counts its calls and returns a fresh value each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return f"answer-{self.calls}"


def make_rc(**kwargs) -> tuple[ResponseCache, FakeClock]:
    clock = FakeClock()
    return ResponseCache(LIMITS, clock=clock.now, **kwargs), clock


def test_miss_then_hit():
    rc, _ = make_rc()
    compute = Counter()
    assert rc.get_or_compute("text", "k", compute) == ("answer-1", "miss")
    assert rc.get_or_compute("text", "k", compute) == ("answer-1", "hit")
    assert compute.calls == 1
    stats = rc.stats()
    assert (stats["text"]["hits"], stats["text"]["misses"], stats["text"]["size"]) == (1, 1, 1)


def test_read_false_bypasses_lookup_and_refreshes_the_entry():
    rc, _ = make_rc()
    compute = Counter()
    rc.get_or_compute("text", "k", compute)
    assert rc.get_or_compute("text", "k", compute, read=False) == ("answer-2", "miss")
    assert rc.get_or_compute("text", "k", compute) == ("answer-2", "hit")
    assert rc.stats()["text"]["misses"] == 1  # the bypass did no lookup


def test_write_false_does_not_store():
    rc, _ = make_rc()
    compute = Counter()
    assert rc.get_or_compute("text", "k", compute, write=False) == ("answer-1", "miss")
    assert rc.get_or_compute("text", "k", compute, write=False) == ("answer-2", "miss")
    assert rc.stats()["text"]["size"] == 0


def test_disabled_cache_always_computes_and_never_stores():
    rc, _ = make_rc(enabled=False)
    compute = Counter()
    assert rc.get_or_compute("text", "k", compute) == ("answer-1", "miss")
    assert rc.get_or_compute("text", "k", compute) == ("answer-2", "miss")
    assert rc.stats()["total"]["size"] == 0


def test_unknown_task_raises_key_error():
    rc, _ = make_rc()
    with pytest.raises(KeyError, match="unknown cache task 'nope'"):
        rc.get_or_compute("nope", "k", Counter())


def test_tasks_have_independent_sizes_and_ttls():
    rc, clock = make_rc()
    for i in range(3):
        rc.get_or_compute("text", f"t{i}", lambda i=i: i)
        rc.get_or_compute("code", f"c{i}", lambda i=i: i)
    stats = rc.stats()
    assert (stats["text"]["size"], stats["text"]["evictions"]) == (2, 1)
    assert (stats["code"]["size"], stats["code"]["evictions"]) == (3, 0)
    clock.advance(50.0)  # past text's 10 s, within code's 100 s
    assert rc.get_or_compute("text", "t2", lambda: "new") == ("new", "miss")
    assert rc.get_or_compute("code", "c2", lambda: "new") == (2, "hit")
    assert rc.stats()["text"]["expirations"] == 1


def test_stats_total_and_clear():
    rc, _ = make_rc()
    rc.get_or_compute("text", "a", Counter())
    rc.get_or_compute("text", "a", Counter())
    rc.get_or_compute("code", "b", Counter())
    total = rc.stats()["total"]
    assert total == {"size": 2, "hits": 1, "misses": 2, "evictions": 0, "expirations": 0, "coalesced": 0,
                     "hit_rate": pytest.approx(1 / 3)}
    rc.clear()
    assert rc.stats()["total"]["size"] == 0
    assert ResponseCache(LIMITS).stats()["total"]["hit_rate"] == 0.0
    with pytest.raises(ValueError):
        ResponseCache({"total": (1, None)})


# --- ResponseCache: single flight -------------------------------------------------------------


class ObservedCache(ResponseCache):
    """Signals `all_waiting` once `expected` followers have joined a flight."""

    def __init__(self, expected: int, **kwargs) -> None:
        super().__init__(LIMITS, **kwargs)
        self.expected = expected
        self.arrived = 0
        self.arrived_lock = threading.Lock()
        self.all_waiting = threading.Event()

    def _await_leader(self, flight, timeout):
        with self.arrived_lock:
            self.arrived += 1
            if self.arrived == self.expected:
                self.all_waiting.set()
        return super()._await_leader(flight, timeout)


def run_concurrently(n: int, call) -> list:
    """Start n threads together on `call`; return each one's result or raised exception."""
    results: list = [None] * n
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait(SAFETY)
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - the test inspects what each thread got
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY * 2)
    assert not any(t.is_alive() for t in threads)
    return results


def test_concurrent_identical_misses_compute_once():
    rc = ObservedCache(expected=19)
    calls = []

    def compute() -> str:
        calls.append(1)
        assert rc.all_waiting.wait(SAFETY), "followers never arrived"
        return "shared"

    results = run_concurrently(20, lambda: rc.get_or_compute("text", "k", compute))
    assert len(calls) == 1
    assert sorted(outcome for _, outcome in results) == ["coalesced"] * 19 + ["miss"]
    assert {value for value, _ in results} == {"shared"}
    stats = rc.stats()["text"]
    assert (stats["misses"], stats["hits"], stats["coalesced"], stats["size"]) == (1, 0, 19, 1)
    assert rc.get_or_compute("text", "k", compute) == ("shared", "hit")


def test_leader_failure_is_shared_not_cached_and_not_wedged():
    rc = ObservedCache(expected=19)
    boom = RuntimeError("provider down")
    calls = []

    def failing() -> str:
        calls.append(1)
        assert rc.all_waiting.wait(SAFETY), "followers never arrived"
        raise boom

    results = run_concurrently(20, lambda: rc.get_or_compute("text", "k", failing))
    assert len(calls) == 1
    assert sum(result is boom for result in results) == 1  # the leader's own
    copies = [result for result in results if result is not boom]
    assert all(type(c) is RuntimeError and c.args == boom.args and c.__cause__ is boom for c in copies)
    assert len({id(c) for c in copies}) == 19  # each follower its own, so tracebacks are not shared
    assert rc.stats()["text"]["size"] == 0
    assert rc.get_or_compute("text", "k", lambda: "recovered") == ("recovered", "miss")


def test_followers_get_gateway_errors_with_their_attributes():
    rc = ObservedCache(expected=3)

    def failing() -> str:
        assert rc.all_waiting.wait(SAFETY), "followers never arrived"
        raise UpstreamRateLimited("slow down", details={"quota": "rpm"}, retry_after=7)

    results = run_concurrently(4, lambda: rc.get_or_compute("text", "k", failing))
    assert all(isinstance(r, UpstreamRateLimited) and (r.message, r.details, r.retry_after) ==
               ("slow down", {"quota": "rpm"}, 7) for r in results)


def test_follower_computes_by_itself_after_wait_timeout_and_bypass_ignores_flight():
    rc, _ = make_rc()
    entered, release = threading.Event(), threading.Event()

    def slow() -> str:
        entered.set()
        assert release.wait(SAFETY)
        return "leader"

    leader = threading.Thread(target=lambda: rc.get_or_compute("text", "k", slow))
    leader.start()
    try:
        assert entered.wait(SAFETY)
        assert rc.get_or_compute("text", "k", lambda: "own", wait_timeout=0) == ("own", "miss")
        assert rc.get_or_compute("text", "k", lambda: "bypass", read=False, write=False) == ("bypass", "miss")
        assert rc.get_or_compute("text", "other", lambda: "free") == ("free", "miss")  # other keys not blocked
    finally:
        release.set()
        leader.join(SAFETY)
    assert rc.get_or_compute("text", "k", Counter()) == ("leader", "hit")
    assert rc.stats()["text"]["coalesced"] == 0
