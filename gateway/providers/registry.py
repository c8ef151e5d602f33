"""The model registry: which public model ids the gateway serves, who serves each, and what it costs.

One JSON file (`data/models.json`, or MODELS_FILE) maps a public model id, the name clients send
as `model`, to a `ModelSpec`: the provider (gemini, openai, anthropic), the vendor's own model
name (`upstream`), an optional base URL (an OpenAI-compatible server, a proxy), the environment
variable holding its key, USD prices per million input and output tokens, the context window,
optional per-task sampling defaults and aliases. It is the one source of prices: the ledger
prices every request for the model that answered, from here.

The file is read and checked once, at start-up (`model_file.py`: anything unusable is a
`ConfigError` naming the entry and the field). Per request, `get` turns an unknown id into a
400 naming the `model` field, and `require_configured` a model whose key is not set into a 503
naming the variable. Production refuses to start while a configured model has no price
(`require_prices`, called by `build_gateway`).

The registry never keeps a key: it notes at start-up which key variables are set, and reads a
key from the environment mapping it was given only when a provider is built (`api_key`).
"""

from __future__ import annotations

import os
from collections import ChainMap
from collections.abc import Iterable, Mapping
from pathlib import Path

from cost_tracker import Price
from gateway.config import Config, ConfigError
from gateway.errors import InvalidRequest, ProviderNotConfigured
from gateway.providers.model_file import (  # noqa: F401 - MODEL_ID, PROVIDERS, TASKS: part of this module's interface
    DEFAULT_MODELS_FILE,
    KEY_ENV_OF_PROVIDER,
    MODEL_ID,
    PROVIDERS,
    TASKS,
    ModelSpec,
    parse,
    read_file,
    shown,
)

FALLBACK_DEFAULT_MODEL = "gemini-2.0-flash"  # GEMINI_MODEL's default
BASE_URL_ENV_OF_PROVIDER = {"gemini": "GEMINI_BASE_URL", "openai": "OPENAI_BASE_URL",
                            "anthropic": "ANTHROPIC_BASE_URL"}


class ModelRegistry:
    """The models of one gateway instance, looked up by public id or alias.

    `env` is where key variables and the providers' *_BASE_URL settings are read; `demo` (demo
    mode: answers come from the built-in emulators) counts every model as configured."""

    def __init__(self, specs: Iterable[ModelSpec], default_model: str, *, env: Mapping[str, str] | None = None,
                 demo: bool = False):
        self._specs: dict[str, ModelSpec] = {}
        self._by_name: dict[str, ModelSpec] = {}
        for spec in specs:
            for name in (spec.id, *spec.aliases):
                if name in self._by_name:
                    raise ConfigError(f"model registry: {shown(name)} names two models (ids and aliases are unique)")
                self._by_name[name] = spec
            self._specs[spec.id] = spec
        if default_model not in self._by_name:
            known = ", ".join(list(self._specs)[:20]) + (", ..." if len(self._specs) > 20 else "")
            raise ConfigError(f"DEFAULT_MODEL {shown(default_model)} is not in the model registry; known models: "
                              f"{known}")
        self.default = self._by_name[default_model]
        self.demo = demo
        self._env = {} if env is None else env
        self._keys_set = frozenset(spec.key_env for spec in self._specs.values()
                                   if spec.key_env and self._env.get(spec.key_env, "").strip())

    # --- lookups ---

    def find(self, model: str) -> ModelSpec | None:
        """The model a public id or alias names, or None."""
        return self._by_name.get(model) if isinstance(model, str) else None

    def get(self, model: str) -> ModelSpec:
        """The model a public id or alias names; InvalidRequest (400, field `model`) if there is none."""
        spec = self.find(model)
        if spec is None:
            reason = "is not a model of this gateway (GET /api/v1/models lists them)"
            raise InvalidRequest(f"Invalid input: 'model' {reason}", details={"fields": {"model": reason}})
        return spec

    def resolve(self, model: str) -> str | None:
        """The id of the model a public id or alias names, or None (what API keys' allowed_models store)."""
        spec = self.find(model)
        return None if spec is None else spec.id

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and model in self._by_name

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def ids(self) -> list[str]:
        return list(self._specs)

    # --- keys and endpoints ---

    def configured(self, model: str | ModelSpec) -> bool:
        """True when the model can be called: its key variable is set (or it needs none), or demo mode."""
        spec = self._spec(model)
        return self.demo or spec.key_env is None or spec.key_env in self._keys_set

    def missing_key(self, model: str | ModelSpec) -> str | None:
        """The key variable to set before the model can be called; None when it is configured."""
        spec = self._spec(model)
        return None if self.configured(spec) else spec.key_env

    def require_configured(self, model: str | ModelSpec) -> ModelSpec:
        """The model, if it can be called; ProviderNotConfigured (503) naming the missing variable otherwise."""
        spec = self._spec(model)
        missing = self.missing_key(spec)
        if missing is not None:
            raise ProviderNotConfigured(
                f"The model '{spec.id}' is not available: its provider ({spec.provider}) has no key on this "
                f"gateway; the operator must set {missing}",
                details={"model": spec.id, "provider": spec.provider, "missing": missing})
        return spec

    def api_key(self, model: str | ModelSpec) -> str | None:
        """The model's key, read from the environment mapping now (for building its provider; never logged)."""
        spec = self._spec(model)
        return (self._env.get(spec.key_env, "").strip() or None) if spec.key_env else None

    def api_keys(self) -> list[str]:
        """Every key a model of this registry is called with, its own `key_env`s included: what the logs redact."""
        return sorted({key for spec in self._specs.values() if (key := self.api_key(spec))})

    def base_url(self, model: str | ModelSpec) -> str | None:
        """Where the model is called: its own base_url, else its provider's *_BASE_URL, else None (the SDK's)."""
        spec = self._spec(model)
        return spec.base_url or self._env.get(BASE_URL_ENV_OF_PROVIDER[spec.provider], "").strip() or None

    # --- prices ---

    def price(self, model: str | ModelSpec) -> Price | None:
        """USD per million tokens for the model (id or alias); None when unknown."""
        spec = model if isinstance(model, ModelSpec) else self.find(model)
        return None if spec is None else spec.price

    def prices(self) -> dict[str, Price]:
        """Every known price by id and alias: what `cost_tracker.PriceTable(...)` is built from."""
        return {name: spec.price for name, spec in self._by_name.items() if spec.price is not None}

    def unpriced_configured(self) -> list[str]:
        """The configured models without a price: their requests would be recorded at $0."""
        return [spec.id for spec in self._specs.values() if spec.price is None and self.configured(spec)]

    def require_prices(self) -> None:
        """ConfigError if a configured model has no price (production calls this at start-up)."""
        unpriced = self.unpriced_configured()
        if unpriced:
            raise ConfigError(
                f"configured models without a price: {', '.join(unpriced)}. Set their input_per_million and "
                "output_per_million in the model registry (MODELS_FILE), or unset their key variable")

    # --- task defaults and the listing ---

    def task_defaults(self, model: str | ModelSpec, task: str) -> Mapping[str, float | int]:
        """The model's own sampling defaults for a task (empty: the task's defaults apply)."""
        return self._spec(model).defaults.get(task, {})

    def describe_model(self, model: str | ModelSpec) -> dict:
        """One model as `GET /api/v1/models` shows it: never a key, never a base URL (internal hosts)."""
        spec = self._spec(model)
        return {
            "id": spec.id, "provider": spec.provider, "upstream": spec.upstream, "aliases": list(spec.aliases),
            "input_per_million": spec.price.input_per_million if spec.price else None,
            "output_per_million": spec.price.output_per_million if spec.price else None,
            "context_window": spec.context_window, "max_output_tokens": spec.max_output_tokens,
            "configured": self.configured(spec), "missing_key": self.missing_key(spec),
            "default": spec.id == self.default.id,
        }

    def describe(self) -> list[dict]:
        """Every model, in file order, as `describe_model` shows it (`GET /api/v1/models`, `/status`)."""
        return [self.describe_model(spec) for spec in self._specs.values()]

    def _spec(self, model: str | ModelSpec) -> ModelSpec:
        return model if isinstance(model, ModelSpec) else self.get(model)

    def __repr__(self) -> str:
        return f"ModelRegistry({len(self)} models, default={self.default.id!r}, demo={self.demo})"


# --- loading -------------------------------------------------------------------------------------

def from_config(config: Config, environ: Mapping[str, str] | None = None) -> ModelRegistry:
    """The registry of one gateway instance: MODELS_FILE, DEFAULT_MODEL (else GEMINI_MODEL), the
    COST_*_PRICE_PER_MILLION overrides of the default model, demo mode, and the keys and base URLs
    the Config holds. A key variable the Config does not know (an entry's own `key_env`, such as
    AZURE_OPENAI_API_KEY) is read from `environ` (default: the process environment)."""
    known = {"GOOGLE_API_KEY": config.google_api_key, "GEMINI_BASE_URL": config.gemini_base_url,
             "OPENAI_API_KEY": config.openai_api_key, "OPENAI_BASE_URL": config.openai_base_url,
             "ANTHROPIC_API_KEY": config.anthropic_api_key, "ANTHROPIC_BASE_URL": config.anthropic_base_url}
    env = ChainMap(known, os.environ if environ is None else environ)
    return load(config.models_file or None, env, default_model=config.default_model or None,
                gemini_model=config.gemini_model, input_price=config.cost_input_price_per_million,
                output_price=config.cost_output_price_per_million, demo=config.demo_mode)


def load(path: Path | str | None = None, env: Mapping[str, str] | None = None, *, default_model: str | None = None,
         gemini_model: str | None = None, input_price: float | None = None, output_price: float | None = None,
         demo: bool = False) -> ModelRegistry:
    """Read and check the registry file; ConfigError names whatever is wrong.

    - `path`: the file (MODELS_FILE; None: `data/models.json`).
    - `env`: where key variables and the providers' *_BASE_URL settings are read (the gateway
      passes its settings; tests pass a dict).
    - `default_model`: the model of requests that name none (DEFAULT_MODEL); it must be in the file.
    - `gemini_model`: the GEMINI_MODEL setting of earlier versions, the default when DEFAULT_MODEL
      is not set. If the file lacks it, it is served as a Gemini model of that name with unknown
      prices, so a deployment that set GEMINI_MODEL (and COST_*_PRICE_PER_MILLION) keeps working.
    - `input_price` / `output_price` (COST_INPUT/OUTPUT_PRICE_PER_MILLION): replace the default
      model's prices.
    - `demo`: demo mode (answers from the built-in emulators): every model counts as configured.
    """
    path = Path(path) if path else DEFAULT_MODELS_FILE
    specs = parse(read_file(path), source=str(path))
    if not default_model:
        default_model = gemini_model or FALLBACK_DEFAULT_MODEL
        if not any(default_model in (spec.id, *spec.aliases) for spec in specs):
            if not MODEL_ID.fullmatch(default_model):
                raise ConfigError(f"GEMINI_MODEL {shown(default_model)} is not a model name")
            specs.append(ModelSpec(id=default_model, provider="gemini", upstream=default_model,
                                   key_env=KEY_ENV_OF_PROVIDER["gemini"], price=None))
    if input_price is not None or output_price is not None:
        specs = [_repriced(spec, input_price, output_price) if default_model in (spec.id, *spec.aliases) else spec
                 for spec in specs]
    return ModelRegistry(specs, default_model, env=env, demo=demo)


def _repriced(spec: ModelSpec, input_price: float | None, output_price: float | None) -> ModelSpec:
    base = spec.price or Price(0.0, 0.0)
    price = Price(base.input_per_million if input_price is None else float(input_price),
                  base.output_per_million if output_price is None else float(output_price))
    return ModelSpec(**{**vars(spec), "price": price})
