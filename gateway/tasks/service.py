"""One task request's way through the gateway: cache lookup, single flight, provider call, cost.

The HTTP layer hands a task's name, its validated inputs and the caller's options (model,
sampling parameters, fallbacks) to `TaskService.run`; it gets back the answer plus everything
the response headers, the ledger and the logs need (which model answered, cache status, tokens
and where they came from, what was charged and what a cache hit saved). Tasks differ only by
their row in `gateway.tasks.table`; models only by their route in the router.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

from cost_tracker import Cost, TokenCounter
from gateway.errors import ContentBlocked, GatewayError
from gateway.providers.base import Completion, GenerationParams, TextStream
from gateway.providers.router import ModelRouter, Routed
from gateway.tasks.table import SERVED_TASKS, TaskDefinition, unchanged
from lru_cache import ResponseCache


@dataclass(frozen=True)
class CacheControl:
    """Per-request cache behaviour: `read` False = no-cache, `write` False = no-store."""

    read: bool = True
    write: bool = True


@dataclass(frozen=True)
class TaskOptions:
    """What the caller may choose per request; None = the task's or the model's default."""

    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] | None = None  # None = the task's configured fallbacks
    caller: str | None = None  # who asks (API key id or client address): circuit breakers count distinct callers


@dataclass(frozen=True)
class Answer:
    """A provider answer as cached: the task's result, who gave it and the usage it cost."""

    completion: Completion
    model_id: str  # the public id of the model that answered
    provider: str
    input_tokens: int
    output_tokens: int
    token_source: str  # "provider" or "estimate"
    failed_models: tuple[tuple[str, str], ...] = ()  # (model id, error code) tried before it
    raw_text: str | None = None  # the provider's text before the task's parser, when it differs (a replay sends it)

    @property
    def streamed_text(self) -> str:
        """What a stream of this answer sends as chunks: the provider's own text (code with its fences)."""
        return self.completion.text if self.raw_text is None else self.raw_text


@dataclass(frozen=True)
class TaskOutcome:
    """What one request got: the result, how it was served, and what it cost."""

    completion: Completion
    cache_status: str  # "hit", "miss" or "coalesced"
    input_tokens: int
    output_tokens: int
    token_source: str
    cost: Cost  # charged for this request: zero unless it made the upstream call
    saved: Cost  # what the upstream call would have cost, when it was avoided
    upstream_ms: float | None
    cache_lookup_ms: float
    model_id: str = ""
    provider: str = ""
    failed_models: tuple[tuple[str, str], ...] = ()

    @property
    def cached(self) -> bool:
        return self.cache_status != "miss"

    @property
    def fallback_used(self) -> bool:
        return bool(self.failed_models)


class CachedStream:
    """A cached answer replayed as a `TextStream` would stream it: the same text in pieces, then `completion`."""

    PIECE_CHARS = 4096  # a replay's chunk size: no single SSE line as long as a whole long answer

    def __init__(self, answer: Answer):
        self._text = answer.streamed_text
        self._sent = 0
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self._text), self.PIECE_CHARS):
            piece = self._text[start:start + self.PIECE_CHARS]
            self._sent = start + len(piece)
            yield piece
        self.completion = self.received()

    def received(self) -> Completion:
        return Completion(text=self._text[:self._sent], model="")

    def close(self) -> None:
        """Nothing to release: no provider connection."""


@dataclass(frozen=True)
class OpenStream:
    """A task stream that has started: a provider's (first chunk in hand, `routed` says who answers) or a
    cached answer's replay (`cached`). A finished provider stream is stored under `store_key` (None: not stored)."""

    stream: TextStream | CachedStream
    routed: Routed | None
    prompt: str
    task: TaskDefinition | None = None
    inputs: Mapping | None = None
    store_key: str | None = None
    cached: Answer | None = None
    lookup_ms: float = 0.0

    @property
    def model_id(self) -> str:
        """The public id of the model answering (or that answered the replayed one)."""
        return self.cached.model_id if self.cached is not None else self.routed.route.model_id


class TaskService:
    """Runs tasks through the response cache and the router, pricing each answer for the model that gave it."""

    def __init__(self, router: ModelRouter, cache: ResponseCache, price_of: Callable[[str, int, int], Cost],
                 counter: TokenCounter, *, default_model: str, max_output_tokens: int | None = None,
                 model_defaults: Callable[[str, str], Mapping] | None = None,
                 tasks: dict[str, TaskDefinition] = SERVED_TASKS):
        self.router = router
        # A request sharing another's call waits no longer than that call may take; then it calls itself.
        self._share_wait_seconds = router.policy.deadline
        self.cache = cache
        self.price_of = price_of  # (model id, input tokens, output tokens) -> Cost
        self.counter = counter
        self.default_model = default_model
        self.max_output_tokens = max_output_tokens or None
        self.model_defaults = model_defaults or (lambda _model, _task: {})  # (model id, task) -> its defaults
        self.tasks = tasks

    def run(self, task_name: str, inputs: dict, options: TaskOptions = TaskOptions(),
            control: CacheControl = CacheControl()) -> TaskOutcome:
        task = self.tasks[task_name]
        models, params = self.plan(task, options)
        key = self._cache_key(task, models, params, inputs)
        upstream_ms: list[float] = []

        billed: list[TaskOutcome] = []  # an answer the task refused: the provider was paid for it all the same

        def compute() -> Answer:  # a miss only: a cache hit builds no prompt
            prompt = task.prompt(inputs)
            started = time.perf_counter()
            routed = self.router.complete(models, task.conversation(inputs, prompt), params, options.caller)
            upstream_ms.append((time.perf_counter() - started) * 1000)
            try:
                return self._parsed_answer(task, inputs, routed.completion, routed, prompt)
            except GatewayError:
                billed.append(self._outcome(self._priced_answer(routed.completion, routed, prompt), "miss",
                                            upstream_ms[0], 0.0))
                raise

        started = time.perf_counter()
        try:
            answer, status = self.cache.get_or_compute(task.name, key, compute, read=control.read,
                                                       write=control.write, wait_timeout=self._share_wait_seconds)
        except GatewayError as exc:
            # Set on every request's own exception object: a request that shared the call raises a copy of the
            # caller's error, and must not bill the call a second time.
            exc.billed = billed[0] if billed else None
            raise
        total_ms = (time.perf_counter() - started) * 1000
        upstream = upstream_ms[0] if upstream_ms else None
        outcome = self._outcome(answer, status, upstream, total_ms - (upstream or 0.0))
        if task.present is not unchanged:
            outcome = replace(outcome, completion=replace(outcome.completion,
                                                          text=task.present(outcome.completion.text, inputs)))
        return outcome

    def plan(self, task: TaskDefinition, options: TaskOptions) -> tuple[tuple[str, ...], GenerationParams]:
        """The models to try in order (the requested one, then its fallbacks: resolved by the HTTP layer's
        `ModelCatalog`) and the sampling parameters: the request's, else the model's defaults for the task
        (data/models.json), else the task's."""
        model = options.model or self.default_model
        models = (model, *(fallback for fallback in options.fallbacks or () if fallback != model))
        defaults = self.model_defaults(model, task.name)
        params = GenerationParams(
            temperature=_first(options.temperature, defaults.get("temperature"), task.temperature),
            max_tokens=_first(options.max_tokens, defaults.get("max_tokens"), self.max_output_tokens),
            top_p=_first(options.top_p, defaults.get("top_p")), stop=tuple(options.stop))
        return models, params

    def _cache_key(self, task: TaskDefinition, models: tuple[str, ...], params: GenerationParams,
                   inputs: dict) -> str:
        """One key for a question, streamed or not: a plain answer can be replayed as a stream and back."""
        return ResponseCache.make_key(task.name, model=models[0], fallbacks=list(models[1:]), **_key_params(params),
                                      **task.cache_inputs(inputs))

    def open_stream(self, task_name: str, inputs: dict, options: TaskOptions = TaskOptions(),
                    control: CacheControl = CacheControl()) -> OpenStream:
        """Start streaming an answer: a cached one (replayed, no upstream call), else the provider's (retries and
        fallbacks until the first chunk). Streams skip single flight: each miss opens its own provider stream."""
        task = self.tasks[task_name]
        models, params = self.plan(task, options)
        key = self._cache_key(task, models, params, inputs)
        started = time.perf_counter()
        if control.read and (answer := self.cache.lookup(task.name, key)) is not None:
            return OpenStream(CachedStream(answer), None, "", task, inputs, cached=answer,
                              lookup_ms=(time.perf_counter() - started) * 1000)
        prompt = task.prompt(inputs)
        stream, routed = self.router.open_stream(models, task.conversation(inputs, prompt), params, options.caller)
        return OpenStream(stream, routed, prompt, task, inputs, store_key=key if control.write else None)

    def stream_outcome(self, opened: OpenStream, upstream_ms: float) -> TaskOutcome:
        """The outcome of a stream that ran to its end: a replay is a cache hit (cost 0, `saved` what it would
        have cost); a provider's answer is read by the task's parser (the code of a code answer), priced like any
        other upstream answer, and cached (a parser's refusal raises, and nothing is cached)."""
        if opened.cached is not None:
            return self._outcome(opened.cached, "hit", None, opened.lookup_ms)
        answer = self._parsed_answer(opened.task, opened.inputs, opened.stream.completion, opened.routed,
                                     opened.prompt)
        if opened.store_key is not None:
            self.cache.store(opened.task.name, opened.store_key, answer)
        return self._outcome(answer, "miss", upstream_ms, 0.0)

    def partial_stream_outcome(self, opened: OpenStream, upstream_ms: float) -> TaskOutcome:
        """Price what a stream the client left had received (its prompt and the chunks sent were billed all the
        same): the usage the provider reported until then, never cached. A replay left early cost nothing."""
        if opened.cached is not None:
            return self._outcome(opened.cached, "hit", None, opened.lookup_ms)
        return self._outcome(self._priced_answer(opened.stream.received(), opened.routed, opened.prompt), "miss",
                             upstream_ms, 0.0)

    def failed_stream_outcome(self, opened: OpenStream, error: BaseException, upstream_ms: float) -> TaskOutcome | None:
        """What a stream that failed after it opened is billed: what `received()` holds, the usage the
        provider reported until then. Nothing when the provider refused the prompt (its safety filter,
        billed $0 as for a plain call) or sent nothing usable (no text, no usage)."""
        received = opened.stream.received()
        if opened.cached is not None or isinstance(error, ContentBlocked) or not (
                received.text or received.input_tokens is not None):
            return None
        return self.partial_stream_outcome(opened, upstream_ms)

    def _outcome(self, answer: Answer, status: str, upstream_ms: float | None, lookup_ms: float) -> TaskOutcome:
        # Priced by the public model that answered: the provider may answer with a versioned name.
        full_cost = self.price_of(answer.model_id, answer.input_tokens, answer.output_tokens)
        made_the_call = status == "miss"
        return TaskOutcome(
            completion=answer.completion, cache_status=status,
            input_tokens=answer.input_tokens, output_tokens=answer.output_tokens, token_source=answer.token_source,
            cost=full_cost if made_the_call else Cost(), saved=Cost() if made_the_call else full_cost,
            upstream_ms=upstream_ms, cache_lookup_ms=lookup_ms,
            model_id=answer.model_id, provider=answer.provider, failed_models=answer.failed_models,
        )

    def _parsed_answer(self, task: TaskDefinition, inputs: Mapping, completion: Completion, routed: Routed,
                       prompt: str) -> Answer:
        """The task's result out of a whole answer, priced; the provider's own text kept when it differs."""
        result = task.parse(completion.text, inputs)
        answer = self._priced_answer(replace(completion, text=result), routed, prompt)
        return answer if result == completion.text else replace(answer, raw_text=completion.text)

    def _priced_answer(self, completion: Completion, routed: Routed, prompt: str) -> Answer:
        """Bill from the provider's usage; estimate with tiktoken only when it reported none."""
        route = routed.route
        if completion.input_tokens is not None and completion.output_tokens is not None:
            return Answer(completion, route.model_id, route.provider.name, completion.input_tokens,
                          completion.output_tokens, "provider", routed.failed)
        return Answer(completion, route.model_id, route.provider.name, self.counter.count(prompt),
                      self.counter.count(completion.text), "estimate", routed.failed)


def _first(*values):
    """The first value that is set (0 and 0.0 are set)."""
    return next((value for value in values if value is not None), None)


def _key_params(params: GenerationParams) -> dict:
    """The sampling parameters as the cache key sees them (0 and 0.0 alike)."""
    return {"temperature": None if params.temperature is None else float(params.temperature),
            "max_output_tokens": params.max_tokens,
            "top_p": None if params.top_p is None else float(params.top_p), "stop": list(params.stop)}
