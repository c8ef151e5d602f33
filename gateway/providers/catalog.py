"""The models a request may name, and whether it may have them.

`checked_options` is where a request's `model` and `fallbacks` are resolved before anything is
called: an unknown id is a 400 naming the field, a model whose provider has no key a 503 naming
the missing variable, a model outside the API key's `allowed_models` a 403. Aliases become ids
here, so the cache, the ledger and the answer all name a model one way.

A task's configured fallbacks (FALLBACKS_*) are filtered, not refused: one that is not
configured, or that the caller's key may not use, is left out (a key limited to a cheap model
must never be answered by a dear one), while fallbacks the request names itself are checked
like its model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from gateway.auth.guard import check_model_allowed, model_allowed
from gateway.errors import GatewayError, InvalidRequest
from gateway.providers.model_file import ModelSpec
from gateway.providers.registry import ModelRegistry
from gateway.tasks.service import TaskOptions


@dataclass(frozen=True)
class ModelCatalog:
    registry: ModelRegistry
    task_fallbacks: Mapping[str, tuple[str, ...]]  # task -> configured fallback ids
    output_cap: int | None = None  # GEMINI_MAX_OUTPUT_TOKENS: no request may ask for more (None: the model's limit)

    @property
    def default_model(self) -> str:
        return self.registry.default.id

    def checked_options(self, options: TaskOptions, api_key=None, task: str = "text") -> TaskOptions:
        """`options` with the model and every fallback resolved to ids and checked (or the error to answer)."""
        spec = self._checked(options.model or self.default_model, "model", api_key)
        model = spec.id
        limit = self._output_limit(spec.max_output_tokens)
        if options.max_tokens is not None and limit is not None and options.max_tokens > limit:
            reason = f"must be at most {limit}, the output limit of {model} on this gateway"
            raise InvalidRequest(f"Invalid input: 'max_tokens' {reason}", details={"fields": {"max_tokens": reason}})
        if options.fallbacks is not None:
            fallbacks = tuple(self._checked(name, "fallbacks", api_key).id for name in options.fallbacks)
        else:
            fallbacks = tuple(self._usable(name, api_key) for name in self.task_fallbacks.get(task, ()))
        fallbacks = tuple(name for name in dict.fromkeys(fallbacks) if name and name != model)
        return replace(options, model=model, fallbacks=fallbacks)

    def highest_cost(self, input_tokens: int, default_output_tokens: int, price_of, routed, api_key=None) -> float:
        """The most one request may cost (budget reservations): over every routed model the key may use, its
        price for `input_tokens` and its output limit (the registry's `max_output_tokens`; a request's
        `max_tokens` cannot exceed it), or `default_output_tokens` where the registry gives none."""
        costs = [0.0]
        for model_id in routed:
            spec = self.registry.get(model_id)
            if model_allowed(api_key, spec):
                output = self._output_limit(spec.max_output_tokens) or default_output_tokens
                costs.append(price_of(model_id, input_tokens, output).total)
        return max(costs)

    def _output_limit(self, model_limit: int | None) -> int | None:
        """The most output tokens a request may ask of a model: its own limit, under the gateway's cap."""
        limits = [limit for limit in (model_limit, self.output_cap) if limit]
        return min(limits) if limits else None

    def describe(self) -> list[dict]:
        return self.registry.describe()

    def _checked(self, name: str, field_name: str, api_key) -> ModelSpec:
        spec = self.registry.find(name)
        if spec is None:
            reason = "names a model this gateway does not serve (GET /api/v1/models lists them)"
            raise InvalidRequest(f"Invalid input: '{field_name}' {reason}",
                                 details={"fields": {field_name: reason}, "model": name[:128]})
        self.registry.require_configured(spec)
        check_model_allowed(api_key, spec)
        return spec

    def _usable(self, name: str, api_key) -> str | None:
        try:
            return self._checked(name, "fallbacks", api_key).id
        except GatewayError:
            return None
