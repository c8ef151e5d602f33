"""Per-key tokens per minute: a moving window of the tokens each key's answers used, in this process.

Checked before a task runs (`check`: 429 `token_limit_exceeded` once the last 60 seconds hold
the key's `tokens_per_minute` or more), filled when a request is accounted for (`add`: the
input and output tokens of answers that reached the provider; cache hits are free). A request
is let through while the window is below the limit, so a key can pass its limit by at most the
requests it has in flight at once. The window lives in each worker process: with N workers a
key can use up to N times its limit (documented; a shared store is a later step).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from gateway.errors import TokenLimitExceeded

WINDOW_SECONDS = 60.0


class TokenWindows:
    """Thread-safe: one lock, a deque of (time, tokens) per key, pruned as it is read."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = WINDOW_SECONDS):
        self._clock = clock
        self._window = window
        self._lock = threading.Lock()
        self._used: dict[str, tuple[deque, list[int]]] = {}  # key id -> (entries, [their sum])

    def used(self, key_id: str) -> int:
        """Tokens the key used in the last window."""
        with self._lock:
            return self._prune(key_id, self._clock())[1]

    def check(self, key_id: str, limit: int) -> None:
        """TokenLimitExceeded (with the wait until enough of the window has passed) if the key is at its limit."""
        now = self._clock()
        with self._lock:
            entries, used = self._prune(key_id, now)
            if used < limit:
                return
            freed, wait = used, 0.0
            for moment, tokens in entries:  # oldest first: when does the window drop below the limit?
                freed -= tokens
                wait = moment + self._window - now
                if freed < limit:
                    break
        raise TokenLimitExceeded(
            f"This API key used its {limit} tokens per minute; retry after the time in Retry-After",
            details={"tokens_per_minute": limit, "used": used}, retry_after=max(1, math.ceil(wait)))

    def add(self, key_id: str, tokens: int) -> None:
        if tokens <= 0:
            return
        now = self._clock()
        with self._lock:
            self._prune(key_id, now)  # so a key's entries never hold more than one window
            entries, total = self._used.setdefault(key_id, (deque(), [0]))
            entries.append((now, tokens))
            total[0] += tokens

    def _prune(self, key_id: str, now: float) -> tuple[deque, int]:
        slot = self._used.get(key_id)
        if slot is None:
            return deque(), 0
        entries, total = slot
        while entries and entries[0][0] <= now - self._window:
            total[0] -= entries.popleft()[1]
        if not entries:
            del self._used[key_id]
        return entries, total[0]
