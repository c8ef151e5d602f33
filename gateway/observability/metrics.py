"""Process-wide counters for `/stats`: what happened since this process started.

Costs, tokens and latencies come from the ledger (`cost_tracker`), which survives restarts;
these are the events that are not ledger records: every request by endpoint and status
(health and Swagger included), upstream retries, rate-limit rejections, security events.

Requests are counted by the route that matched (its URL rule, such as `/api/v1/generate/text`),
never by the raw path: a stranger can send any number of distinct paths, and each would
otherwise stay in memory and in `/stats` for the life of the process. Paths that match no route
share one bucket, `<unrouted>`, and the table has a hard cap besides, so its size is fixed by
the app's routes and the HTTP status codes whatever arrives.
"""

from __future__ import annotations

import threading
from collections import Counter

UNROUTED = "<unrouted>"  # every path that matched no route (404s, and 405s before routing found a rule)
OTHER = "<other>"  # past MAX_COUNTER_KEYS: a guard in case a caller passes unbounded names
MAX_COUNTER_KEYS = 1024  # (endpoint, status) pairs; the app has about 20 routes and a few statuses each


class GatewayMetrics:
    """Thread-safe counters; `snapshot()` gives plain dicts for JSON."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._security: Counter[str] = Counter()
        self._retries = 0
        self._rate_limited = 0

    def count_request(self, endpoint: str, status: int, error_code: str | None = None) -> None:
        """Count one request under its route template (or `UNROUTED`), never its raw path."""
        key = (endpoint, status)
        with self._lock:
            if key not in self._requests and len(self._requests) >= MAX_COUNTER_KEYS:
                key = (OTHER, status)
            self._requests[key] += 1
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
