"""Test doubles at the I/O seam: a clock whose sleep advances time instead of waiting."""

from __future__ import annotations


class FakeClock:
    """`now()` for RetryPolicy.clock and `sleep()` for RetryPolicy.sleep; records every wait."""

    def __init__(self, start: float = 1000.0):
        self.current = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.current

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.current += seconds

    def advance(self, seconds: float) -> None:
        self.current += seconds
