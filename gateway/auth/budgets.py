"""Monthly budgets of API keys: refuse (402 `budget_exceeded`) before any provider call once a key's
month is spent, counting the requests it has in flight.

The rule: a task request of a key with `monthly_budget_usd` is admitted while

    spent this month + estimates of the key's requests in flight (this process) < budget

and then holds a reservation of its own estimated cost until it is accounted for. So a lone
request is refused exactly once the month is spent, and concurrent requests share what is left:
each one admitted counts against the others. The spend can pass the budget by at most the
last admitted request (plus what estimates fell short of real costs): with the default estimate,
which bounds a request's real cost, never more than one request's cost in one process.

- **Spend** comes from the ledger: one `SUM(total_cost)` over the key's rows of the UTC month,
  through the `(key_id, timestamp)` index, cached per key and re-read at most every
  `REFRESH_SECONDS`. This process's own records are added to the cached figure the moment they
  are committed (`recorded`), so it never lags behind itself; other worker processes' spend is
  seen within `REFRESH_SECONDS`. (A record that commits while a re-read runs may be counted
  twice until the next re-read: the error is on the side of refusing.)
- **Estimate** of a request: input tokens as the body's UTF-8 bytes / 4 (the body holds the
  prompt; four characters a token is the usual rule, and JSON quoting only adds bytes) plus
  `TEMPLATE_TOKENS` for the task's instructions, and as output tokens GEMINI_MAX_OUTPUT_TOKENS
  when set (the provider cannot answer more) or `DEFAULT_OUTPUT_TOKENS`, the default model's
  own output cap (gemini-2.0-flash: 8192), so the estimate is an upper bound of the real cost
  and in-flight requests cannot overspend what is left. A large estimate only limits how many
  requests of a key with little left can run at once; it never refuses a lone request while
  the budget has money left.
- **Reservations** live in this process's memory under one lock, released when the request is
  accounted for (after its ledger record, also for errors, cache hits and streams: `app.py`'s
  teardown). A cache hit costs $0 but still takes a reservation: whether it hits is known only
  after the check, and a key over its budget is refused whatever would have answered it.
- **Batches** (`reserve_many`): the items are admitted one by one, in order, as requests of their
  own would be, each counting the earlier items' estimates as in flight; the items that do not
  fit are refused on their own, and the batch as a whole when not even the first fits.
- Keys without a budget never reach this module (one attribute check in `app.py`).

Nothing here imports Flask.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from gateway.errors import BudgetExceeded
from gateway.storage.key_usage import month_bounds, month_of

REFRESH_SECONDS = 1.0  # how stale a key's month spend may be before it is read again from the ledger
DEFAULT_OUTPUT_TOKENS = 8192  # the output estimate without GEMINI_MAX_OUTPUT_TOKENS: gemini-2.0-flash's cap
TEMPLATE_TOKENS = 300  # the task instructions wrapped around a prompt (gateway/tasks/prompts.py), generously
_SPEND = ("SELECT COALESCE(SUM(total_cost), 0) FROM cost_records "
          "WHERE key_id = ? AND timestamp >= ? AND timestamp < ?")


def estimated_tokens(body_bytes: int, max_output_tokens: int | None) -> tuple[int, int]:
    """(input, output) tokens a request may use at most, from its body size."""
    return math.ceil(body_bytes / 4) + TEMPLATE_TOKENS, max_output_tokens or DEFAULT_OUTPUT_TOKENS


def next_month(month: str) -> date:
    """The first day of the month after `month` (YYYY-MM): when its budget resets."""
    return month_bounds(month)[1].date()


@dataclass
class _Spend:
    month: str
    ledger: float = 0.0  # the SUM read from the ledger
    read_at: float = float("-inf")  # monotonic time of that read
    own: float = 0.0  # this process's records committed since (or during) that read
    unreplayed: float = 0.0  # this process's records waiting in the ledger's spool (not in any SUM yet)
    reserved: float = 0.0  # estimates of this process's requests in flight
    reading: bool = False  # a thread is re-reading the ledger for this key


@dataclass
class Reservation:
    """What one admitted request holds until it is accounted for."""

    key_id: str
    month: str
    amount: float
    released: bool = field(default=False, compare=False)


class BudgetGuard:
    """Per-process check of keys' monthly budgets (thread-safe)."""

    def __init__(self, ledger_path: Path | str, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, refresh_seconds: float = REFRESH_SECONDS,
                 spooled: Callable[[], int] = lambda: 0):
        self._clock, self._monotonic, self._refresh = clock, monotonic, refresh_seconds
        self._spooled = spooled  # records of this process waiting in the ledger's spool (CostTracker.spooled)
        self._lock = threading.Lock()  # the figures below; never held during a query
        self._spend: dict[str, _Spend] = {}
        self._db_lock = threading.Lock()
        self._db = sqlite3.connect(ledger_path, isolation_level=None, check_same_thread=False, timeout=30)
        self.reads = 0  # ledger reads so far (tests, measurements)

    def reserve(self, key_id: str, budget: float, estimate: float) -> Reservation:
        """Admit a request of `key_id` and hold `estimate` for it, or raise BudgetExceeded (402)."""
        month = month_of(self._clock())
        self._refresh_if_stale(key_id, month)
        with self._lock:
            spend = self._entry(key_id, month)
            spent = spend.ledger + spend.own + spend.unreplayed
            if spent + spend.reserved >= budget:
                in_flight = spend.reserved
            else:
                spend.reserved += estimate
                return Reservation(key_id, month, estimate)
        raise _refusal(key_id, budget, spent, in_flight, month)

    def reserve_many(self, key_id: str, budget: float,
                     estimates: list[float]) -> tuple[list[Reservation], BudgetExceeded | None]:
        """Admit a batch's items in order, each as `reserve` admits a request of its own, the earlier items'
        estimates already held: the reservations of the items that fit (a prefix of `estimates`) and the
        refusal for the rest (None when all fit). Raises BudgetExceeded when not even the first fits, so a
        batch, like a request, passes the budget by at most one item."""
        month = month_of(self._clock())
        self._refresh_if_stale(key_id, month)
        admitted: list[Reservation] = []
        with self._lock:
            spend = self._entry(key_id, month)
            spent = spend.ledger + spend.own + spend.unreplayed
            for estimate in estimates:
                if spent + spend.reserved >= budget:
                    break
                spend.reserved += estimate
                admitted.append(Reservation(key_id, month, estimate))
            in_flight = spend.reserved
        if len(admitted) == len(estimates):
            return admitted, None
        refusal = _refusal(key_id, budget, spent, in_flight, month)
        if not admitted:
            raise refusal
        return admitted, refusal

    def release(self, reservation: Reservation) -> None:
        """The request was accounted for (its ledger record, if any, is committed and `recorded`)."""
        with self._lock:  # a batch item's reservation may be released by its worker and its request thread
            if reservation.released:
                return
            reservation.released = True
            spend = self._spend.get(reservation.key_id)
            if spend is not None and spend.month == reservation.month:
                left = spend.reserved - reservation.amount
                spend.reserved = left if left > 1e-12 else 0.0  # not a float residue of adds and subtracts

    def recorded(self, key_id: str, cost: float, *, spooled: bool = False) -> None:
        """A ledger record of `key_id` costing `cost` was committed by this process (or, `spooled`,
        kept in the ledger's spool until it can be: no SUM sees it until then, so it is kept apart)."""
        if cost <= 0:
            return
        with self._lock:
            spend = self._spend.get(key_id)
            if spend is not None and spend.month == month_of(self._clock()):
                if spooled:
                    spend.unreplayed += cost
                else:
                    spend.own += cost

    def state(self, key_id: str) -> dict:
        """This process's view of a key's month (tests and diagnostics)."""
        with self._lock:
            spend = self._spend.get(key_id)
            if spend is None:
                return {"spent": 0.0, "reserved": 0.0}
            return {"spent": spend.ledger + spend.own, "reserved": spend.reserved}

    def _entry(self, key_id: str, month: str) -> _Spend:
        spend = self._spend.get(key_id)
        if spend is None or spend.month != month:  # a new month starts from what the ledger says
            spend = self._spend[key_id] = _Spend(month)
        return spend

    def _refresh_if_stale(self, key_id: str, month: str) -> None:
        now = self._monotonic()
        with self._lock:
            spend = self._entry(key_id, month)
            if spend.reading or now - spend.read_at < self._refresh:
                return  # fresh, or another thread is reading it now: use what we have
            spend.reading = True
            own_before = spend.own
        try:
            start, end = month_bounds(month)
            with self._db_lock:
                total = self._db.execute(_SPEND, (key_id, start.timestamp(), end.timestamp())).fetchone()[0]
                self.reads += 1
        except sqlite3.Error:
            total = None  # the ledger is unreadable for a moment: keep the figure we have
        with self._lock:
            spend.reading = False
            if total is not None and spend.month == month:
                spend.ledger, spend.read_at = total, now
                spend.own -= own_before  # what was recorded during the read may be in the SUM too: kept (refuse-side)
                if not self._spooled():
                    spend.unreplayed = 0.0  # the spool is replayed: those records are in this SUM

    def close(self) -> None:
        with self._db_lock:
            self._db.close()


def _refusal(key_id: str, budget: float, spent: float, in_flight: float, month: str) -> BudgetExceeded:
    reset = next_month(month).isoformat()
    why = ("monthly budget is spent" if spent >= budget
           else "remaining monthly budget is held by its requests in flight")
    return BudgetExceeded(f"This API key's {why}; it resets on {reset} (UTC)",
                          details={"key_id": key_id, "budget": budget, "spent": round(spent, 10),
                                   "in_flight": round(in_flight, 10), "reset": reset})

