"""The model registry: which public model ids the gateway serves, who serves each, and what it costs.

One JSON file (`data/models.json`, or MODELS_FILE) maps a public model id, the name clients send
as `model`, to a `ModelSpec`: the provider (gemini, openai, anthropic), the vendor's own model
name (`upstream`), an optional base URL (an OpenAI-compatible server, a proxy), the environment
variable holding its key, USD prices per million input and output tokens, the context window,
optional per-task sampling defaults and aliases. It is the one source of prices: the ledger
prices every request for the model that answered, from here.

The file is read and checked once, at start-up: anything unusable (an unknown provider, a
missing or negative price, a duplicate id or alias, a wrong type, a file too large or not JSON)
is a `ConfigError` naming the entry and the field, never a crash on some later request. Per
request, `get` turns an unknown id into a 400 naming the `model` field, and `require_configured`
a model whose key is not set into a 503 naming the variable.

The registry never holds a key: it notes which key variables are set, and reads a key from the
environment mapping it was given only when a provider is built (`api_key`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import ChainMap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cost_tracker import Price
from gateway.config import Config, ConfigError
from gateway.errors import InvalidRequest, ProviderNotConfigured

DEFAULT_MODELS_FILE = Path(__file__).resolve().parents[2] / "data" / "models.json"
FALLBACK_DEFAULT_MODEL = "gemini-2.0-flash"  # GEMINI_MODEL's default
PROVIDERS = ("gemini", "openai", "anthropic")
KEY_ENV_OF_PROVIDER = {"gemini": "GOOGLE_API_KEY", "openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
BASE_URL_ENV_OF_PROVIDER = {"gemini": "GEMINI_BASE_URL", "openai": "OPENAI_BASE_URL",
                            "anthropic": "ANTHROPIC_BASE_URL"}
TASKS = ("text", "code", "classify")  # the tasks a model may carry defaults for (the task table's names)

MAX_FILE_BYTES = 1024 * 1024  # a registry is a few KB; anything near this is a mistake, not a catalogue
MAX_MODELS = 500
MAX_ALIASES = 20
MAX_PRICE = 1_000_000.0  # USD per million tokens: far above any real price, far below float trouble
MAX_TOKENS_LIMIT = 100_000_000  # context windows and output limits above this are typos

# Public ids travel in JSON bodies, the X-Model header, logs and the keys table (comma-joined):
# letters, digits and . _ : / @ + - only, so an id never needs quoting or escaping anywhere.
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
UPSTREAM_NAME = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, no spaces: what vendors' APIs accept
KEY_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,99}")
URL = re.compile(r"https?://[^\s/?#]+(?:/[^\s?#]*)?")

ENTRY_FIELDS = {"provider", "upstream", "base_url", "key_env", "input_per_million", "output_per_million",
                "context_window", "max_output_tokens", "defaults", "aliases"}
PARAM_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}  # max_tokens: 1 .. the model's output limit


@dataclass(frozen=True)
class ModelSpec:
    """One servable model, as the registry file describes it."""

    id: str
    provider: str
    upstream: str
    key_env: str | None  # None: the server needs no key (a local OpenAI-compatible server)
    price: Price | None  # None: unknown (recorded at $0; production refuses it when configured)
    base_url: str | None = None  # None: the provider's default, or its *_BASE_URL setting
    context_window: int | None = None
    max_output_tokens: int | None = None
    defaults: Mapping[str, Mapping[str, float | int]] = field(default_factory=dict)  # task -> params
    aliases: tuple[str, ...] = ()


class ModelRegistry:
    """The models of one gateway instance, looked up by public id or alias.

    `key_env_set` is the set of key variables that hold a value; `demo` (demo mode: answers come
    from the built-in emulators) counts every model as configured."""

    def __init__(self, specs: Iterable[ModelSpec], default_model: str, *, env: Mapping[str, str] | None = None,
                 demo: bool = False):
        self._specs: dict[str, ModelSpec] = {}
        self._by_name: dict[str, ModelSpec] = {}
        for spec in specs:
            for name in (spec.id, *spec.aliases):
                if name in self._by_name:
                    raise ConfigError(f"model registry: {name!r} names two models (ids and aliases must be unique)")
                self._by_name[name] = spec
            self._specs[spec.id] = spec
        if default_model not in self._by_name:
            raise ConfigError(f"DEFAULT_MODEL {_shown(default_model)} is not in the model registry; known models: "
                              f"{', '.join(self._specs)}")
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

    def describe(self, model: str | ModelSpec) -> dict:
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

    def models(self) -> list[dict]:
        """Every model, in file order, as `describe` shows it."""
        return [self.describe(spec) for spec in self._specs.values()]

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
                raise ConfigError(f"GEMINI_MODEL {_shown(default_model)} is not a model name")
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


def read_file(path: Path) -> object:
    """The file's JSON, or ConfigError saying why it cannot be used (never its content: it may be anything)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"model registry {path}: cannot be read ({type(exc).__name__}); set MODELS_FILE to the "
                          "registry file, or leave it empty for data/models.json") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"model registry {path}: larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ConfigError(f"model registry {path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model registry {path}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    except (ValueError, RecursionError) as exc:  # duplicate keys, NaN, a number over 4300 digits, deep nesting
        reason = str(exc)[:200] if isinstance(exc, _Refused) else f"{type(exc).__name__}: not usable JSON"
        raise ConfigError(f"model registry {path}: {reason}") from None


class _Refused(ValueError):
    """A JSON construct the registry refuses (its message is ours, safe to show)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _Refused(f"{_shown(key)} appears twice in one object (the later one would silently win)")
        seen[key] = value
    return seen


def _no_constant(name: str):
    raise _Refused(f"{name} is not a number the registry accepts")


def parse(document: object, source: str = "model registry") -> list[ModelSpec]:
    """The ModelSpecs of a parsed registry document, in order; ConfigError naming the entry and field."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise ConfigError(f"{source}: must be a JSON object with a \"models\" object (id -> model)")
    unknown = [key for key in document if key != "models" and not key.startswith("_")]
    if unknown:
        raise ConfigError(f"{source}: unknown top-level field {_shown(unknown[0])} (expected \"models\")")
    entries = {model_id: entry for model_id, entry in document["models"].items() if not model_id.startswith("_")}
    if not entries:
        raise ConfigError(f"{source}: \"models\" is empty; the gateway needs at least one model")
    if len(entries) > MAX_MODELS:
        raise ConfigError(f"{source}: more than {MAX_MODELS} models")
    return [_spec_of(model_id, entry, source) for model_id, entry in entries.items()]


def _spec_of(model_id: str, entry: object, source: str) -> ModelSpec:
    where = f"{source}: model {_shown(model_id)}"
    if not MODEL_ID.fullmatch(model_id):
        raise ConfigError(f"{where}: an id is 1-128 letters, digits and . _ : / @ + - (starting with a letter or "
                          "digit)")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object")
    unknown = sorted(key for key in entry if key not in ENTRY_FIELDS and not key.startswith("_"))
    if unknown:
        raise ConfigError(f"{where}: unknown field {_shown(unknown[0])} (fields: {', '.join(sorted(ENTRY_FIELDS))})")

    provider = entry.get("provider")
    if provider not in PROVIDERS:
        raise ConfigError(f"{where}: provider must be one of {', '.join(PROVIDERS)}, got {_shown(provider)}")
    upstream = entry.get("upstream", model_id)
    if not isinstance(upstream, str) or not UPSTREAM_NAME.fullmatch(upstream):
        raise ConfigError(f"{where}: upstream must be the vendor's model name (1-200 printable characters, no "
                          "spaces)")
    base_url = entry.get("base_url")
    if base_url is not None and (not isinstance(base_url, str) or len(base_url) > 2000 or not URL.fullmatch(base_url)):
        raise ConfigError(f"{where}: base_url must be null or an http(s) URL")
    key_env = entry.get("key_env", KEY_ENV_OF_PROVIDER[provider])
    if key_env is not None and (not isinstance(key_env, str) or not KEY_ENV_NAME.fullmatch(key_env)):
        raise ConfigError(f"{where}: key_env must be null or an environment variable name such as OPENAI_API_KEY")

    price = _price(entry, where)
    context_window = _count(entry, "context_window", where)
    max_output_tokens = _count(entry, "max_output_tokens", where)
    if context_window and max_output_tokens and max_output_tokens > context_window:
        raise ConfigError(f"{where}: max_output_tokens must not exceed context_window")
    return ModelSpec(id=model_id, provider=provider, upstream=upstream, key_env=key_env, price=price,
                     base_url=base_url.rstrip("/") if base_url else None, context_window=context_window,
                     max_output_tokens=max_output_tokens, defaults=_defaults(entry, max_output_tokens, where),
                     aliases=_aliases(entry, model_id, where))


def _price(entry: dict, where: str) -> Price | None:
    values = []
    for name in ("input_per_million", "output_per_million"):
        if name not in entry:
            raise ConfigError(f"{where}: {name} is missing (USD per million tokens; null if unknown)")
        value = entry[name]
        if value is not None and (not _is_number(value) or not 0 <= value <= MAX_PRICE):
            raise ConfigError(f"{where}: {name} must be a number from 0 to {MAX_PRICE:.0f} (or null), got "
                              f"{_shown(value)}")
        values.append(value)
    if (values[0] is None) != (values[1] is None):
        raise ConfigError(f"{where}: give both prices or neither (null)")
    return None if values[0] is None else Price(float(values[0]), float(values[1]))


def _count(entry: dict, name: str, where: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS_LIMIT:
        raise ConfigError(f"{where}: {name} must be a whole number of tokens from 1 to {MAX_TOKENS_LIMIT}, got "
                          f"{_shown(value)}")
    return value


def _defaults(entry: dict, max_output_tokens: int | None, where: str) -> dict[str, dict[str, float | int]]:
    raw = entry.get("defaults")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: defaults must be an object of tasks ({', '.join(TASKS)})")
    checked: dict[str, dict[str, float | int]] = {}
    for task, params in raw.items():
        if task not in TASKS:
            raise ConfigError(f"{where}: defaults names {_shown(task)}, not a task ({', '.join(TASKS)})")
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: defaults.{task} must be an object such as {{\"temperature\": 0.7}}")
        checked[task] = {}
        for name, value in params.items():
            if name == "max_tokens":
                ceiling = max_output_tokens or MAX_TOKENS_LIMIT
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
                    raise ConfigError(f"{where}: defaults.{task}.max_tokens must be a whole number from 1 to {ceiling}")
            elif name in PARAM_RANGES:
                low, high = PARAM_RANGES[name]
                if not _is_number(value) or not low <= value <= high:
                    raise ConfigError(f"{where}: defaults.{task}.{name} must be a number from {low} to {high}")
                value = float(value)
            else:
                raise ConfigError(f"{where}: defaults.{task} names {_shown(name)} (allowed: max_tokens, "
                                  f"{', '.join(PARAM_RANGES)})")
            checked[task][name] = value
    return checked


def _aliases(entry: dict, model_id: str, where: str) -> tuple[str, ...]:
    raw = entry.get("aliases", [])
    if not isinstance(raw, list) or len(raw) > MAX_ALIASES:
        raise ConfigError(f"{where}: aliases must be a list of at most {MAX_ALIASES} ids")
    for alias in raw:
        if not isinstance(alias, str) or not MODEL_ID.fullmatch(alias):
            raise ConfigError(f"{where}: alias {_shown(alias)} is not a valid model id")
    if len(set(raw)) != len(raw) or model_id in raw:
        raise ConfigError(f"{where}: aliases repeat a name")
    return tuple(raw)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: object) -> str:
    """A value from the file, safe and short in a message (it may be anything: huge, control characters)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
