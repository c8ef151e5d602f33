"""The models a request may name, and whether it may have them.

`checked_options` is where a request's `model` and `fallbacks` are checked before anything is
called: an unknown id is a 400 naming the field, a model whose provider has no key a 503
naming the missing variable, a model outside the API key's `allowed_models` a 403.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gateway.errors import InvalidRequest
from gateway.tasks.service import TaskOptions


@dataclass(frozen=True)
class ModelCatalog:
    known: frozenset[str]  # every public id with a route
    default_model: str
    unconfigured: dict[str, str] = field(default_factory=dict)  # model id -> the missing key variable

    def checked_options(self, options: TaskOptions, api_key=None) -> TaskOptions:
        """`options` with every model checked; raises the error a client should see."""
        if options.model is not None:
            self._check(options.model, "model", api_key)
        for fallback in options.fallbacks or ():
            self._check(fallback, "fallbacks", api_key)
        if options.fallbacks is not None:
            options = replace(options, fallbacks=tuple(dict.fromkeys(options.fallbacks)))
        return options

    def _check(self, model_id: str, field_name: str, api_key) -> None:
        if model_id not in self.known:
            raise InvalidRequest(f"Invalid input: '{field_name}' names an unknown model: {model_id[:128]!r}",
                                 details={"fields": {field_name: "unknown model; see GET /api/v1/models"},
                                          "model": model_id[:128]})
