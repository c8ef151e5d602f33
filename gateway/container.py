"""The parts of one gateway instance, built once from its config and shared by every request.

`build_gateway(config)` is where the pieces meet: the upstream (live or demo), the Gemini
client with its retry policy, the response cache, prices and token counter, the cost ledger,
the log files, the security scanner, the client API keys and the process counters. `app.py` puts the HTTP layer
around it; nothing here imports Flask, so the whole path can be used and tested without it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cost_tracker import CostRecord, CostTracker, PriceTable, TokenCounter
from enhanced_logging import RequestLogger, SecurityScanner
from gateway.auth.budgets import BudgetGuard
from gateway.auth.keys import KeyStore
from gateway.auth.token_window import TokenWindows
from gateway.config import Config
from gateway.observability.metrics import UNROUTED, GatewayMetrics
from gateway.providers import demo as demo_mode
from gateway.providers import registry as model_registry
from gateway.providers.catalog import ModelCatalog
from gateway.providers.factory import build_routes
from gateway.providers.registry import ModelRegistry
from gateway.providers.router import ModelRouter
from gateway.tasks import process_templates
from gateway.tasks.process import process_task
from gateway.tasks.service import TaskOutcome, TaskService
from gateway.tasks.table import SERVED_TASKS
from gemini_wrapper import retry_policy_from
from lru_cache import ResponseCache

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class RequestInfo:
    """What the accounting needs to know about one HTTP request, as plain data."""

    request_id: str  # the gateway's own, unique and random
    method: str
    path: str
    client: str
    prompt: str | None = None
    error_code: str | None = None
    route: str = UNROUTED  # the URL rule that matched: what the counters are keyed by, never the raw path
    client_request_id: str | None = None  # the client's X-Request-ID, when it sent a valid one
    key_id: str | None = None  # the API key the request was authenticated with (gateway/auth/keys.py)
    user_agent: str = ""  # clipped (routes.clip_user_agent)
    model: str = ""  # the public model id asked for: what a request that got no answer is recorded under


# Refusals of the gateway's own guards before a task runs: no provider call, nothing to bill. They are
# counted per process (/stats `process`) and logged in api_requests.log, but write no ledger row, or one
# client could grow the ledger (and every later /stats) at hundreds of rows a second. Every other task
# request, a 400 included, passed the rate limiter first, so its rows grow only as fast as the limit allows.
# Refusals by authentication (gateway/auth/guard.py) are among them: an unauthenticated client must not grow the ledger.
UNBILLED_REFUSALS = frozenset({"rate_limited", "request_blocked", "payload_too_large", "unauthorized", "key_revoked",
                               "key_expired", "forbidden", "task_not_allowed", "model_not_allowed",
                               "token_limit_exceeded", "budget_exceeded"})


def _cost_record(request: RequestInfo, status: int, elapsed_ms: float, outcome: TaskOutcome | None) -> CostRecord:
    """The ledger row of a task request; a request that got no answer costs nothing."""
    if outcome is None:
        return CostRecord(request.request_id, time.time(), request.path, request.client, request.model, 0, 0,
                          0.0, 0.0, 0.0, False, 0.0, "none", round(elapsed_ms, 3), status,
                          request.client_request_id, request.key_id)
    return CostRecord(
        request_id=request.request_id, timestamp=time.time(), endpoint=request.path, client=request.client,
        model=outcome.model_id, input_tokens=outcome.input_tokens, output_tokens=outcome.output_tokens,
        input_cost=outcome.cost.input, output_cost=outcome.cost.output, total_cost=outcome.cost.total,
        cached=outcome.cached, saved_cost=outcome.saved.total, token_source=outcome.token_source,
        latency_ms=round(elapsed_ms, 3), status=status, client_request_id=request.client_request_id,
        key_id=request.key_id,
    )


@dataclass(frozen=True)
class Gateway:
    """Everything the routes and hooks of one app share."""

    config: Config
    upstream: demo_mode.Upstream
    router: ModelRouter
    models: ModelCatalog
    service: TaskService
    cache: ResponseCache
    tracker: CostTracker
    logger: RequestLogger
    scanner: SecurityScanner
    keys: KeyStore
    budgets: BudgetGuard  # keys' monthly budgets (gateway/auth/budgets.py)
    registry: ModelRegistry  # the servable models, their providers, keys and prices (data/models.json)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    tokens: TokenWindows = field(default_factory=TokenWindows)  # per-key tokens per minute (this process)
    started_at: float = field(default_factory=time.monotonic)

    def finish_request(self, request: RequestInfo, status: int, elapsed_ms: float,
                       outcome: TaskOutcome | None = None, *, is_task: bool = False) -> float | None:
        """Account for one finished request: ledger record (task requests except UNBILLED_REFUSALS, before
        the answer leaves), counters, and its log lines (summary, performance, cost) as one queued item
        (`RequestLogger.log_finished`: formatted and written off this thread). Returns the overall spend."""
        overall, summary, performance, cost = None, {}, None, None
        if is_task and request.error_code not in UNBILLED_REFUSALS:
            overall, cost = self._record_cost(_cost_record(request, status, elapsed_ms, outcome))
            if request.key_id is not None and outcome is not None:
                self.budgets.recorded(request.key_id, outcome.cost.total, spooled=self.tracker.spooled > 0)
        if outcome is not None:
            if request.key_id is not None and not outcome.cached:
                self.tokens.add(request.key_id, outcome.input_tokens + outcome.output_tokens)
            summary = {"model": outcome.model_id, "provider": outcome.provider,
                       "cached": outcome.cached, "cache": outcome.cache_status,
                       "input_tokens": outcome.input_tokens, "output_tokens": outcome.output_tokens,
                       "cost": round(outcome.cost.total, 10)}
            if outcome.fallback_used:  # which models failed before the one that answered, and how
                summary["failed_models"] = [f"{model}: {code}" for model, code in outcome.failed_models]
            performance = {"request_id": request.request_id, "path": request.path, "total_ms": round(elapsed_ms, 2),
                           "upstream_ms": None if outcome.upstream_ms is None else round(outcome.upstream_ms, 2),
                           "cache_lookup_ms": round(outcome.cache_lookup_ms, 3)}
        if request.client_request_id is not None:
            summary["client_request_id"] = request.client_request_id
        if request.prompt is not None:
            summary["prompt"] = self.logger.describe_prompt(request.prompt)  # length + hash unless LOG_FULL_PROMPTS
        self.metrics.count_request(request.route, status, request.error_code)
        self.logger.log_finished({"request_id": request.request_id, "method": request.method, "path": request.path,
                                  "status": status, "latency_ms": round(elapsed_ms, 2), "client": request.client,
                                  "key_id": request.key_id, "user_agent": request.user_agent, **summary},
                                 performance, cost)
        return overall

    def record_batch_item(self, item: RequestInfo, status: int, elapsed_ms: float,
                          outcome: TaskOutcome | None) -> float | None:
        """Account for one item of a batch as for a task request of its own: its ledger row and cost line
        (except UNBILLED_REFUSALS), its key's month spend and tokens window. The batch's own request has no
        row (`finish_request` with is_task False): only its items are billed. Returns the overall spend."""
        overall = None
        if item.error_code not in UNBILLED_REFUSALS:
            overall, cost = self._record_cost(_cost_record(item, status, elapsed_ms, outcome))
            self.logger.log_cost(**cost)
            if item.key_id is not None and outcome is not None:
                self.budgets.recorded(item.key_id, outcome.cost.total, spooled=self.tracker.spooled > 0)
        if item.key_id is not None and outcome is not None and not outcome.cached:
            self.tokens.add(item.key_id, outcome.input_tokens + outcome.output_tokens)
        return overall

    def _record_cost(self, record: CostRecord) -> tuple[float, dict]:
        """Commit the record; returns the overall spend and the record's cost-log fields. When it can be neither
        committed nor spooled (ledger locked and disk full, say), the answer was paid for and still goes out:
        the cost line carries the full record flagged `unrecorded`, an error line says it is missing from the
        ledger, and the overall spend is the last one known plus this record."""
        fields = dict(vars(record))  # the cost line: a copy, as the writer thread reads it later
        try:
            return self.tracker.record(record), fields
        except Exception as exc:  # noqa: BLE001 - whatever failed, the client gets its answer
            self.logger.log_error(exc, request_id=record.request_id, unrecorded=True,
                                  note="cost record neither committed to the ledger nor spooled: "
                                       "this request is missing from the ledger (its full record is in "
                                       "cost_tracking.log)", record=dict(fields))
            return self.tracker.last_overall + record.total_cost, {**fields, "unrecorded": True}

    def close(self) -> None:
        """Flush the logs and close the ledger (tests and clean shutdowns)."""
        self.logger.close()
        self.tracker.close()
        self.keys.close()
        self.budgets.close()


def build_gateway(config: Config, *, retry_overrides: dict | None = None) -> Gateway:
    """Build every part from `config`. `retry_overrides` replace retry policy fields (tests inject sleep/clock)."""
    registry = model_registry.from_config(config)
    if registry.unpriced_configured():
        if config.is_production:
            registry.require_prices()
        log.warning("configured models without a price, recorded at $0: %s (set their prices in the model registry, "
                    "MODELS_FILE, or COST_*_PRICE_PER_MILLION for the default model)",
                    ", ".join(registry.unpriced_configured()))
    prices = PriceTable(registry.prices())
    metrics = GatewayMetrics()
    upstream = demo_mode.resolve_upstream(config)
    policy = retry_policy_from(config, on_retry=metrics.count_retry, **(retry_overrides or {}))
    router = ModelRouter(build_routes(registry, config), policy)
    models = ModelCatalog(registry, {"text": config.fallbacks_text, "code": config.fallbacks_code,
                                     "classify": config.fallbacks_classify},
                          output_cap=config.gemini_max_output_tokens or None)
    logger = RequestLogger(
        config.log_dir, max_bytes=config.log_max_bytes, backup_count=config.log_backup_count,
        console=config.log_console, console_level=config.log_level,
        # every provider key (a registry entry's own key_env too: its upstream may echo it) and the JWT secret
        secrets=[*config.secret_values, *registry.api_keys()],
        log_full_prompts=config.log_full_prompts,
    )
    tasks = {**SERVED_TASKS, "process": process_task(process_templates.load(config.process_templates_file))}
    cache = ResponseCache({task.name: config.cache_settings(task.name) for task in tasks.values()},
                          enabled=config.cache_enabled)
    # No on_record callback: a cost line goes out with its request's other lines (Gateway._record_cost).
    tracker = CostTracker(config.cost_ledger_path, write_timeout=config.cost_ledger_write_timeout_seconds)
    service = TaskService(router, cache, prices.cost, TokenCounter(), default_model=registry.default.id,
                          max_output_tokens=config.gemini_max_output_tokens or None,
                          model_defaults=registry.task_defaults, tasks=tasks)
    return Gateway(
        config=config, upstream=upstream, router=router, service=service,
        models=models, cache=cache, tracker=tracker,
        logger=logger, scanner=SecurityScanner(config.request_max_bytes), keys=KeyStore(config.cost_ledger_path),
        budgets=BudgetGuard(config.cost_ledger_path, spooled=lambda: tracker.spooled), registry=registry,
        metrics=metrics,
    )
