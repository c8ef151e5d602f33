"""One task request's way through the gateway: cache lookup, single flight, provider call, cost.

The HTTP layer hands a task and its validated inputs to `TaskService.run`; it gets back the
answer plus everything the response headers, the ledger and the logs need (cache status,
tokens and where they came from, what was charged and what a cache hit saved). Keeping this
out of `app.py` leaves the routes about HTTP only and lets the logic be tested without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from cost_tracker import Cost, PriceTable, TokenCounter
from gateway.errors import ContentBlocked
from gateway.tasks import prompts as task_prompts
from gemini_wrapper import TASK_TEMPERATURES, Completion, GeminiClient, TextStream
from lru_cache import ResponseCache


@dataclass(frozen=True)
class CacheControl:
    """Per-request cache behaviour: `read` False = no-cache, `write` False = no-store."""

    read: bool = True
    write: bool = True


@dataclass(frozen=True)
class Answer:
    """A provider answer as cached: the task's result and the usage it cost."""

    completion: Completion
    input_tokens: int
    output_tokens: int
    token_source: str  # "provider" or "estimate"


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

    @property
    def cached(self) -> bool:
        return self.cache_status != "miss"


class TaskService:
    """Runs tasks through the response cache and the provider, pricing each answer."""

    def __init__(self, client: GeminiClient, cache: ResponseCache, prices: PriceTable, counter: TokenCounter):
        self.client = client
        # A request sharing another's call waits no longer than that call may take; then it calls itself.
        self._share_wait_seconds = client.retry_policy.deadline
        self.cache = cache
        self.prices = prices
        self.counter = counter

    def generate_text(self, prompt: str, control: CacheControl = CacheControl()) -> TaskOutcome:
        return self._run("text", {"prompt": prompt}, control,
                         lambda: self.client.generate_text(prompt), lambda: task_prompts.text_prompt(prompt))

    def generate_code(self, prompt: str, language: str, control: CacheControl = CacheControl()) -> TaskOutcome:
        return self._run("code", {"prompt": prompt, "language": language}, control,
                         lambda: self.client.generate_code(prompt, language),
                         lambda: task_prompts.code_prompt(prompt, language))

    def classify_text(self, text: str, categories: list[str], control: CacheControl = CacheControl()) -> TaskOutcome:
        # The key uses the normalised set: reordering or re-casing the categories cannot change the label set.
        key_categories = sorted({task_prompts.normalise_label(category) for category in categories})
        outcome = self._run("classify", {"text": text, "categories": key_categories}, control,
                            lambda: self.client.classify_text(text, categories),
                            lambda: task_prompts.classification_prompt(text, categories))
        # A cached label may be spelled as another caller wrote it: give it back in this caller's spelling.
        label = task_prompts.match_category(outcome.completion.text, categories)
        return replace(outcome, completion=replace(outcome.completion, text=label))

    def _run(self, task: str, inputs: dict, control: CacheControl, call, sent_prompt) -> TaskOutcome:
        """`call` asks the provider; `sent_prompt()` rebuilds the prompt, only to estimate tokens."""
        key = ResponseCache.make_key(
            task, model=self.client.model, temperature=TASK_TEMPERATURES[task],
            max_output_tokens=self.client.max_output_tokens, **inputs,
        )
        upstream_ms: list[float] = []

        def compute() -> Answer:
            started = time.perf_counter()
            completion = call()
            upstream_ms.append((time.perf_counter() - started) * 1000)
            return self._priced_answer(completion, sent_prompt)

        started = time.perf_counter()
        answer, status = self.cache.get_or_compute(task, key, compute, read=control.read, write=control.write,
                                                   wait_timeout=self._share_wait_seconds)
        total_ms = (time.perf_counter() - started) * 1000
        upstream = upstream_ms[0] if upstream_ms else None
        return self._outcome(answer, status, upstream, total_ms - (upstream or 0.0))

    def open_text_stream(self, prompt: str) -> TextStream:
        """Start streaming a text answer (retries until the first chunk). Streams bypass the cache."""
        return self.client.stream_text(prompt)

    def stream_outcome(self, completion: Completion, prompt: str, upstream_ms: float) -> TaskOutcome:
        """Price a stream's answer like any other upstream answer: the whole `completion` of a finished
        stream, or what `received()` holds of one that failed mid-way or that the client left (its
        prompt and the chunks sent were billed all the same)."""
        answer = self._priced_answer(completion, lambda: task_prompts.text_prompt(prompt))
        return self._outcome(answer, "miss", upstream_ms, 0.0)

    def failed_stream_outcome(self, stream: TextStream, error: BaseException, prompt: str,
                              upstream_ms: float) -> TaskOutcome | None:
        """What a stream that failed after it opened is billed: what `received()` holds, the usage the
        provider reported until then. Nothing when the provider refused the prompt (its safety filter,
        billed $0 as for a plain call) or sent nothing usable (no text, no usage)."""
        received = stream.received()
        if isinstance(error, ContentBlocked) or not (received.text or received.input_tokens is not None):
            return None
        return self.stream_outcome(received, prompt, upstream_ms)

    def _outcome(self, answer: Answer, status: str, upstream_ms: float | None, lookup_ms: float) -> TaskOutcome:
        # Priced by the model we asked for: the provider may answer with a versioned name.
        full_cost = self.prices.cost(self.client.model, answer.input_tokens, answer.output_tokens)
        made_the_call = status == "miss"
        return TaskOutcome(
            completion=answer.completion,
            cache_status=status,
            input_tokens=answer.input_tokens,
            output_tokens=answer.output_tokens,
            token_source=answer.token_source,
            cost=full_cost if made_the_call else Cost(),
            saved=Cost() if made_the_call else full_cost,
            upstream_ms=upstream_ms,
            cache_lookup_ms=lookup_ms,
        )

    def _priced_answer(self, completion: Completion, sent_prompt) -> Answer:
        """Bill from the provider's usage; estimate with tiktoken only when it reported none."""
        if completion.input_tokens is not None and completion.output_tokens is not None:
            return Answer(completion, completion.input_tokens, completion.output_tokens, "provider")
        return Answer(completion, self.counter.count(sent_prompt()), self.counter.count(completion.text), "estimate")
