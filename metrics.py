"""Process-wide counters for `/stats`: what happened since this process started.

Costs, tokens and latencies come from the ledger (`cost_tracker`), which survives restarts;
these are the events that are not ledger records: every request by endpoint and status
(health and Swagger included), upstream retries, rate-limit rejections, security events.
"""

from __future__ import annotations

import threading
from collections import Counter


class GatewayMetrics:
    """Thread-safe counters; `snapshot()` gives plain dicts for JSON."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._security: Counter[str] = Counter()
        self._retries = 0
        self._rate_limited = 0

    def count_request(self, endpoint: str, status: int, error_code: str | None = None) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1
            if error_code == "rate_limited":  # the gateway's own limiter, not the provider's 429
                self._rate_limited += 1

    def count_retry(self, attempt: int = 0, wait: float = 0.0) -> None:
        with self._lock:
            self._retries += 1

    def count_security_event(self, event_type: str) -> None:
        with self._lock:
            self._security[event_type] += 1

    def snapshot(self) -> dict:
        with self._lock:
            by_endpoint: dict[str, dict[str, int]] = {}
            for (endpoint, status), count in sorted(self._requests.items()):
                by_endpoint.setdefault(endpoint, {})[str(status)] = count
            return {
                "requests_total": sum(self._requests.values()),
                "requests_by_endpoint": by_endpoint,
                "upstream_retries": self._retries,
                "rate_limited_responses": self._rate_limited,
                "security_events": dict(sorted(self._security.items())),
            }
