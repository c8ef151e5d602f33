"""The one table of the gateway's tasks: what each one sends, how its answer is read, what it returns.

Everything that differs between text generation, code generation and classification is a row
here (default temperature, prompt builder, answer parser, what goes into the cache key, the
response field and the HTTP path), so the task service and the HTTP layer are written once for
all tasks, and a new task is a new row plus its schema.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import InvalidRequest
from gateway.providers.base import Message
from gateway.tasks import prompts


def unchanged(answer: str, _inputs: dict) -> str:
    return answer


@dataclass(frozen=True)
class TaskDefinition:
    name: str  # "text", "code", "classify": the cache's section and the keys' allowed_tasks
    path: str  # under /api/v1
    result_field: str  # the user's field name in the answer
    temperature: float  # the default when neither the request nor the model's defaults set one
    prompt: Callable[[dict], str]  # the prompt sent for these (validated) inputs
    parse: Callable[[str, dict], str]  # the provider's answer -> the task's result (may raise UpstreamBadAnswer)
    cache_inputs: Callable[[dict], dict]  # what of the inputs changes the answer, normalised for the cache key
    inputs: Callable[[dict], dict]  # a validated request body -> the task's inputs (normalised; may raise 400)
    prompt_field: str  # the input described in the log line (length and hash)
    echo: tuple[str, ...] = ()  # inputs given back in the answer beside the result
    # Applied to every result, cached or not: a classification comes back in this caller's spelling.
    present: Callable[[str, dict], str] = unchanged
    streams: bool = True  # may answer as server-sent events ("stream": true); a classification is one word
    # The conversation sent, when it is more than one user message built by `prompt` (the chat task).
    messages: Callable[[dict], tuple[Message, ...]] | None = None

    def conversation(self, inputs: dict, prompt: str) -> tuple[Message, ...]:
        """The messages sent for these inputs (`prompt` is `self.prompt(inputs)`, built once by the caller)."""
        return self.messages(inputs) if self.messages is not None else (Message("user", prompt),)


def _code_inputs(body: dict) -> dict:
    return {"prompt": body["prompt"], "language": body.get("language", "python").strip().lower()}


def _classify_inputs(body: dict) -> dict:
    """The categories as the caller wrote them (trimmed); ones that differ only in case or spacing are
    refused, since the answer could not tell them apart."""
    categories = [category.strip() for category in body["categories"]]
    seen: dict[str, str] = {}
    for category in categories:
        normal = prompts.normalise_label(category)
        if normal in seen:
            raise InvalidRequest(
                f"Invalid input: 'categories' has duplicates: {seen[normal]!r} and {category!r}",
                details={"fields": {"categories": "must be distinct (ignoring case and spacing)"}},
            )
        seen[normal] = category
    return {"text": body["text"], "categories": categories}


def _categories_key(inputs: dict) -> dict:
    # The normalised set: reordering or re-casing the categories cannot change the label set.
    return {"text": inputs["text"],
            "categories": sorted({prompts.normalise_label(category) for category in inputs["categories"]})}


TASKS: dict[str, TaskDefinition] = {
    task.name: task for task in (
        TaskDefinition(
            name="text", path="/generate/text", result_field="generated_text", temperature=0.7,
            prompt=lambda inputs: prompts.text_prompt(inputs["prompt"]),
            parse=unchanged,
            cache_inputs=lambda inputs: {"prompt": inputs["prompt"]},
            inputs=lambda body: {"prompt": body["prompt"]}, prompt_field="prompt",
        ),
        TaskDefinition(
            name="code", path="/generate/code", result_field="generated_code", temperature=0.2,
            prompt=lambda inputs: prompts.code_prompt(inputs["prompt"], inputs["language"]),
            parse=lambda answer, _inputs: prompts.extract_code(answer),
            cache_inputs=lambda inputs: {"prompt": inputs["prompt"], "language": inputs["language"]},
            inputs=_code_inputs, prompt_field="prompt", echo=("language",),
        ),
        TaskDefinition(
            name="classify", path="/classify/text", result_field="classification", temperature=0.0,
            prompt=lambda inputs: prompts.classification_prompt(inputs["text"], inputs["categories"]),
            parse=lambda answer, inputs: prompts.match_category(answer, inputs["categories"]),
            cache_inputs=_categories_key, inputs=_classify_inputs, prompt_field="text", echo=("categories",),
            present=lambda label, inputs: prompts.match_category(label, inputs["categories"]), streams=False,
        ),
    )
}


# The OpenAI-compatible `/v1/chat/completions` (gateway/http/openai_routes.py): a text task whose input is a whole
# conversation. It shares the text task's name, so its cache section, the models' `text` defaults, FALLBACKS_TEXT
# and the keys' `allowed_tasks` apply; its cache key holds the messages, so it never meets a text task's entry.
CHAT_TASK = TaskDefinition(
    name="text", path="/v1/chat/completions", result_field="content", temperature=0.7,
    prompt=lambda inputs: "\n".join(content for _role, content in inputs["messages"]),  # token estimate, log line
    parse=unchanged,
    cache_inputs=lambda inputs: {"messages": [list(message) for message in inputs["messages"]]},
    inputs=lambda body: {"messages": tuple((role, content) for role, content in body["messages"])},
    prompt_field="messages",
    messages=lambda inputs: tuple(Message(role, content) for role, content in inputs["messages"]),
)
SERVED_TASKS: dict[str, TaskDefinition] = {**TASKS, "chat": CHAT_TASK}  # what TaskService runs, by name
