"""In-memory response cache: the same question to the model should not be paid for twice.

Two layers:
- `LRUCache`: a thread-safe map with a size bound (least recently used goes first) and a
  time-to-live per entry, with hit/miss/eviction/expiration counters for `/stats`.
- `ResponseCache`: one `LRUCache` per task (text, code, classify each with its own size and
  TTL), keys derived from every parameter that changes the answer, and single flight: when N
  identical requests miss at once, one of them calls the provider and the others wait for its
  answer (or its error) instead of making N paid calls.

Standard library only; the clock is injectable so tests never sleep.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

V = TypeVar("V")
_MISSING = object()


class LRUCache:
    """Bounded, expiring map; every operation is O(1) and runs under one lock.

    `len()` and `stats()["size"]` count stored entries, which may include expired ones not yet
    looked up: expiry is lazy (an expired entry is dropped when `get` finds it, or when it
    reaches the LRU end and is evicted), so no operation ever scans the whole cache.
    """

    def __init__(self, max_size: int, default_ttl: float | None = None, clock: Callable[[], float] = time.monotonic):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.default_ttl = default_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._data: OrderedDict[Hashable, tuple[Any, float | None]] = OrderedDict()  # key -> (value, expires_at)
        self._hits = self._misses = self._evictions = self._expirations = 0

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The live value (now the most recently used), else `default`; an expired entry is dropped."""
        with self._lock:
            entry = self._data.get(key, _MISSING)
            if entry is _MISSING:
                self._misses += 1
                return default
            value, expires_at = entry
            if expires_at is not None and self._clock() >= expires_at:
                del self._data[key]
                self._expirations += 1
                self._misses += 1
                return default
            self._data.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store or replace `key` as the most recently used entry.

        `ttl` None means the cache's `default_ttl` (None there: never expires). A ttl <= 0
        stores nothing and drops any older value for `key`, so a stale answer is never served.
        """
        if ttl is None:
            ttl = self.default_ttl
        with self._lock:
            if ttl is not None and ttl <= 0:
                self._data.pop(key, None)
                return
            expires_at = None if ttl is None else self._clock() + ttl
            if key in self._data:
                self._data.move_to_end(key)
            elif len(self._data) >= self.max_size:
                self._data.popitem(last=False)
                self._evictions += 1
            self._data[key] = (value, expires_at)

    def delete(self, key: Hashable) -> bool:
        """Remove `key`; True if it was stored (even if already expired)."""
        with self._lock:
            return self._data.pop(key, _MISSING) is not _MISSING

    def clear(self) -> None:
        """Drop every entry; the counters are lifetime totals and are kept."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        """True if `key` holds a live value; touches neither recency nor counters."""
        with self._lock:
            entry = self._data.get(key, _MISSING)
            if entry is _MISSING:
                return False
            expires_at = entry[1]
            return expires_at is None or self._clock() < expires_at

    def stats(self) -> dict[str, Any]:
        """A consistent snapshot of size and counters; hit_rate is 0.0 before any lookup."""
        with self._lock:
            lookups = self._hits + self._misses
            return {
                "size": len(self._data),
                "max_size": self.max_size,
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "expirations": self._expirations,
                "hit_rate": self._hits / lookups if lookups else 0.0,
            }


class _Flight:
    """One computation in progress; followers wait on `done` and then read its outcome."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ResponseCache:
    """Per-task LRU caches of model answers, with single flight for concurrent identical misses.

    `limits` maps each task name to `(max_size, ttl_seconds)`; a ttl of None never expires and
    a ttl <= 0 caches nothing for that task. Counters, per task: `hits` and `misses` count
    lookups in the cache; `coalesced` counts requests that waited for another request's
    computation instead (served its value or raised its error). Coalesced requests are neither
    hits nor misses, so `hit_rate` = hits / (hits + misses). Calls with `read=False` or on a
    disabled cache skip the lookup and change no counter.
    """

    def __init__(
        self,
        limits: Mapping[str, tuple[int, float | None]],
        clock: Callable[[], float] = time.monotonic,
        enabled: bool = True,
    ):
        if "total" in limits:
            raise ValueError("'total' is reserved for the summed stats and cannot be a task name")
        self.enabled = enabled
        self._caches = {task: LRUCache(size, ttl, clock) for task, (size, ttl) in limits.items()}
        self._coalesced = dict.fromkeys(self._caches, 0)
        self._inflight: dict[tuple[str, str], _Flight] = {}
        self._lock = threading.Lock()  # guards _inflight, _coalesced, and lookup+join / store+leave as one step

    @staticmethod
    def make_key(task: str, **params: Any) -> str:
        """SHA-256 hex of the canonical JSON of the task and its parameters.

        Pass everything that changes the answer (model, temperature, prompt, language,
        normalised categories...): a parameter left out makes different questions share one
        cached answer. Values must be JSON-serialisable (TypeError otherwise); they are compared
        as JSON, so normalise first (category order, 0 vs 0.0, tuple and list are the same).
        """
        canonical = json.dumps({"task": task, **params}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def get_or_compute(
        self,
        task: str,
        key: str,
        compute: Callable[[], V],
        *,
        read: bool = True,
        write: bool = True,
        wait_timeout: float | None = None,
    ) -> tuple[V, str]:
        """`(value, outcome)` with outcome "hit", "miss" or "coalesced"; compute's errors propagate.

        read=False (client sent no-cache) skips both the lookup and the single flight; write=False
        keeps the answer out of the cache. A follower waits at most `wait_timeout` seconds (None:
        as long as the leader takes) and then looks up once more and computes by itself. Errors
        are shared with the waiting followers but never cached.
        """
        cache = self._cache(task)
        if not self.enabled:
            return compute(), "miss"
        if not read:
            return self._compute_alone(cache, key, compute, write), "miss"

        with self._lock:
            flight = self._inflight.get((task, key))
            leader = flight is None
            if leader:
                value = cache.get(key, _MISSING)
                if value is not _MISSING:
                    return value, "hit"
                flight = self._inflight[(task, key)] = _Flight()

        if not leader:
            if not self._await_leader(flight, wait_timeout):  # leader is late: look once more, then go alone
                value = cache.get(key, _MISSING)
                if value is not _MISSING:
                    return value, "hit"
                return self._compute_alone(cache, key, compute, write), "miss"
            with self._lock:
                self._coalesced[task] += 1
            if flight.error is not None:
                raise _own_copy(flight.error) from flight.error
            return flight.value, "coalesced"

        try:
            flight.value = compute()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:  # store and leave in one step: a reader sees the value or the flight, never neither
                if write and flight.error is None:
                    cache.put(key, flight.value)
                del self._inflight[(task, key)]
            flight.done.set()
        return flight.value, "miss"

    def lookup(self, task: str, key: str) -> Any:
        """The cached value (counted as a hit or a miss), or None; None too when the cache is off. For answers
        that are not computed under single flight: a stream, stored with `store` once it finished."""
        cache = self._cache(task)
        return cache.get(key) if self.enabled else None

    def store(self, task: str, key: str, value: Any) -> None:
        """Cache `value` under `key` (nothing when the cache is off)."""
        cache = self._cache(task)
        if self.enabled:
            cache.put(key, value)

    @staticmethod
    def _compute_alone(cache: LRUCache, key: str, compute: Callable[[], V], write: bool) -> V:
        value = compute()
        if write:
            cache.put(key, value)
        return value

    def _await_leader(self, flight: _Flight, timeout: float | None) -> bool:
        """True once the leader finished, False on timeout (a seam tests use to see followers arrive)."""
        return flight.done.wait(timeout)

    def _cache(self, task: str) -> LRUCache:
        try:
            return self._caches[task]
        except KeyError:
            raise KeyError(f"unknown cache task {task!r}; configured: {sorted(self._caches)}") from None

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per task: the LRUCache stats plus `coalesced`; "total" sums them with an overall hit_rate."""
        with self._lock:
            coalesced = dict(self._coalesced)
        out: dict[str, dict[str, Any]] = {}
        total = dict.fromkeys(("size", "hits", "misses", "evictions", "expirations", "coalesced"), 0)
        for task, cache in self._caches.items():
            out[task] = {**cache.stats(), "coalesced": coalesced[task]}
            for name in total:
                total[name] += out[task][name]
        lookups = total["hits"] + total["misses"]
        out["total"] = {**total, "hit_rate": total["hits"] / lookups if lookups else 0.0}
        return out

    def clear(self) -> None:
        """Drop every cached answer (counters are kept; computations in flight may still store theirs)."""
        for cache in self._caches.values():
            cache.clear()


def _own_copy(error: BaseException) -> BaseException:
    """A follower's copy of the leader's error (same type, message and attributes).

    Raising one exception object in many threads makes them all append to one shared
    traceback, which grows with every follower and is mutated by several threads at once.
    """
    try:
        duplicate = copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied: share a wrapper instead
        return RuntimeError(f"the shared computation failed: {error!r}")
    duplicate.__traceback__ = None
    return duplicate
