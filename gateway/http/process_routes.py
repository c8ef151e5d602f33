"""`POST /api/v1/process`: prompt processing by type (summary, keywords, sentiment, entities, translation, custom).

The resource is a task resource like the generated ones in `task_routes` (same request reading,
options, cache control, documented errors and answer fields) whose answer differs: `result` is a
string, a list or an object depending on the type, and `processing_time` is in seconds (the
user's document 003). The task itself is the `process` row (`gateway/tasks/process.py`).
"""

from __future__ import annotations

import time

from flask_restx import Api, Namespace, Resource, fields

from gateway.container import Gateway
from gateway.http.request_state import state
from gateway.http.schemas import LANGUAGE_PATTERN, MAX_LANGUAGE_CHARS, NOT_BLANK, RequestSchema, Schemas, nullable
from gateway.http.task_routes import answer_fields, cache_control, read_request, task_responses, wants_stream
from gateway.tasks import process, process_answers
from gateway.tasks.process_templates import TYPES

DOC = ("Process a text by type: summary, keywords, sentiment, entities, translation or custom.\n\n"
       "The prompt templates come from data/process_templates.json (PROCESS_TEMPLATES_FILE). `result` is text for "
       "summary, translation and custom; a list of strings for keywords; a list of {text, type} for entities; "
       "{sentiment, score} for sentiment (sentiment is positive, negative, neutral or mixed; score -1 to 1 or null). "
       "A structured answer the model got wrong is a 502 upstream_bad_answer. `language` is the language of the "
       "result, required for translation (its target). `processing_time` is in seconds. Default temperature 0.2.")


class AnyJSON(fields.Raw):
    """A field of no fixed JSON type (the spec says nothing of its type): `result` is a string, list or object."""

    __schema_type__ = None


def process_namespace(gateway: Gateway, api: Api, schemas: Schemas, task_limit) -> Namespace:
    """The namespace holding `/process` (mount it at path "/process")."""
    ns = Namespace("process", description="Prompt processing by type, with templates kept in a data file")
    request_schema, response_model = _models(api, gateway.config.request_max_prompt_chars)
    task = gateway.service.tasks[process.NAME]

    @ns.route("")
    class PromptProcessing(Resource):
        @ns.expect(request_schema.model)
        @task_responses(ns, schemas, response_model)
        @task_limit
        def post(self):
            payload, inputs, options = read_request(gateway, task, request_schema)
            wants_stream(task, payload)  # refuses "stream": true (400), as classification does
            outcome = gateway.service.run(task.name, inputs, options, cache_control(payload))
            fields_ = answer_fields(outcome)
            return {"result": process_answers.result_of(inputs["type"], outcome.completion.text),
                    **{name: inputs[name] for name in task.echo},
                    "processing_time": round(time.perf_counter() - state().started, 4), **fields_}

        post.__doc__ = DOC

    return ns


def _models(api: Api, max_prompt_chars: int) -> tuple[RequestSchema, object]:
    """The request and response models: the text task's generation options and answer fields (the same
    definitions, not copies) plus this endpoint's own."""
    options = {name: field for name, field in api.models["TextGeneration"].items() if name not in ("prompt", "stream")}
    answer = {name: field for name, field in api.models["TextResponse"].items() if name != "generated_text"}
    request_model = api.model("PromptProcessing", {
        "prompt": fields.String(required=True, min_length=1, max_length=max_prompt_chars, pattern=NOT_BLANK,
                                description=f"The text to process (1 to {max_prompt_chars} characters, not blank); "
                                            "for custom, the request itself",
                                example="Summarize this meeting: we need to reduce hiring."),
        "type": fields.String(required=True, enum=list(TYPES), example="summary",
                              description=f"What to do with it: {', '.join(TYPES)}"),
        "source": fields.String(enum=list(process.SOURCES), example="meeting",
                                description=f"Where the text comes from (context for the model): "
                                            f"{', '.join(process.SOURCES)}"),
        "language": fields.String(min_length=1, max_length=MAX_LANGUAGE_CHARS, pattern=LANGUAGE_PATTERN,
                                  example="en", description="Language of the result, an ISO 639-1 code or a name "
                                  "(the target language of a translation: required there; otherwise the text's); "
                                  "one line, so it cannot add instructions to the prompt"),
        **options,
    })
    response_model = api.model("ProcessResponse", {
        "result": AnyJSON(description="summary, translation, custom: a string; keywords: a list of strings; "
                                         "entities: a list of {text, type}; sentiment: {sentiment, score}",
                             example="The company plans to reduce hiring."),
        "type": fields.String(enum=list(TYPES), example="summary"),
        "source": nullable(fields.String(example="meeting")),
        "language": nullable(fields.String(example="en")),
        "processing_time": fields.Float(description="Seconds from the request's arrival to its answer",
                                        example=1.25),
        **answer,
    })
    return RequestSchema.of(request_model, api), response_model
