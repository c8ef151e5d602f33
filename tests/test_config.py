"""Settings: parsing, production refusals, demo mode, and that every setting is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from gateway.config import ALL_INTERFACES, Config, ConfigError, settings_table

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_users_design():
    config = Config.load({})
    assert (config.host, config.port) == ("0.0.0.0", 8081)
    assert config.gemini_model == "gemini-2.0-flash"
    assert config.retry_max_attempts == 5
    assert (config.retry_min_wait_seconds, config.retry_max_wait_seconds) == (1.0, 60.0)
    assert config.gemini_deadline_seconds == 30.0
    assert config.ratelimit_task_limits == "200 per day;50 per hour;10 per minute"
    assert config.ratelimit_storage_uri == "memory://"
    assert config.cors_origins == ("*",)


def test_values_are_parsed_from_the_environment():
    config = Config.load({"PORT": "9000", "RETRY_MAX_ATTEMPTS": "3", "RATELIMIT_ENABLED": "off",
                          "CORS_ORIGINS": "https://a.example, https://b.example", "GEMINI_DEADLINE_SECONDS": "2.5"})
    assert config.port == 9000 and config.retry_max_attempts == 3 and config.ratelimit_enabled is False
    assert config.cors_origins == ("https://a.example", "https://b.example")
    assert config.gemini_deadline_seconds == 2.5


@pytest.mark.parametrize("environ, words", [
    ({"PORT": "eighty"}, "PORT must be a whole number"),
    ({"RETRY_MAX_ATTEMPTS": "0"}, "RETRY_MAX_ATTEMPTS must be at least 1"),
    ({"RATELIMIT_ENABLED": "maybe"}, "RATELIMIT_ENABLED must be true or false"),
    ({"APP_ENV": "staging"}, "APP_ENV must be one of"),
    ({"RETRY_MIN_WAIT_SECONDS": "10", "RETRY_MAX_WAIT_SECONDS": "5"}, "RETRY_MAX_WAIT_SECONDS"),
])
def test_bad_values_fail_at_start_up_with_the_variable_named(environ, words):
    with pytest.raises(ConfigError, match=words):
        Config.load(environ)


def test_production_refuses_a_missing_key_and_disabled_limits():
    with pytest.raises(ConfigError, match="needs a provider key: GOOGLE_API_KEY, OPENAI_API_KEY or ANTHROPIC_API_KEY"):
        Config.load({"APP_ENV": "production"})
    with pytest.raises(ConfigError, match="RATELIMIT_ENABLED=false"):
        Config.load({"APP_ENV": "production", "GOOGLE_API_KEY": "AIzaX", "RATELIMIT_ENABLED": "false"})
    production = Config.load({"APP_ENV": "production", "GOOGLE_API_KEY": "AIzaX"})
    assert production.cors_origins == ()  # no cross-origin access unless configured
    assert not production.demo_mode


@pytest.mark.parametrize("environ, console", [
    ({}, True),  # development
    ({"APP_ENV": "testing"}, True),
    ({"APP_ENV": "production", "GOOGLE_API_KEY": "AIzaX"}, False),  # the files have every line; stderr stays quiet
    ({"APP_ENV": "production", "GOOGLE_API_KEY": "AIzaX", "LOG_CONSOLE": "true"}, True),
    ({"LOG_CONSOLE": "false"}, False),
    ({"LOG_CONSOLE": "off"}, False),
    ({"APP_ENV": "production", "GOOGLE_API_KEY": "AIzaX", "LOG_CONSOLE": " "}, False),  # blank is unset
])
def test_the_console_summary_is_off_by_default_in_production_only(environ, console):
    assert Config.load(environ).log_console is console


def test_log_console_must_be_a_boolean():
    with pytest.raises(ConfigError, match="LOG_CONSOLE must be true or false"):
        Config.load({"LOG_CONSOLE": "sometimes"})


def test_demo_mode_only_without_a_key_outside_production():
    assert Config.load({}).demo_mode
    assert not Config.load({"GOOGLE_API_KEY": "AIzaX"}).demo_mode


def test_the_key_never_appears_in_the_configs_repr():
    config = Config.load({"GOOGLE_API_KEY": "AIzaSecretValue123"})
    assert "AIzaSecretValue123" not in repr(config)
    assert "AIzaSecretValue123" not in str(config)


def test_unknown_overrides_are_refused():
    with pytest.raises(ConfigError, match="unknown settings: colour"):
        Config.load({}, colour="blue")


def env_example() -> tuple[dict[str, str], set[str]]:
    """.env.example's settings ({variable: value}) and the variables it documents commented out."""
    settings, commented = {}, set()
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            variable, value = line.split("=", 1)
            settings[variable] = value
        elif match := re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=.*", line):
            commented.add(match[1])
    return settings, commented


# The product's code (not the tests, the benchmarks or example_usage.py, a client that reads its own
# API_URL and API_KEY from the shell).
PRODUCT_CODE = [*sorted((ROOT / "gateway").rglob("*.py")),
                *(ROOT / name for name in ("app.py", "serve.py", "gemini_wrapper.py", "lru_cache.py",
                                           "cost_tracker.py", "enhanced_logging.py"))]


def _is_environ(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute | ast.Name) and getattr(node, "attr", getattr(node, "id", "")) == "environ"


def _text(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _variable_read(node: ast.AST) -> tuple[str, str | None] | None:
    """(variable, literal default or None) if `node` reads an environment variable by name."""
    if isinstance(node, ast.Subscript) and _is_environ(node.value):
        arguments = [node.slice]
    elif isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Attribute) and (node.func.attr == "getenv" or
                                                       (node.func.attr == "get" and _is_environ(node.func.value))))
            or (isinstance(node.func, ast.Name) and node.func.id == "_env")):  # Config's declarations
        arguments = node.args
    else:
        return None
    name = _text(arguments[0]) if arguments else None
    return (name, _text(arguments[1]) if len(arguments) > 1 else None) if name else None


def variables_read_by_the_code() -> dict[str, set[str]]:
    """{variable: the defaults the code writes for it as literals} for every environment variable read
    by name: `os.environ.get`, `os.getenv`, `os.environ[...]` and Config's `_env(...)`."""
    read: dict[str, set[str]] = {}
    for path in PRODUCT_CODE:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if found := _variable_read(node):
                variable, default = found
                read.setdefault(variable, set()).update({default} - {None})
    return read


def test_env_example_lists_every_setting_with_its_default():
    settings, _ = env_example()
    for variable, default in settings_table():
        assert variable in settings, f"{variable} missing from .env.example"
        assert settings[variable] == default, f"{variable}: .env.example says {settings[variable]!r}, code {default!r}"


def test_env_example_lists_every_variable_the_code_reads_and_nothing_else():
    """Not only Config's: the launcher's WORKERS, HOST and PORT, the provider's SSL_CERT_FILE... A new
    `os.environ.get("X", ...)` anywhere in the product fails here until .env.example documents it."""
    read = variables_read_by_the_code()
    assert {"WORKERS", "HOST", "PORT", "LOG_DIR", "APP_ENV", "SSL_CERT_FILE"} <= set(read)  # the walk works
    settings, commented = env_example()
    assert sorted(set(read) - set(settings) - commented) == [], "read by the code, missing from .env.example"
    for variable, defaults in read.items():  # a literal default in the code: one, and the example's value
        assert defaults <= {settings.get(variable)}, f"{variable}: .env.example {settings.get(variable)!r}, " \
                                                     f"the code {sorted(defaults)}"
    assert sorted((set(settings) | commented) - set(read)) == [], "in .env.example, read by nothing"


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for variable, _ in settings_table():
        assert f"| `{variable}` |" in readme, f"{variable} missing from the README's configuration table"


def test_cors_is_open_to_every_origin_only_in_demo_mode():
    assert Config.load({}).cors_origins == ("*",)  # demo mode: no key to spend
    assert Config.load({"GOOGLE_API_KEY": "AIzaX"}).cors_origins == ()  # a live key: no origin until named
    assert Config.load({"APP_ENV": "testing", "GOOGLE_API_KEY": "AIzaX"}).cors_origins == ()
    named = Config.load({"GOOGLE_API_KEY": "AIzaX", "CORS_ORIGINS": "http://localhost:3000"})
    assert named.cors_origins == ("http://localhost:3000",)
    assert named.exposure_warnings(host="127.0.0.1") == []


def test_exposure_warnings_take_the_address_actually_served():
    config = Config.load({"GOOGLE_API_KEY": "AIzaX", "HOST": "127.0.0.1"})
    assert config.exposure_warnings() == []
    assert all(config.exposure_warnings(host) for host in ALL_INTERFACES)


def test_production_refuses_cors_for_every_origin():
    with pytest.raises(ConfigError, match=r"refuses CORS_ORIGINS=\*"):
        Config.load({"APP_ENV": "production", "GOOGLE_API_KEY": "AIzaX", "CORS_ORIGINS": "https://a.example, *"})
    star = Config.load({"GOOGLE_API_KEY": "AIzaX", "HOST": "127.0.0.1", "CORS_ORIGINS": "*"})
    [warning] = star.exposure_warnings()  # allowed outside production, but said out loud
    assert "CORS_ORIGINS=*" in warning
    assert Config.load({"HOST": "0.0.0.0"}).exposure_warnings() == []  # demo mode: nothing to spend


@pytest.mark.parametrize("environ, words", [
    ({"GEMINI_DEADLINE_SECONDS": "nan"}, "GEMINI_DEADLINE_SECONDS must be a finite number"),
    ({"COST_INPUT_PRICE_PER_MILLION": "nan"}, "COST_INPUT_PRICE_PER_MILLION must be a finite number"),
    ({"COST_OUTPUT_PRICE_PER_MILLION": "inf"}, "COST_OUTPUT_PRICE_PER_MILLION must be a finite number"),
    ({"CACHE_TEXT_TTL_SECONDS": "Infinity"}, "CACHE_TEXT_TTL_SECONDS must be a finite number"),
    ({"PORT": "99999"}, "PORT must be at most 65535"),
    ({"PORT": "-1"}, "PORT must be at least 0"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be one of"),
    ({"RATELIMIT_STRATEGY": "nope"}, "RATELIMIT_STRATEGY must be one of fixed-window, moving-window, "
                                     "sliding-window-counter"),
])
def test_numbers_that_cannot_work_and_unknown_names_are_refused_at_start_up(environ, words):
    with pytest.raises(ConfigError, match=words):
        Config.load(environ)


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
def test_every_flask_limiter_strategy_and_any_log_level_case_is_accepted(strategy):
    config = Config.load({"RATELIMIT_STRATEGY": strategy, "LOG_LEVEL": "debug", "PORT": "65535"})
    assert (config.ratelimit_strategy, config.port) == (strategy, 65535)


@pytest.mark.parametrize("origin", [
    ".*", "https://*.example.com", "https://example.com/", "https://example.com/app", "example.com",
    "ftp://example.com", "https://exa_mple.com", "https://example.com:0", "https://example.com:99999",
    "https://(a|b).example", "https://example.com$", "https://[::1", "https://user@example.com", "https:// x",
])
def test_cors_origins_must_be_literal_origins(origin):
    with pytest.raises(ConfigError) as refused:
        Config.load({"GOOGLE_API_KEY": "AIzaX", "CORS_ORIGINS": f"http://localhost:3000,{origin}"})
    assert repr(origin) in str(refused.value) and "CORS_ORIGINS" in str(refused.value)


def test_literal_origins_and_star_outside_production_are_accepted():
    origins = "http://localhost:3000, https://app.example.com, http://127.0.0.1:8080, http://[::1]:5173"
    config = Config.load({"GOOGLE_API_KEY": "AIzaX", "CORS_ORIGINS": origins})
    assert len(config.cors_origins) == 4
    assert Config.load({"GOOGLE_API_KEY": "AIzaX", "CORS_ORIGINS": "*"}).cors_origins == ("*",)
