"""`POST /api/v1/generate/batch`: many text, code and classify requests in one, each answered on its own.

The envelope `{"items": [...]}` (1 to BATCH_MAX_ITEMS items) is checked first: anything else, or
too many items, is a 400 before any work. Then each item is checked like a request of its own
(its task's schema and options, the key's `allowed_tasks` and `allowed_models`): an invalid item
gets its own error in the answer and the others still run. The valid items run on the process's
batch pool (`gateway/tasks/batch.py`), everything they need from the Flask request (key, caller,
options, cache control) read here on the request thread first.

Admission: at most BATCH_MAX_IN_FLIGHT batches are in progress per process; one more is refused
at once with 503 `batch_busy` (before the rate limiter counts it, before any item is read or
reserved), so batches waiting for the pool cannot take every server thread.

Accounting: each item is billed as a task request of its own (one ledger row, request id
`<batch request id>.<item index>`, the task's own endpoint, the key id, the client's
X-Request-ID), written as soon as the item's result exists (by the pool worker that ran it, see
`gateway/tasks/batch.py`), so nothing that happens to the batch afterwards can leave an upstream
call unrecorded; the batch request adds no row. The rate limit counts the items (Flask-Limiter
`cost=`). The monthly budget admits the items one by one, in order, as requests of their own
(`BudgetGuard.reserve_many`): those that do not fit get their own 402, and when none fits the
batch is a 402. The key's tokens-per-minute window is checked once before the batch and again by
the worker before each item's call (an item over it gets its own 429), and gets each item's
tokens as soon as it is answered.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import replace

from flask import request
from flask_restx import Namespace, Resource, fields

from gateway.auth import budgets
from gateway.auth.guard import check_task_allowed
from gateway.container import Gateway, RequestInfo
from gateway.errors import GatewayError, InvalidRequest, error_body, sane_retry_after
from gateway.http.request_state import state
from gateway.http.routes import json_body, request_id
from gateway.http.schemas import SECURITY, Schemas
from gateway.http.task_routes import cache_control, outcome_fields, task_options
from gateway.tasks.batch import BatchAdmission, BatchItem, BatchRunner, ItemResult
from gateway.tasks.service import TaskOutcome
from gateway.tasks.table import TASKS

BATCH_PATH = "/api/v1/generate/batch"
PATH_OF_TASK = {name: f"/api/v1{task.path}" for name, task in TASKS.items()}  # an item is recorded under its endpoint
log = logging.getLogger("gateway.http")

DOC = ("Run up to BATCH_MAX_ITEMS text, code and classify requests in one call, each answered on its own.\n\n"
       "Body `{\"items\": [{\"task\": \"text\"|\"code\"|\"classify\", ...that task's own fields}]}`. The answer "
       "lists, in item order, each item's result (as the task's own endpoint answers it) or its error "
       "({error, code, details} with the `status` it would have had), plus totals. 200 whenever the envelope "
       "is valid, even if items failed. Identical items share one upstream call. Each item is one ledger row "
       "and counts against the key's rate limit, tokens per minute and monthly budget.")


class AnyItem(fields.Raw):
    """A batch item in the spec: any JSON value. Each item is checked on its own, and a bad one is answered in
    the 200's `items` (the others still run), so the envelope's schema must not promise a 400 for it."""

    __schema_type__ = None


def batch_cost(max_items: int):
    """Flask-Limiter's `cost=`: a batch counts as many requests as it has items (one when it will be refused
    as a 400 anyway: not an object, no list, or over `max_items`). The body is parsed once (Flask caches it)."""

    def cost() -> int:
        body = request.get_json(silent=True) if request.is_json else None
        items = body.get("items") if isinstance(body, dict) else None
        return len(items) if isinstance(items, list) and 0 < len(items) <= max_items else 1

    return cost


def batch_namespace(gateway: Gateway, schemas: Schemas, batch_limit) -> tuple[Namespace, str]:
    """The batch resource under /generate, and the process's pool its items run on."""
    config = gateway.config
    runner = BatchRunner(gateway.service, workers=config.batch_concurrency,
                         deadline=gateway.service.router.policy.deadline)
    admission = BatchAdmission(config.batch_max_in_flight)
    ns = Namespace("batch", description="Many task requests in one call")
    request_model = ns.model("BatchRequest", {
        "items": fields.List(AnyItem(description="An object: `task` (text, code or classify) and that task's own "
                                                 "fields (TextGeneration, CodeGeneration or TextClassification); an "
                                                 "item that is not is answered with its own 400 in `items`"),
                             required=True, min_items=1, max_items=config.batch_max_items,
                             example=[{"task": "text", "prompt": "Write a haiku about the sea"},
                                      {"task": "code", "prompt": "Reverse a string", "language": "python"},
                                      {"task": "classify", "text": "I loved it",
                                       "categories": ["positive", "negative"]}],
                             description=f"1 to {config.batch_max_items} items (BATCH_MAX_ITEMS)"),
    }, strict=True)
    answer_model = ns.model("BatchResponse", {
        "items": fields.List(fields.Raw, description="Per item, in order: `index`, `task`, `status`, and either the "
                                                     "task's answer fields or `error`, `code`, `details`"),
        "totals": fields.Raw(description="items, succeeded, failed, input_tokens, output_tokens, total_tokens, "
                                         "cost, saved, cache_hits"),
        "request_id": fields.String(example="3f2c9a7e4b1d4e0f9a8b7c6d5e4f3a2b"),
    })

    def admitted(view):
        """Outside the rate limiter: a batch refused as busy has not used any of the client's limit."""
        @functools.wraps(view)
        def run_admitted(*args, **kwargs):
            with admission.slot():
                return view(*args, **kwargs)

        return run_admitted

    @ns.route("/batch")
    class BatchGeneration(Resource):
        @ns.expect(request_model)
        @ns.doc(security=SECURITY)
        @ns.response(200, "Each item's answer or error, in order, and the totals", answer_model)
        @ns.response(400, "The envelope is not {\"items\": [1..BATCH_MAX_ITEMS objects]}", schemas.error)
        @ns.response(401, "No valid API key, when AUTH_ENABLED", schemas.error)
        @ns.response(402, "The key's monthly budget cannot cover even the first item", schemas.error)
        @ns.response(413, "Body too large", schemas.error)
        @ns.response(415, "Body is not JSON", schemas.error)
        @ns.response(429, "Rate limited (each item counts) or the key's tokens per minute are used", schemas.error)
        @ns.response(503, "BATCH_MAX_IN_FLIGHT batches are running, or the key store or ledger stayed busy; "
                          "see Retry-After", schemas.error)
        @admitted
        @batch_limit
        def post(self):
            items = _envelope(json_body(), config.batch_max_items)
            key = state().api_key
            if key is not None and key.tokens_per_minute is not None:
                gateway.tokens.check(key.id, key.tokens_per_minute)
            batch_id = request_id()
            checked = [_checked_item(gateway, schemas, index, raw) for index, raw in enumerate(items)]
            ledger = _ItemLedger(gateway, batch_id, items, checked)
            try:
                if key is not None and key.monthly_budget_usd is not None:
                    checked = ledger.reserve(key)
                for index, item in enumerate(checked):
                    if not isinstance(item, BatchItem):
                        ledger.settle(ItemResult(index, error=item))
                ran = {result.index: result for result in runner.run(
                    [item for item in checked if isinstance(item, BatchItem)],
                    admit=_token_check(gateway, key), settle=ledger.settle)}
            finally:
                ledger.release_all()
            answers = [_answer_safely(gateway, batch_id, items[index], item,
                                      ran.get(index) or ItemResult(index, error=item))
                       for index, item in enumerate(checked)]
            totals = _totals(answers)
            headers = {"X-Tokens-Input": str(totals["input_tokens"]), "X-Tokens-Output": str(totals["output_tokens"]),
                       "X-Cost-Total": f"{totals['cost']:.10f}", "X-Cost-Saved": f"{totals['saved']:.10f}"}
            return {"items": [answer for answer, _ in answers], "totals": totals, "request_id": batch_id}, 200, headers

        post.__doc__ = DOC

    ns.runner = runner  # the process's pool (tests look at it)
    return ns, "/generate"


class _ItemLedger:
    """Each item's accounting: its budget reservation, and its ledger row written the moment its result exists.

    Everything it needs from the Flask request is read here, on the request thread, so `settle` can run on a
    pool worker."""

    def __init__(self, gateway: Gateway, batch_id: str, raw_items: list, checked: list):
        self.gateway = gateway
        self.raw_items = raw_items
        self.checked = checked
        self.reservations: dict[int, budgets.Reservation] = {}
        context = state()
        key = context.api_key
        client = request.remote_addr or ""
        self.infos = [self._info(batch_id, index, raw, item, context, client, key)
                      for index, (raw, item) in enumerate(zip(raw_items, checked, strict=True))]

    def _info(self, batch_id: str, index: int, raw, item, context, client: str, key) -> RequestInfo:
        valid = isinstance(item, BatchItem)
        return RequestInfo(
            request_id=f"{batch_id}.{index}", method="POST", path=PATH_OF_TASK.get(_task_of(raw, item), BATCH_PATH),
            client=client, prompt=item.inputs.get(TASKS[item.task].prompt_field) if valid else None,
            route=BATCH_PATH, client_request_id=context.client_request_id, key_id=key.id if key is not None else None,
            model=item.options.model if valid else self.gateway.service.default_model)

    def reserve(self, key) -> list:
        """Hold the budget for the valid items that fit, in order (`BudgetGuard.reserve_many`): the checked items
        with those that do not fit replaced by their own 402 (the whole batch's 402 when not even the first fits)."""
        valid = [item for item in self.checked if isinstance(item, BatchItem)]
        estimates = [_estimated_cost(self.gateway, key, self.raw_items[item.index]) for item in valid]
        admitted, refusal = self.gateway.budgets.reserve_many(key.id, key.monthly_budget_usd, estimates)
        self.reservations = {item.index: reservation for item, reservation in zip(valid, admitted, strict=False)}
        return [refusal if isinstance(item, BatchItem) and item.index not in self.reservations else item
                for item in self.checked]

    def settle(self, result: ItemResult) -> ItemResult:
        """The item's ledger row (except unbilled refusals), spend and tokens; then its reservation goes."""
        try:
            status, code = _status_of(result.error)
            info = replace(self.infos[result.index], error_code=code)
            overall = self.gateway.record_batch_item(info, status, result.elapsed_ms, _charged(result))
            return replace(result, overall=overall)
        finally:
            if (reservation := self.reservations.get(result.index)) is not None:
                self.gateway.budgets.release(reservation)

    def release_all(self) -> None:
        for reservation in self.reservations.values():
            self.gateway.budgets.release(reservation)


def _token_check(gateway: Gateway, key):
    """Before each item's call, on the worker: the key's tokens-per-minute window (an item over it gets the 429)."""
    if key is None or key.tokens_per_minute is None:
        return None
    key_id, limit = key.id, key.tokens_per_minute

    def check(_item: BatchItem) -> None:
        gateway.tokens.check(key_id, limit)

    return check


def _envelope(body, max_items: int) -> list:
    """The items of a well-formed envelope, or a 400 before any work (a million items are refused by count)."""
    if not isinstance(body, dict) or set(body) != {"items"}:
        extra = [name[:64] for name in sorted(set(body) - {"items"})[:5]] if isinstance(body, dict) else []
        raise InvalidRequest("Invalid input: the body must be an object with one field, 'items' (a list of requests)",
                             details={"fields": {"body": "must be {\"items\": [...]}"}, "unknown_fields": extra})
    items = body["items"]
    if not isinstance(items, list) or not items:
        raise InvalidRequest("Invalid input: 'items' must be a non-empty list of requests",
                             details={"fields": {"items": "must be a non-empty list"}})
    if len(items) > max_items:
        raise InvalidRequest(f"Invalid input: a batch holds at most {max_items} items (BATCH_MAX_ITEMS), "
                             f"this one has {len(items)}",
                             details={"fields": {"items": f"allows at most {max_items} items"},
                                      "max_items": max_items, "items": len(items)})
    return items


def _checked_item(gateway: Gateway, schemas: Schemas, index: int, raw) -> BatchItem | GatewayError:
    """The item ready to run, or the error it is answered with (the others still run)."""
    try:
        if not isinstance(raw, dict):
            raise InvalidRequest("Invalid input: each item must be an object with a 'task' and that task's fields",
                                 details={"fields": {"item": "must be an object"}})
        task = raw.get("task")
        if not isinstance(task, str) or task not in TASKS:
            raise InvalidRequest(f"Invalid input: 'task' must be one of {', '.join(TASKS)}",
                                 details={"fields": {"task": f"must be one of {', '.join(TASKS)}"}})
        if raw.get("stream") not in (None, False):  # a batch answers JSON: never run a stream as if it were not one
            raise InvalidRequest("Invalid input: 'stream' is not available in a batch; send streams one at a time",
                                 details={"fields": {"stream": "is not available in a batch"}})
        check_task_allowed(state().api_key, task)
        payload = schemas.requests[task].validate({name: value for name, value in raw.items() if name != "task"})
        inputs = TASKS[task].inputs(payload)
        return BatchItem(index, task, inputs, task_options(payload, gateway, task), cache_control(payload))
    except GatewayError as exc:
        return exc


def _task_of(raw, item) -> str | None:
    """The item's task when it names one of TASKS (anything else, a list or an object included, is None)."""
    if isinstance(item, BatchItem):
        return item.task
    task = raw.get("task") if isinstance(raw, dict) else None
    return task if isinstance(task, str) and task in TASKS else None


def _status_of(error: BaseException | None) -> tuple[int, str | None]:
    if error is None:
        return 200, None
    if isinstance(error, GatewayError):
        return error.status, error.code
    return 500, "internal_error"


def _answer_safely(gateway: Gateway, batch_id: str, raw, item, result: ItemResult) -> tuple[dict, TaskOutcome | None]:
    """The item's part of the answer; a failure to build it is that item's 500, never the batch's (its row, if
    any, is already written)."""
    try:
        return _answer(gateway, batch_id, raw, item, result)
    except Exception as exc:  # noqa: BLE001 - one item's failure never fails the others
        answer, status = _error_answer(gateway, exc, f"{batch_id}.{result.index}")
        return {"index": result.index, "task": None, "status": status, **answer}, None


def _answer(gateway: Gateway, batch_id: str, raw, item, result: ItemResult) -> tuple[dict, TaskOutcome | None]:
    """The item's part of the answer: the task's answer fields, or its error."""
    item_id = f"{batch_id}.{result.index}"
    head = {"index": result.index, "task": _task_of(raw, item)}
    if result.outcome is None:
        answer, status = _error_answer(gateway, result.error, item_id)
        return {**head, "status": status, **answer}, _charged(result)  # a refused answer still cost its call
    outcome = result.outcome
    definition = TASKS[item.task]
    fields_ = {definition.result_field: outcome.completion.text,
               **{name: item.inputs[name] for name in definition.echo}, **outcome_fields(outcome, item_id)}
    if result.overall is not None:
        fields_["cost"]["overall"] = round(result.overall, 10)
    if result.shared_with is not None:
        fields_["shared_with"] = result.shared_with
    return {**head, "status": 200, **fields_}, outcome


def _error_answer(gateway: Gateway, exc: BaseException, item_id: str) -> tuple[dict, int]:
    """An item's error as the one error shape and the status it would have had on its own. Unlike
    `routes.error_payload` it leaves the batch's own request state alone (its error code, Retry-After)."""
    if isinstance(exc, GatewayError):
        status, code, message, details = exc.status, exc.code, exc.message, exc.details
        if (retry_after := sane_retry_after(exc.retry_after)) is not None:
            details = {**details, "retry_after": max(1, math.ceil(retry_after))}
        log.warning("%s: %s", code, message, extra={"request_id": item_id})
    else:
        status, code, message, details = 500, "internal_error", "The gateway failed unexpectedly", {}
        log.error("unhandled error in a batch item", exc_info=exc, extra={"request_id": item_id})
    if status >= 500 or code == "upstream_rate_limited":
        gateway.logger.log_error(exc, request_id=item_id, status=status, code=code, path=BATCH_PATH)
    return error_body(message, code, details, item_id), status


def _charged(result: ItemResult) -> TaskOutcome | None:
    """What an item is billed: its outcome, or the provider's answer its task refused (GatewayError.billed)."""
    return result.outcome if result.outcome is not None else getattr(result.error, "billed", None)


def _totals(answers: list[tuple[dict, TaskOutcome | None]]) -> dict:
    """Totals over the items; tokens and cost include the calls of items whose answer the task refused."""
    outcomes = [outcome for _, outcome in answers if outcome is not None]
    succeeded = sum(1 for answer, _ in answers if answer["status"] == 200)
    input_tokens = sum(outcome.input_tokens for outcome in outcomes)
    output_tokens = sum(outcome.output_tokens for outcome in outcomes)
    return {
        "items": len(answers), "succeeded": succeeded, "failed": len(answers) - succeeded,
        "input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens,
        "cost": round(sum(outcome.cost.total for outcome in outcomes), 10),
        "saved": round(sum(outcome.saved.total for outcome in outcomes), 10),
        "cache_hits": sum(1 for outcome in outcomes if outcome.cached),
    }


def _estimated_cost(gateway: Gateway, key, raw) -> float:
    """What one item may cost at most (as app.py's `_estimated_cost` for one request, gateway/auth/budgets.py):
    the item's own JSON bytes as input, at the dearest model the key may use at its output limit."""
    size = len(json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    input_tokens, output_tokens = budgets.estimated_tokens(size, gateway.service.max_output_tokens)
    return gateway.models.highest_cost(input_tokens, output_tokens, gateway.service.price_of, gateway.router.routes,
                                       key)
