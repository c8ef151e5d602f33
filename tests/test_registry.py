"""The model registry: the shipped file, keys and configuration, prices, lookups, and files that must be refused."""

from __future__ import annotations

import json

import pytest

from cost_tracker import Price, PriceTable
from gateway.config import Config, ConfigError
from gateway.container import build_gateway
from gateway.errors import InvalidRequest, ProviderNotConfigured
from gateway.providers import model_file, registry
from gateway.providers.registry import ModelRegistry, ModelSpec

GEMINI = {"provider": "gemini", "upstream": "gemini-2.0-flash", "input_per_million": 0.1, "output_per_million": 0.4,
          "context_window": 1048576, "max_output_tokens": 8192}


def write(tmp_path, models: dict | None = None, *, document: object = None, raw: bytes | None = None):
    path = tmp_path / "models.json"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps(document if document is not None else {"models": models}), encoding="utf-8")
    return path


def load(tmp_path, models: dict, **kwargs) -> ModelRegistry:
    return registry.load(write(tmp_path, models), **kwargs)


def refused(tmp_path, *, models: dict | None = None, document: object = None, raw: bytes | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        registry.load(write(tmp_path, models, document=document, raw=raw))
    return str(caught.value)


# --- the shipped file ---

def test_the_shipped_file_loads_with_a_price_for_every_model():
    models = registry.load()
    assert models.default.id == "gemini-2.0-flash"
    assert {"gemini-2.0-flash", "gemini-2.0-flash-lite", "gemini-2.5-flash", "gpt-4o-mini", "gpt-4o",
            "claude-haiku-4-5"} <= set(models.ids())
    assert models.price("gemini-2.0-flash") == Price(0.10, 0.40)
    assert models.price("gpt-4o-mini") == Price(0.15, 0.60)
    assert all(spec.price is not None and spec.context_window for spec in models)
    assert {spec.provider for spec in models} == set(registry.PROVIDERS)
    assert models.get("gemini-2.0-flash-001") is models.get("gemini-2.0-flash")  # an alias


def test_the_shipped_file_names_each_providers_key_variable():
    models = registry.load()
    assert {spec.provider: spec.key_env for spec in models} == registry.KEY_ENV_OF_PROVIDER


# --- keys: configured or not ---

def test_a_model_is_configured_when_its_key_variable_is_set():
    models = registry.load(env={"OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": "   "})
    assert models.configured("gpt-4o-mini") and models.configured("gpt-4o")
    assert not models.configured("gemini-2.0-flash") and not models.configured("claude-haiku-4-5")  # blank is unset
    assert models.missing_key("gpt-4o") is None
    assert models.missing_key("claude-haiku-4-5") == "ANTHROPIC_API_KEY"
    assert models.missing_key("gemini-2.0-flash-001") == "GOOGLE_API_KEY"
    assert models.api_key("gpt-4o") == "sk-test" and models.api_key("claude-haiku-4-5") is None


def test_a_model_without_a_key_is_a_503_naming_the_variable():
    models = registry.load(env={})
    with pytest.raises(ProviderNotConfigured) as caught:
        models.require_configured("claude-haiku-4-5")
    error = caught.value
    assert (error.status, error.code) == (503, "provider_not_configured")
    assert error.details == {"model": "claude-haiku-4-5", "provider": "anthropic", "missing": "ANTHROPIC_API_KEY"}
    assert "ANTHROPIC_API_KEY" in error.message
    keyed = registry.load(env={"GOOGLE_API_KEY": "AIza-test"})
    assert keyed.require_configured("gemini-2.0-flash-001") is keyed.default


def test_demo_mode_counts_every_model_as_configured():
    models = registry.load(env={}, demo=True)
    assert all(models.configured(spec) for spec in models)
    assert models.require_configured("gpt-4o").id == "gpt-4o"


def test_a_model_that_needs_no_key_is_always_configured(tmp_path):
    local = {"provider": "openai", "upstream": "llama3.1:8b", "key_env": None, "base_url": "http://127.0.0.1:11434/v1/",
             "input_per_million": 0, "output_per_million": 0}
    models = load(tmp_path, {"local": local}, default_model="local", env={})
    assert models.configured("local") and models.api_key("local") is None
    assert models.base_url("local") == "http://127.0.0.1:11434/v1"


def test_base_url_is_the_models_own_then_the_providers_setting_then_none(tmp_path):
    entries = {"a": {"provider": "openai", "input_per_million": 1, "output_per_million": 2,
                     "base_url": "https://proxy.example/v1"},
               "b": {"provider": "openai", "input_per_million": 1, "output_per_million": 2},
               "c": {"provider": "anthropic", "input_per_million": 1, "output_per_million": 2}}
    models = load(tmp_path, entries, default_model="a", env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert [models.base_url(name) for name in "abc"] == ["https://proxy.example/v1", "http://127.0.0.1:9/v1", None]
    assert models.get("b").upstream == "b"  # upstream defaults to the id
    assert models.get("c").key_env == "ANTHROPIC_API_KEY"  # key_env defaults by provider


# --- lookups and prices ---

def test_an_unknown_model_is_a_400_naming_the_model_field():
    models = registry.load()
    with pytest.raises(InvalidRequest) as caught:
        models.get("gpt-5-turbo-ultra")
    assert caught.value.status == 400 and caught.value.code == "invalid_request"
    assert set(caught.value.details["fields"]) == {"model"}
    assert models.find("nope") is None and models.find(None) is None and models.find(["x"]) is None
    assert "gpt-4o" in models and "nope" not in models and 3 not in models


def test_prices_by_id_and_alias_build_the_price_table():
    models = registry.load()
    table = PriceTable(models.prices())
    assert table.cost("gpt-4o-mini", 1_000_000, 1_000_000).total == pytest.approx(0.75)
    assert table.cost("gemini-2.0-flash-001", 2_000_000, 0).total == pytest.approx(0.20)
    assert models.price("nope") is None


def test_price_overrides_replace_the_default_models_prices_only():
    models = registry.load(input_price=1.0, output_price=None)
    assert models.price("gemini-2.0-flash") == Price(1.0, 0.40)
    assert models.price("gemini-2.0-flash-001") == Price(1.0, 0.40)
    assert models.price("gpt-4o-mini") == Price(0.15, 0.60)
    other = registry.load(default_model="gpt-4o", output_price=0.0)
    assert other.default.id == "gpt-4o" and other.price("gpt-4o") == Price(2.50, 0.0)


def test_an_unknown_default_model_is_refused():
    with pytest.raises(ConfigError, match="DEFAULT_MODEL 'gpt-9' is not in the model registry"):
        registry.load(default_model="gpt-9")


def test_a_gemini_model_setting_outside_the_file_is_served_as_an_unpriced_gemini_model():
    models = registry.load(gemini_model="gemini-1.5-pro", env={"GOOGLE_API_KEY": "AIza-test"})
    assert models.default.id == "gemini-1.5-pro" and models.default.provider == "gemini"
    assert models.price("gemini-1.5-pro") is None
    assert models.unpriced_configured() == ["gemini-1.5-pro"]
    with pytest.raises(ConfigError, match="configured models without a price: gemini-1.5-pro"):
        models.require_prices()
    priced = registry.load(gemini_model="gemini-1.5-pro", input_price=1.25, output_price=5.0,
                           env={"GOOGLE_API_KEY": "AIza-test"})
    assert priced.price("gemini-1.5-pro") == Price(1.25, 5.0)
    priced.require_prices()
    assert registry.load(gemini_model="gemini-2.0-flash-001").default.id == "gemini-2.0-flash"  # an alias


def test_an_unpriced_model_is_refused_only_when_it_is_configured(tmp_path):
    entries = {"g": GEMINI, "free": {"provider": "openai", "input_per_million": None, "output_per_million": None}}
    models = load(tmp_path, entries, default_model="g", env={"GOOGLE_API_KEY": "k"})
    assert models.unpriced_configured() == []
    models.require_prices()
    keyed = load(tmp_path, entries, default_model="g", env={"OPENAI_API_KEY": "k"})
    assert keyed.unpriced_configured() == ["free"]
    with pytest.raises(ConfigError, match="free"):
        keyed.require_prices()
    with pytest.raises(ConfigError, match="free"):
        load(tmp_path, entries, default_model="g", demo=True).require_prices()


def test_task_defaults_are_the_models_own_or_empty(tmp_path):
    entry = {**GEMINI, "defaults": {"code": {"temperature": 0, "max_tokens": 2048, "top_p": 0.9}}}
    models = load(tmp_path, {"g": entry}, default_model="g")
    assert models.task_defaults("g", "code") == {"temperature": 0.0, "max_tokens": 2048, "top_p": 0.9}
    assert models.task_defaults("g", "text") == {}


def test_the_listing_shows_prices_and_configuration_never_a_key_or_base_url():
    models = registry.load(env={"OPENAI_API_KEY": "sk-secret-value", "OPENAI_BASE_URL": "http://10.0.0.7:8000/v1"})
    listing = models.describe()
    assert [row["id"] for row in listing] == models.ids()
    mini = next(row for row in listing if row["id"] == "gpt-4o-mini")
    assert mini == {"id": "gpt-4o-mini", "provider": "openai", "upstream": "gpt-4o-mini", "aliases": [],
                    "input_per_million": 0.15, "output_per_million": 0.60, "context_window": 128000,
                    "max_output_tokens": 16384, "configured": True, "missing_key": None, "default": False}
    assert next(row for row in listing if row["id"] == "claude-haiku-4-5")["missing_key"] == "ANTHROPIC_API_KEY"
    text = json.dumps(listing) + repr(models)
    assert "sk-secret-value" not in text and "10.0.0.7" not in text


def test_two_models_may_not_share_a_name():
    spec = ModelSpec(id="a", provider="openai", upstream="a", key_env=None, price=None, aliases=("b",))
    with pytest.raises(ConfigError, match="'b' names two models"):
        ModelRegistry([spec, ModelSpec(id="b", provider="openai", upstream="b", key_env=None, price=None)], "a")


# --- files that must be refused, each with a message naming the entry and the field ---

@pytest.mark.parametrize(("entry", "expected"), [
    ({**GEMINI, "provider": "azure"}, "provider must be one of gemini, openai, anthropic, got 'azure'"),
    ({k: v for k, v in GEMINI.items() if k != "provider"}, "provider must be one of"),
    ({k: v for k, v in GEMINI.items() if k != "input_per_million"}, "input_per_million is missing"),
    ({**GEMINI, "output_per_million": -0.01}, "output_per_million must be a number from 0"),
    ({**GEMINI, "input_per_million": "0.10"}, "input_per_million must be a number"),
    ({**GEMINI, "input_per_million": True}, "input_per_million must be a number"),
    ({**GEMINI, "input_per_million": 1e300}, "input_per_million must be a number from 0"),
    ({**GEMINI, "input_per_million": None}, "give both prices or neither"),
    ({**GEMINI, "input_per_milion": 0.1}, "unknown field 'input_per_milion'"),
    ({**GEMINI, "upstream": ""}, "upstream must be"),
    ({**GEMINI, "upstream": "gemini 2.0"}, "upstream must be"),
    ({**GEMINI, "base_url": "ftp://example.com"}, "base_url must be null or an http(s) URL"),
    ({**GEMINI, "base_url": 7}, "base_url must be null or an http(s) URL"),
    ({**GEMINI, "key_env": "openai key"}, "key_env must be null or an environment variable name"),
    ({**GEMINI, "context_window": 0}, "context_window must be a whole number"),
    ({**GEMINI, "context_window": 1.5}, "context_window must be a whole number"),
    ({**GEMINI, "context_window": True}, "context_window must be a whole number"),
    ({**GEMINI, "max_output_tokens": 2_000_000}, "max_output_tokens must not exceed context_window"),
    ({**GEMINI, "defaults": {"poetry": {}}}, "defaults names 'poetry', not a task"),
    ({**GEMINI, "defaults": {"text": {"temperature": 3}}}, "defaults.text.temperature must be a number from 0.0"),
    ({**GEMINI, "defaults": {"text": {"top_p": -1}}}, "defaults.text.top_p must be"),
    ({**GEMINI, "defaults": {"text": {"max_tokens": 9000}}}, "defaults.text.max_tokens must be a whole number from 1"),
    ({**GEMINI, "defaults": {"text": {"seed": 1}}}, "defaults.text names 'seed'"),
    ({**GEMINI, "defaults": {"text": 0.7}}, "defaults.text must be an object"),
    ({**GEMINI, "defaults": []}, "defaults must be an object"),
    ({**GEMINI, "aliases": "gemini"}, "aliases must be a list"),
    ({**GEMINI, "aliases": ["ok", "with space"]}, "alias 'with space' is not a valid model id"),
    ({**GEMINI, "aliases": ["g"]}, "aliases repeat a name"),
    ("gemini", "must be an object"),
])
def test_a_bad_entry_is_refused_naming_it(tmp_path, entry, expected):
    message = refused(tmp_path, models={"g": entry})
    assert "model 'g'" in message and expected in message


@pytest.mark.parametrize(("document", "expected"), [
    ([], 'must be a JSON object with a "models" object'),
    ({"models": []}, 'must be a JSON object with a "models" object'),
    ({"models": {}}, '"models" is empty'),
    ({"models": {"_comment": "only a comment"}}, '"models" is empty'),
    ({"model": {"g": GEMINI}}, 'must be a JSON object with a "models" object'),
    ({"models": {"g": GEMINI}, "providers": {}}, "unknown top-level field 'providers'"),
    ({"models": {"bad id": GEMINI}}, "an id is 1-128 letters"),
    ({"models": {"a,b": GEMINI}}, "an id is 1-128 letters"),
    ({"models": {"x" * 200: GEMINI}}, "an id is 1-128 letters"),
    ({"models": {"g": GEMINI, "h": {**GEMINI, "aliases": ["g"]}}}, "'g' names two models"),
    ({"models": {f"m{i}": GEMINI for i in range(model_file.MAX_MODELS + 1)}}, "more than 500 models"),
])
def test_a_bad_document_is_refused(tmp_path, document, expected):
    assert expected in refused(tmp_path, document=document)


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"models": {"g": {}, "g": {}}}', "'g' appears twice in one object"),
    (b'{"models": {"g": {"provider": "gemini", "provider": "openai"}}}', "'provider' appears twice"),
    (b'{"models": {"g": {"input_per_million": NaN}}}', "NaN is not a number these files accept"),
    (b'{"models": {"g": {"input_per_million": Infinity}}}', "Infinity is not a number"),
    (b'{"models": ', "not JSON"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b'{"models": {"g": {"context_window": ' + b"9" * 5000 + b"}}}", "not usable JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not usable JSON"),
    (b'{"models": {"g": {"input_per_million": 1e999, "output_per_million": 0, "provider": "gemini"}}}',
     "input_per_million must be a number"),
    (b" " * (model_file.MAX_FILE_BYTES + 1), "larger than 1024 KiB"),
])
def test_a_hostile_file_is_a_config_error_not_a_crash(tmp_path, raw, expected):
    assert expected in refused(tmp_path, raw=raw)


def test_a_control_character_in_the_file_is_not_echoed_raw(tmp_path):
    message = refused(tmp_path, models={"g": {**GEMINI, "provider": "x\n\x1b[31mred" + "y" * 500}})
    assert "\n" not in message and "\x1b" not in message and len(message) < 400


def test_a_missing_file_or_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read .FileNotFoundError"):
        registry.load(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="cannot be read"):
        registry.load(tmp_path)


# --- the registry of a gateway instance: from its Config ---

def test_the_config_gives_the_file_the_default_model_and_the_keys(tmp_path):
    path = write(tmp_path, {"g": GEMINI, "o": {"provider": "openai", "input_per_million": 1, "output_per_million": 2},
                            "az": {"provider": "openai", "key_env": "AZURE_OPENAI_API_KEY", "input_per_million": 1,
                                   "output_per_million": 2}})
    config = Config.load({"GOOGLE_API_KEY": "AIzaX", "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": "http://127.0.0.1:9",
                          "MODELS_FILE": str(path), "DEFAULT_MODEL": "o", "COST_OUTPUT_PRICE_PER_MILLION": "7"})
    models = registry.from_config(config, environ={"AZURE_OPENAI_API_KEY": "az-key", "ANTHROPIC_API_KEY": "ignored"})
    assert models.default.id == "o" and models.price("o") == Price(1.0, 7.0) and not models.demo
    assert models.configured("g") and models.configured("o") and models.configured("az")
    assert models.api_key("o") == "sk-test" and models.base_url("o") == "http://127.0.0.1:9"
    assert models.api_key("az") == "az-key"  # an entry's own variable: from the process environment
    assert "sk-test" not in repr(config) and "sk-test" not in repr(models)
    # the Config is the source of the variables it knows: the environment's copy is not read
    assert registry.from_config(Config.load({"MODELS_FILE": str(path), "DEFAULT_MODEL": "g", "GOOGLE_API_KEY": "k"}),
                                environ={"OPENAI_API_KEY": "sk-env"}).missing_key("o") == "OPENAI_API_KEY"


def test_without_any_setting_the_config_gives_the_shipped_registry_in_demo_mode():
    models = registry.from_config(Config.load({}))
    assert models.default.id == "gemini-2.0-flash" and models.demo and models.configured("claude-haiku-4-5")


def test_the_retired_price_file_setting_is_refused_with_its_replacement():
    with pytest.raises(ConfigError, match="COST_PRICE_FILE is no longer read: .*MODELS_FILE"):
        Config.load({"COST_PRICE_FILE": "prices.json"})


def test_production_refuses_to_start_with_a_configured_model_without_a_price(tmp_path):
    path = write(tmp_path, {"g": GEMINI, "o": {"provider": "openai", "input_per_million": None,
                                               "output_per_million": None}})
    settings = {"app_env": "production", "google_api_key": "AIzaX", "models_file": str(path), "default_model": "g",
                "log_dir": tmp_path / "logs", "cost_ledger_path": tmp_path / "ledger.sqlite3", "log_console": False}
    build_gateway(Config.load({}, **settings)).close()  # its key is not set: it cannot be called, nothing to price
    with pytest.raises(ConfigError, match="configured models without a price: o"):
        build_gateway(Config.load({}, **settings, openai_api_key="sk-test"))
    build_gateway(Config.load({}, **{**settings, "app_env": "testing"}, openai_api_key="sk-test")).close()  # a warning
