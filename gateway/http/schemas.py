"""The request and response models of the API: one schema source for Swagger and validation.

Each request model is a Flask-RESTX model, so `/swagger.json` documents exactly what is
checked. Validation runs the model's own JSON schema through jsonschema here (rather than
RESTX's `validate=True`) to word each failure for a person, name the field, and never echo a
32,000-character prompt back inside an error message.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from flask_restx import Api, Model, fields
from jsonschema import Draft4Validator

from gateway.errors import InvalidRequest

MAX_NUMBER_DIGITS = 100  # no field takes a number that long; it is refused before int() spends time on it
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 100
MAX_FALLBACKS = 5
MAX_MODEL_ID_CHARS = 128
MAX_TOKENS_LIMIT = 1_000_000  # above any model's output window; the model's own limit is the provider's to enforce
MAX_CATEGORIES = 50
MAX_CATEGORY_CHARS = 100
MAX_LANGUAGE_CHARS = 40
NOT_BLANK = r"\S"
# A language name goes into the code prompt's `Language:` line: letters, digits, spaces and + # . - _
# only (no newline or control character that could start a line of its own). `$(?!\n)`: Python's `$`
# also matches before a final newline. One way to match each string, so no backtracking.
LANGUAGE_PATTERN = r"^ *[A-Za-z0-9+#._-][A-Za-z0-9+#._ -]*$(?!\n)"
LANGUAGE_RULE = f"must be 1 to {MAX_LANGUAGE_CHARS} letters, digits, spaces or + # . - _ (not blank)"

# The API-key schemes of the spec (Swagger 2.0 has no `bearer` type: the Authorization header is an
# apiKey whose value is "Bearer <key>"). Each is enough on its own: SECURITY lists them as alternatives,
# on every operation that needs a key (the tasks and /stats; /health stays open).
AUTHORIZATIONS = {
    "Bearer": {"type": "apiKey", "in": "header", "name": "Authorization",
               "description": "Your gateway key as `Bearer <key>` (type the word Bearer, a space, then the key)"},
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "Your gateway key"},
    "ApiToken": {"type": "apiKey", "in": "header", "name": "X-API-Token", "description": "Your gateway key"},
}
SECURITY = list(AUTHORIZATIONS)


def nullable(field):
    """The same field, documented as possibly null in answers (Swagger 2.0 `x-nullable`): unset settings are null."""
    schema = {**field.__schema__, "x-nullable": True}
    clone = copy.copy(field)
    clone.__dict__["__schema__"] = schema  # __schema__ is a cached_property: set its cached value on the copy
    return clone


class InvalidBody(ValueError):
    """A request body the gateway cannot use, worded by us: `routes.error_payload` shows this text as
    the 400's `reason`, and only this text (a parser's own messages name library internals)."""


def bounded_int(digits: str) -> int:
    """JSON's `parse_int`: refuse absurdly long numbers in our words, not Python's int-limit text."""
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise InvalidBody(f"a number has more than {MAX_NUMBER_DIGITS} digits")
    return int(digits)


@dataclass(frozen=True)
class RequestSchema:
    """A request model and the validator compiled from its schema once."""

    model: Model
    validator: Draft4Validator

    @classmethod
    def of(cls, model: Model, api: Api) -> RequestSchema:
        """Compile the model's schema, with the API's definitions so nested models resolve."""
        schema = {**model.__schema__, "definitions": {name: m.__schema__ for name, m in api.models.items()}}
        return cls(model, Draft4Validator(schema))

    def validate(self, payload) -> dict:
        """Check `payload`; raise `InvalidRequest` naming every failing field."""
        if not isinstance(payload, dict):
            raise InvalidRequest("The request body must be a JSON object",
                                 details={"fields": {"body": "must be an object"}})
        problems = {}
        for error in sorted(self.validator.iter_errors(payload), key=lambda e: list(e.path)):
            field, message = _describe(error)
            problems.setdefault(field, message)
        if problems:
            summary = "; ".join(f"'{field}' {message}" for field, message in problems.items())
            raise InvalidRequest(f"Invalid input: {summary}", details={"fields": problems})
        return payload


@dataclass(frozen=True)
class Schemas:
    """The models registered on one `Api`, by role."""

    text_request: RequestSchema
    code_request: RequestSchema
    classify_request: RequestSchema
    text_response: Model
    code_response: Model
    classify_response: Model
    health: Model
    stats: Model
    error: Model

    @property
    def requests(self) -> dict[str, RequestSchema]:
        """The request schema of each task, by task name (gateway.tasks.table)."""
        return {"text": self.text_request, "code": self.code_request, "classify": self.classify_request}

    @property
    def responses(self) -> dict[str, Model]:
        return {"text": self.text_response, "code": self.code_response, "classify": self.classify_response}


def register_models(api: Api, max_prompt_chars: int) -> Schemas:
    """Define every model on `api`, with the configured prompt limit in the schema."""

    def prompt_field(description: str, example: str) -> fields.String:
        return fields.String(
            required=True, min_length=1, max_length=max_prompt_chars, pattern=NOT_BLANK,
            description=f"{description} (1 to {max_prompt_chars} characters, not blank)", example=example,
        )

    usage = api.model("Usage", {
        "input_tokens": fields.Integer(description="Prompt tokens", example=12),
        "output_tokens": fields.Integer(description="Answer tokens", example=48),
        "total_tokens": fields.Integer(example=60),
        "source": fields.String(description='"provider" (usage reported by Gemini) or "estimate" (tiktoken)',
                                example="provider"),
    })
    cost = api.model("Cost", {
        "currency": fields.String(example="USD"),
        "input": fields.Float(description="Charged for input tokens (0 when served from cache)", example=0.0000012),
        "output": fields.Float(description="Charged for output tokens", example=0.0000192),
        "total": fields.Float(example=0.0000204),
        "saved": fields.Float(description="What a cache hit avoided paying", example=0.0),
    })
    cache_control = api.model("CacheControl", {
        "no_cache": fields.Boolean(default=False, description="Skip the cache lookup (like Cache-Control: no-cache)"),
        "no_store": fields.Boolean(default=False, description="Do not store this answer (Cache-Control: no-store)"),
    })
    cache_field = fields.Nested(cache_control, required=False, description="Per-request cache control (optional)")
    generation = {  # the per-request choices every task takes; absent = the task's or the model's default
        "model": fields.String(min_length=1, max_length=MAX_MODEL_ID_CHARS, example="gemini-2.0-flash",
                               description="Public model id (GET /api/v1/models); default DEFAULT_MODEL"),
        "temperature": fields.Float(min=0, max=2, description="Sampling temperature, 0 to 2 "
                                    "(default per task: text 0.7, code 0.2, classify 0.0)", example=0.7),
        "max_tokens": fields.Integer(min=1, max=MAX_TOKENS_LIMIT, description="Most tokens in the answer",
                                     example=256),
        "top_p": fields.Float(min=0, max=1, description="Nucleus sampling, 0 to 1", example=0.95),
        "stop": fields.List(fields.String(min_length=1, max_length=MAX_STOP_CHARS), max_items=MAX_STOP_SEQUENCES,
                            description=f"Up to {MAX_STOP_SEQUENCES} stop sequences", example=["\n\n"]),
        "fallbacks": fields.List(fields.String(min_length=1, max_length=MAX_MODEL_ID_CHARS),
                                 max_items=MAX_FALLBACKS, example=[],
                                 description="Models to try in order when the model keeps failing "
                                             "(replaces the task's configured fallbacks; [] for none)"),
    }
    stream_field = fields.Boolean(default=False, example=False, description=(
        "Answer as server-sent events (text/event-stream): `chunk` events, then `done` with this answer's "
        "fields (a text's without `generated_text`, the chunks joined), or `error`. Absent: "
        "`Accept: text/event-stream` asks for the stream; false always answers JSON"))
    answer_fields = {
        "model": fields.String(description="Public id of the model that answered (a fallback, if the asked "
                                           "one failed)", example="gemini-2.0-flash"),
        "provider": fields.String(description='The provider that answered: "gemini", "openai" or "anthropic"',
                                  example="gemini"),
        "fallback_used": fields.Boolean(description="Whether a fallback model answered (also X-Fallback-Used)",
                                        example=False),
        "cached": fields.Boolean(description="Served without an upstream call of its own (cache hit or "
                                             "shared with an identical request in flight)", example=False),
        "usage": fields.Nested(usage),
        "cost": fields.Nested(cost),
        "request_id": fields.String(example="3f2c9a7e4b1d4e0f9a8b7c6d5e4f3a2b"),
    }
    return Schemas(
        text_request=RequestSchema.of(api.model("TextGeneration", {
            "prompt": prompt_field("Text prompt for generation", "Write a short story about a robot"),
            "cache": cache_field, "stream": stream_field, **generation,
        }), api),
        code_request=RequestSchema.of(api.model("CodeGeneration", {
            "prompt": prompt_field("What the code should do",
                                   "Create a Python function to calculate fibonacci numbers"),
            "language": fields.String(min_length=1, max_length=MAX_LANGUAGE_CHARS, pattern=LANGUAGE_PATTERN,
                                      default="python", example="python",
                                      description=f"Programming language (default python): {LANGUAGE_RULE}"),
            "cache": cache_field, "stream": stream_field, **generation,
        }), api),
        classify_request=RequestSchema.of(api.model("TextClassification", {
            "text": prompt_field("Text to classify", "This movie was amazing!"),
            "categories": fields.List(
                fields.String(min_length=1, max_length=MAX_CATEGORY_CHARS, pattern=NOT_BLANK),
                required=True, min_items=2, max_items=MAX_CATEGORIES, unique=True,
                description=f"2 to {MAX_CATEGORIES} distinct categories; the answer is always one of them",
                example=["positive", "negative", "neutral"],
            ),
            "cache": cache_field, **generation,
        }), api),
        text_response=api.model("TextResponse", {
            "generated_text": fields.String(description="Generated text", example="Once upon a time..."),
            **answer_fields,
        }),
        code_response=api.model("CodeResponse", {
            "generated_code": fields.String(description="The code itself, without markdown fences",
                                            example="def fibonacci(n):\n    ..."),
            "language": fields.String(example="python"),
            **answer_fields,
        }),
        classify_response=api.model("ClassificationResponse", {
            "classification": fields.String(description="Exactly one of the given categories",
                                            example="positive"),
            "categories": fields.List(fields.String, example=["positive", "negative", "neutral"]),
            **answer_fields,
        }),
        health=api.model("Health", {
            "status": fields.String(example="ok"),
            "version": fields.String(example="1.0.0"),
            "environment": fields.String(example="development"),
            "provider": fields.String(example="gemini"),
            "model": fields.String(example="gemini-2.0-flash"),
            "mode": fields.String(description='"live" (Gemini) or "demo" (built-in emulator)', example="live"),
            "uptime_seconds": fields.Float(example=12.5),
            "pid": fields.Integer(description="Id of the process that answered (which serve.py worker)",
                                  example=4242),
        }),
        stats=api.model("Stats", {
            "uptime_seconds": fields.Float(example=3600.0),
            "window_hours": fields.Float(example=24),
            "usage": fields.Raw(description="From the cost ledger over the window: requests, by_status, tokens, "
                                            "token_sources, cost, cache hits and hit_rate, cost_saved_by_cache, "
                                            "cost_reduction, latency_ms p50/p95/p99, by_endpoint, overall_cost"),
            "cache": fields.Raw(description="Response cache per task and total: size, hits, misses, hit_rate, "
                                            "evictions, expirations, coalesced"),
            "process": fields.Raw(description="Since start: requests_by_endpoint (by status), upstream_retries, "
                                              "rate_limited_responses, security_events by type"),
        }),
        error=api.model("Error", {
            "error": fields.String(description="What went wrong, for a person",
                                   example="Invalid input: 'prompt' is required"),
            "code": fields.String(description="Machine-readable code", example="invalid_request"),
            "details": fields.Raw(description="Specifics, e.g. the fields that failed",
                                  example={"fields": {"prompt": "is required"}}),
            "request_id": fields.String(example="3f2c9a7e4b1d4e0f9a8b7c6d5e4f3a2b"),
        }),
    )


_TYPE_WORDS = {"string": "a string", "array": "a list", "object": "an object", "integer": "an integer",
               "number": "a number", "boolean": "true or false"}


def _describe(error) -> tuple[str, str]:
    """(field name, message for a person) for one jsonschema error."""
    path = [str(part) for part in error.path]
    field = path[0] if path else "body"
    where = f" (item {path[1]})" if len(path) > 1 else ""
    limit = error.validator_value
    if error.validator == "required":
        return error.message.split("'")[1], "is required"
    if error.validator == "enum":  # before the table below: its value is a list, which the table cannot take
        return field, f"must be one of {', '.join(map(str, limit))}{where}"
    messages = {
        "type": f"must be {_TYPE_WORDS.get(limit, limit)}{where}",
        "minLength": f"must not be empty{where}",
        "maxLength": f"must be at most {limit} characters{where}",
        "pattern": LANGUAGE_RULE if limit == LANGUAGE_PATTERN else f"must not be blank{where}",
        "minItems": f"needs at least {limit} items",
        "maxItems": f"allows at most {limit} items",
        "uniqueItems": "must not contain duplicates",
        "minimum": f"must be at least {limit}{where}",
        "maximum": f"must be at most {limit}{where}",
    }
    return field, messages.get(error.validator, "is invalid")
