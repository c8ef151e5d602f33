"""Running a batch's items: identical items share one call, the rest run on one bounded pool per process.

`BatchRunner.run(items)` takes items the HTTP layer has already validated (task, inputs, options,
cache control: everything read from the Flask request is read there, on the request thread) and
returns one `ItemResult` per item, in item order. Each distinct item goes through
`TaskService.run` (cache, single flight, retries, fallbacks, pricing) on the runner's pool; an item
identical to an earlier one (same task, inputs, options and cache control) makes no call of its
own and gets that item's answer as "coalesced" ($0, its cost counted as saved), also under
`no-store`/`no-cache`, which only govern the shared cache.

Why one pool per process, not per request: the pool is what bounds the upstream calls batches make.
A thread per item per request would let a thousand concurrent batches start 50,000 threads (and
as many provider calls); with one pool of `workers` threads, any number of batches queue their
items and at most `workers` of them are with a provider at once.

The deadline: an item still waiting for a worker `deadline` seconds after its batch started is
not run (a 504 `upstream_timeout` of its own, no call, no cost), so a slow provider makes a batch
wait at most that long for workers, plus one call deadline for the items already running (each
call is bounded by the retry policy's own deadline). No item holds a worker longer than a call may
take, so a stalled batch cannot hold the pool forever.

Accounting as each item ends: `run`'s `settle` is called once per item as soon as its result
exists, on the worker that ran it (on the caller's thread for items never started and for
copies), so an item's ledger row is written right after its call, whatever happens to the rest
of the batch: no upstream call can go unrecorded. `admit` is called on the worker just before an
item's call (the key's tokens per minute): an error it raises is the item's answer, no call.

Admission (`BatchAdmission`): each batch in progress holds a server thread while its items wait
for the pool, so the number of batches in progress per process is bounded too, without waiting:
one over the bound is refused at once (503 `batch_busy`), and plain requests keep their threads.

Nothing here imports Flask.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace

from cost_tracker import Cost
from gateway.errors import BatchBusy, UpstreamTimeout
from gateway.tasks.service import CacheControl, TaskOptions, TaskOutcome, TaskService

log = logging.getLogger("gateway.batch")


@dataclass(frozen=True)
class BatchItem:
    """One valid item of a batch, ready to run (nothing in it refers to the HTTP request)."""

    index: int
    task: str
    inputs: dict
    options: TaskOptions
    control: CacheControl

    def identity(self) -> str:
        """Equal for items that would make the same call: they share one."""
        return json.dumps([self.task, self.inputs, asdict(self.options), asdict(self.control)],
                          sort_keys=True, default=str, ensure_ascii=False)


@dataclass(frozen=True)
class ItemResult:
    """What one item got: an outcome or the error to answer, and how long it took."""

    index: int
    outcome: TaskOutcome | None = None
    error: BaseException | None = None
    elapsed_ms: float = 0.0
    shared_with: int | None = None  # the index of the identical item whose call this one shared
    overall: float | None = None  # the overall spend after the item's ledger row (`settle`), if it has one


Admit = Callable[[BatchItem], None]  # raises the item's error (no call), on the worker, just before its call
Settle = Callable[[ItemResult], ItemResult]  # accounts for the item (its ledger row) as soon as its result exists


class BatchAdmission:
    """At most `limit` batches in progress in this process; one more is refused at once, never queued."""

    def __init__(self, limit: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise BatchBusy(f"The gateway is running its most batches at once ({self.limit}, BATCH_MAX_IN_FLIGHT); "
                            "retry after the time in Retry-After", details={"max_in_flight": self.limit},
                            retry_after=1)
        try:
            yield
        finally:
            self._slots.release()


class BatchRunner:
    """The process's pool for batch items (thread-safe; one per app)."""

    def __init__(self, service: TaskService, *, workers: int, deadline: float,
                 clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.workers = workers
        self.deadline = deadline
        self._clock = clock
        # Threads start on first use and idle ones cost nothing; they end with the runner.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch-item")

    def run(self, items: Sequence[BatchItem], *, admit: Admit | None = None,
            settle: Settle | None = None) -> list[ItemResult]:
        """Run `items` (deduplicated) on the pool; one result per item, in the order given, each passed
        through `settle` exactly once as soon as it exists (see the module's docstring)."""
        settle = _guarded(settle)
        first_of: dict[str, BatchItem] = {}
        shared: list[tuple[BatchItem, BatchItem]] = []  # (duplicate, the item it shares)
        for item in items:
            original = first_of.setdefault(item.identity(), item)
            if original is not item:
                shared.append((item, original))
        start_by = self._clock() + self.deadline
        futures: dict[int, Future] = {
            item.index: self._pool.submit(self._run_one, item, start_by, admit, settle) for item in first_of.values()}
        _, late = wait(futures.values(), timeout=self.deadline)
        for future in late:
            future.cancel()  # still queued: never runs; running ones end within their own call deadline
        wait(late)
        results = {index: self._result(index, future, settle) for index, future in futures.items()}
        for duplicate, original in shared:
            results[duplicate.index] = settle(self._shared(duplicate, results[original.index]))
        return [results[item.index] for item in items]

    @property
    def threads(self) -> int:
        """Worker threads started so far (never more than `workers`)."""
        return len(self._pool._threads)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run_one(self, item: BatchItem, start_by: float, admit: Admit | None, settle: Settle) -> ItemResult:
        return settle(self._answer(item, start_by, admit))

    def _answer(self, item: BatchItem, start_by: float, admit: Admit | None) -> ItemResult:
        if self._clock() > start_by:  # dequeued after the batch's deadline: not worth a call any more
            return ItemResult(item.index, error=self._not_started())
        started = time.perf_counter()
        try:
            if admit is not None:
                admit(item)
            outcome = self.service.run(item.task, item.inputs, item.options, item.control)
        except Exception as exc:  # noqa: BLE001 - one failing item never fails the others: it becomes its answer
            return ItemResult(item.index, error=exc, elapsed_ms=(time.perf_counter() - started) * 1000)
        return ItemResult(item.index, outcome=outcome, elapsed_ms=(time.perf_counter() - started) * 1000)

    def _result(self, index: int, future: Future, settle: Settle) -> ItemResult:
        try:
            return future.result(timeout=0)  # settled by its worker
        except CancelledError:
            return settle(ItemResult(index, error=self._not_started()))

    def _not_started(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"Not run: no worker was free within the batch's {self.deadline:g} s deadline",
                               details={"deadline_seconds": self.deadline, "started": False})

    def _shared(self, duplicate: BatchItem, original: ItemResult) -> ItemResult:
        """The answer of an identical item, without a call: $0 charged, the full price counted as saved."""
        if original.outcome is None:
            return replace(original, index=duplicate.index, elapsed_ms=0.0, shared_with=original.index)
        outcome = original.outcome
        full = self.service.price_of(outcome.model_id, outcome.input_tokens, outcome.output_tokens)
        coalesced = replace(outcome, cache_status="coalesced", cost=Cost(), saved=full, upstream_ms=None)
        return ItemResult(duplicate.index, outcome=coalesced, elapsed_ms=0.0, shared_with=original.index)


def _guarded(settle: Settle | None) -> Settle:
    """`settle`, never raising: a failure to account for one item is logged (with its traceback) and leaves
    that item's result as it was, so it can neither lose a worker's result nor the other items' rows."""
    if settle is None:
        return lambda result: result

    def guarded(result: ItemResult) -> ItemResult:
        try:
            return settle(result)
        except Exception:  # noqa: BLE001 - the item was answered; its accounting failure is the operator's to see
            log.exception("accounting for batch item %s failed", result.index)
            return result

    return guarded

