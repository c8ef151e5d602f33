"""The model registry's file (`data/models.json`, or MODELS_FILE): its form, read and checked once.

Everything in the file is checked at start-up, so a mistake fails loudly there instead of as a
500 on some later request: an unknown provider, a missing or negative price, a duplicate id or
alias (JSON's duplicate keys too, which `json` would silently resolve to the last), a wrong type,
an unknown field (a typo), a file too large, not UTF-8 or not JSON. Each is a `ConfigError`
naming the entry and the field; values from the file appear in messages only clipped and
`repr`-quoted, as they may be anything. `registry.py` builds the `ModelRegistry` from the
`ModelSpec`s read here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cost_tracker import Price
from gateway.config import ConfigError
from gateway.data_file import read_json, shown

DEFAULT_MODELS_FILE = Path(__file__).resolve().parents[2] / "data" / "models.json"
PROVIDERS = ("gemini", "openai", "anthropic")
KEY_ENV_OF_PROVIDER = {"gemini": "GOOGLE_API_KEY", "openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
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


def read_file(path: Path) -> object:
    """The file's JSON, or ConfigError saying why it cannot be used (never its content: it may be anything)."""
    return read_json(path, f"model registry {path}", MAX_FILE_BYTES,
                     "set MODELS_FILE to the registry file, or leave it empty for data/models.json")


def parse(document: object, source: str = "model registry") -> list[ModelSpec]:
    """The ModelSpecs of a parsed registry document, in order; ConfigError naming the entry and field."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise ConfigError(f"{source}: must be a JSON object with a \"models\" object (id -> model)")
    unknown = [key for key in document if key != "models" and not key.startswith("_")]
    if unknown:
        raise ConfigError(f"{source}: unknown top-level field {shown(unknown[0])} (expected \"models\")")
    entries = {model_id: entry for model_id, entry in document["models"].items() if not model_id.startswith("_")}
    if not entries:
        raise ConfigError(f"{source}: \"models\" is empty; the gateway needs at least one model")
    if len(entries) > MAX_MODELS:
        raise ConfigError(f"{source}: more than {MAX_MODELS} models")
    return [_spec_of(model_id, entry, source) for model_id, entry in entries.items()]


def _spec_of(model_id: str, entry: object, source: str) -> ModelSpec:
    where = f"{source}: model {shown(model_id)}"
    if not MODEL_ID.fullmatch(model_id):
        raise ConfigError(f"{where}: an id is 1-128 letters, digits and . _ : / @ + - (starting with a letter or "
                          "digit)")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object")
    unknown = sorted(key for key in entry if key not in ENTRY_FIELDS and not key.startswith("_"))
    if unknown:
        raise ConfigError(f"{where}: unknown field {shown(unknown[0])} (fields: {', '.join(sorted(ENTRY_FIELDS))})")

    provider = entry.get("provider")
    if provider not in PROVIDERS:
        raise ConfigError(f"{where}: provider must be one of {', '.join(PROVIDERS)}, got {shown(provider)}")
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
                              f"{shown(value)}")
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
                          f"{shown(value)}")
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
            raise ConfigError(f"{where}: defaults names {shown(task)}, not a task ({', '.join(TASKS)})")
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
                raise ConfigError(f"{where}: defaults.{task} names {shown(name)} (allowed: max_tokens, "
                                  f"{', '.join(PARAM_RANGES)})")
            checked[task][name] = value
    return checked


def _aliases(entry: dict, model_id: str, where: str) -> tuple[str, ...]:
    raw = entry.get("aliases", [])
    if not isinstance(raw, list) or len(raw) > MAX_ALIASES:
        raise ConfigError(f"{where}: aliases must be a list of at most {MAX_ALIASES} ids")
    for alias in raw:
        if not isinstance(alias, str) or not MODEL_ID.fullmatch(alias):
            raise ConfigError(f"{where}: alias {shown(alias)} is not a valid model id")
    if len(set(raw)) != len(raw) or model_id in raw:
        raise ConfigError(f"{where}: aliases repeat a name")
    return tuple(raw)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


