"""The prompt templates of `POST /api/v1/process`: read from a data file, checked once, filled per request.

Operators change the wording in `data/process_templates.json` (or PROCESS_TEMPLATES_FILE)
without touching code. The file is checked at start-up like the model registry: not JSON, a
duplicate key, an unknown or missing type, an unknown placeholder, a template whose `{text}`
is not inside a delimited block: each is a `ConfigError` naming the entry.

Placeholders are `{name}` with `name` one of PLACEHOLDERS; any other brace is literal text, so
a template may show the model a JSON example such as `[{"text": "Acme", "type": "organization"}]`.
Filling is one pass over the template: a value that itself holds `{language}` is never filled again.

Prompt injection: the caller's text is data, not instructions. Templates put `{text}` between
two delimiter lines that carry `{boundary}`, a token derived from the text's own SHA-256: a text
cannot contain the line that closes its block, since it would have to contain its own hash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.config import ConfigError
from gateway.data_file import read_json, shown

DEFAULT_TEMPLATES_FILE = Path(__file__).resolve().parents[2] / "data" / "process_templates.json"
TYPES = ("summary", "keywords", "sentiment", "entities", "translation", "custom")
PLACEHOLDERS = ("text", "boundary", "source", "language")
# What the template needs besides {text} and two {boundary}: translation is useless without its target.
REQUIRED_PLACEHOLDERS = {"translation": ("language",)}
MAX_FILE_BYTES = 256 * 1024
MAX_TEMPLATE_CHARS = 20_000
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # only {identifier}: '{"text": ...}' stays literal
# The bundled templates' first line and text delimiters: what the demo emulator recognises (a template
# without them still works with real models; in demo mode it gets the emulator's plain text reply).
TASK_MARKER = "Task: process"
BEGIN_TEXT, END_TEXT = "-----BEGIN TEXT ", "-----END TEXT "
NO_SOURCE = "unspecified"
NO_LANGUAGE = "the same language as the text"


@dataclass(frozen=True)
class ProcessTemplates:
    """One checked template per processing type."""

    templates: Mapping[str, str]
    source: str = "process templates"  # where they came from, for messages

    def render(self, kind: str, text: str, source: str | None = None, language: str | None = None) -> str:
        """The prompt for one request: every placeholder filled in a single pass."""
        values = {"text": text, "boundary": boundary_of(text), "source": source or NO_SOURCE,
                  "language": language or NO_LANGUAGE}
        return PLACEHOLDER.sub(lambda found: values[found.group(1)], self.templates[kind])


def boundary_of(text: str) -> str:
    """The delimiter token of a text: 16 hex digits of its SHA-256, or all 64 in the (absurd) case the text
    already holds those 16, so the closing delimiter line never occurs inside the text."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return digest if digest[:16] in text else digest[:16]


def load(path: str | Path | None = None) -> ProcessTemplates:
    """The checked templates of `path` (None or "": the bundled file); ConfigError naming the problem."""
    path = Path(path) if path else DEFAULT_TEMPLATES_FILE
    where = f"process templates {path}"
    return parse(read_json(path, where, MAX_FILE_BYTES, "set PROCESS_TEMPLATES_FILE to the templates file, or "
                                                          "leave it empty for data/process_templates.json"), where)


def parse(document: object, where: str = "process templates") -> ProcessTemplates:
    """Check a parsed templates document: {"templates": {type: template}}, a template being a string or a
    list of lines (joined with newlines). Keys starting with "_" are comments."""
    if not isinstance(document, dict) or not isinstance(document.get("templates"), dict):
        raise ConfigError(f"{where}: must be a JSON object with a \"templates\" object (type -> template)")
    unknown = [key for key in document if key != "templates" and not key.startswith("_")]
    if unknown:
        raise ConfigError(f"{where}: unknown top-level field {shown(unknown[0])} (expected \"templates\")")
    entries = {kind: entry for kind, entry in document["templates"].items() if not kind.startswith("_")}
    for kind in entries:
        if kind not in TYPES:
            raise ConfigError(f"{where}: template {shown(kind)} is not a processing type ({', '.join(TYPES)})")
    missing = [kind for kind in TYPES if kind not in entries]
    if missing:
        raise ConfigError(f"{where}: template {shown(missing[0])} is missing (every type needs one: "
                          f"{', '.join(TYPES)})")
    return ProcessTemplates({kind: _checked(kind, entries[kind], where) for kind in TYPES}, where)


def _checked(kind: str, entry: object, where: str) -> str:
    at = f"{where}: template {shown(kind)}"
    if isinstance(entry, list) and all(isinstance(line, str) for line in entry):
        entry = "\n".join(entry)
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"{at}: must be a non-empty string or a list of strings (lines)")
    if len(entry) > MAX_TEMPLATE_CHARS:
        raise ConfigError(f"{at}: longer than {MAX_TEMPLATE_CHARS} characters")
    found = [match.group(1) for match in PLACEHOLDER.finditer(entry)]
    unknown = [name for name in found if name not in PLACEHOLDERS]
    if unknown:
        raise ConfigError(f"{at}: unknown placeholder {{{unknown[0]}}} (placeholders: "
                          f"{', '.join('{' + name + '}' for name in PLACEHOLDERS)}; other braces are literal)")
    if found.count("text") != 1:
        raise ConfigError(f"{at}: must hold {{text}} exactly once (it has {found.count('text')})")
    first, last = found.index("boundary") if "boundary" in found else -1, _last(found, "boundary")
    if not first < found.index("text") < last:
        raise ConfigError(f"{at}: {{text}} must sit between two delimiter lines holding {{boundary}} (one before, "
                          "one after), so the caller's text cannot pass for instructions")
    for name in REQUIRED_PLACEHOLDERS.get(kind, ()):
        if name not in found:
            raise ConfigError(f"{at}: must use {{{name}}}")
    return entry


def _last(items: list[str], wanted: str) -> int:
    return max((index for index, item in enumerate(items) if item == wanted), default=-1)
