"""The `process` task (`POST /api/v1/process`): one row of the task table, built from the loaded templates.

A request is `{prompt, type, source?, language?}` (the user's document 003):

- `type`: summary, keywords, sentiment, entities, translation or custom: which template is used and
  how the answer is read (`process_answers`).
- `source`: where the text comes from (email, meeting, document, chat, other): context for the model.
  A closed list, since it is written into the prompt outside the delimited text block.
- `language`: the language the result is written in (an ISO 639-1 code such as "fr", or a name such
  as "French"); the target language of a translation, so required there. Elsewhere optional: the
  text's own language. Sentiment labels and entity types stay in English (they are parsed).

Because it is a row run by `TaskService.run`, cache, single flight, retries, fallbacks, pricing, the
ledger, budgets and per-key limits apply as to every task. Its cache section and `allowed_tasks`
name is "process".
"""

from __future__ import annotations

from gateway.errors import InvalidRequest
from gateway.tasks import process_answers
from gateway.tasks.process_templates import TYPES, ProcessTemplates
from gateway.tasks.table import TaskDefinition

NAME = "process"
PATH = "/process"
SOURCES = ("email", "meeting", "document", "chat", "other")
TEMPERATURE = 0.2  # extraction and summaries want stable answers (and stable answers cache well)


def process_task(templates: ProcessTemplates) -> TaskDefinition:
    """The task table row of `process`, rendering prompts from `templates`."""
    return TaskDefinition(
        name=NAME, path=PATH, result_field="result", temperature=TEMPERATURE,
        prompt=lambda inputs: templates.render(inputs["type"], inputs["prompt"], inputs["source"], inputs["language"]),
        parse=lambda answer, inputs: process_answers.parse_answer(inputs["type"], answer),
        cache_inputs=lambda inputs: dict(inputs), inputs=process_inputs, prompt_field="prompt",
        echo=("type", "source", "language"), streams=False,  # a structured result is whole or nothing
    )


def process_inputs(body: dict) -> dict:
    """A validated body -> the task's inputs; the schema checked types, the type list and the source list."""
    kind = body["type"]
    if kind not in TYPES:  # the schema's enum says so first; kept for callers that skip the schema
        raise InvalidRequest(f"Invalid input: 'type' must be one of {', '.join(TYPES)}",
                             details={"fields": {"type": f"must be one of {', '.join(TYPES)}"}})
    language = " ".join((body.get("language") or "").split()) or None
    if kind == "translation" and language is None:
        raise InvalidRequest("Invalid input: 'language' is required for a translation (the target language)",
                             details={"fields": {"language": "is required when type is translation"}})
    return {"prompt": body["prompt"], "type": kind, "source": body.get("source"), "language": language}
