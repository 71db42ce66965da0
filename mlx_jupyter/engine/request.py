"""GenerationRequest: every field of a generation request, declared once with its type, range, default and help."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from mlx_jupyter.engine import field_checks as checks
from mlx_jupyter.engine.errors import InvalidRequestError, PromptTooLargeError
from mlx_jupyter.engine.field_checks import (
    MAX_LOGIT_BIAS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    Check,
    Limits,
)

# FieldSpec.openai_default when an OpenAI request gets the field's own default.
SAME_DEFAULT: Any = object()


@dataclass(frozen=True)
class FieldSpec:
    """What every surface knows of one request field.

    Args:
        help: one sentence; the magics' ``--help``, the OpenAPI document and the README show it.
        schema: its JSON Schema (type and range; ``default`` and ``description`` are added).
        check: ``check(name, value, limits)`` gives the field's value or raises InvalidRequestError.
        openai: the OpenAI request fields that carry it, the preferred one first (none: native only).
        openai_default: its value when an OpenAI request leaves it out, where OpenAI's default differs.
        option: the ``%%mlx`` option's flags that set it, if any, and ``metavar`` the placeholder of its value.
        worker: sent to the worker (``model`` and ``keep_alive`` are the manager's).
    """

    help: str
    schema: dict[str, Any]
    check: Check
    openai: tuple[str, ...] = ()
    openai_default: Any = SAME_DEFAULT
    option: tuple[str, ...] = ()
    metavar: str | None = None
    worker: bool = True


def _spec(help: str, schema: dict[str, Any], check: Check, **more: Any) -> dict[str, FieldSpec]:
    return {"spec": FieldSpec(help, schema, check, **more)}


@dataclass
class GenerationRequest:
    """A validated request: build one with ``GenerationRequest.parse``.

    Each field's ``FieldSpec`` (its metadata) is the one description the engine's
    validation, the OpenAPI document, the OpenAI field mapping and the ``%%mlx`` options
    are derived from: a new parameter is a new field here and its use in the worker.
    """

    model: str | None = field(
        default=None,
        metadata=_spec(
            "Model id; absent = the host's default_model. Loaded on demand.",
            {"type": "string", "minLength": 1},
            checks.model_id,
            openai=("model",),
            option=("-m", "--model"),
            worker=False,
        ),
    )
    prompt: str | None = field(
        default=None,
        metadata=_spec(
            "Text to continue, as written (no chat template).", {"type": "string", "minLength": 1}, checks.prompt
        ),
    )
    messages: list[dict[str, str]] | None = field(
        default=None,
        metadata=_spec(
            "Chat messages ({role, content}), formatted with the model's chat template.",
            {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Message"}},
            checks.messages,
        ),
    )
    max_tokens: int = field(
        default=512,
        metadata=_spec(
            "Most tokens to generate; at most the host's max_tokens_limit and the model's context.",
            {"type": "integer", "minimum": 1},
            checks.number(1, integer=True),
            openai=("max_completion_tokens", "max_tokens"),
            option=("--max-tokens",),
            metavar="N",
        ),
    )
    temperature: float = field(
        default=0.0,
        metadata=_spec(
            "Sampling temperature; 0 = greedy.",
            {"type": "number", "minimum": 0, "maximum": 100},
            checks.number(0.0, 100.0),
            openai=("temperature",),
            openai_default=1.0,
            option=("--temperature",),
            metavar="T",
        ),
    )
    top_p: float = field(
        default=1.0,
        metadata=_spec(
            "Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p.",
            {"type": "number", "minimum": 0, "maximum": 1},
            checks.number(0.0, 1.0),
            openai=("top_p",),
            option=("--top-p",),
            metavar="P",
        ),
    )
    seed: int | None = field(
        default=None,
        metadata=_spec(
            "Random seed, for reproducible sampling.",
            {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
            checks.number(0, 2**63 - 1, integer=True),
            openai=("seed",),
            option=("--seed",),
            metavar="S",
        ),
    )
    stop: list[str] = field(
        default_factory=list,
        metadata=_spec(
            f"Stop strings (at most {MAX_STOP_STRINGS}, of {MAX_STOP_CHARS} characters each): "
            "the answer ends before the first one.",
            {"$ref": "#/components/schemas/StopSequences"},
            checks.stops,
            openai=("stop",),
            option=("--stop",),
            metavar="STR",
        ),
    )
    top_k: int = field(
        default=0,
        metadata=_spec(
            "Sample from the k most likely tokens only; 0 = all.",
            {"type": "integer", "minimum": 0, "maximum": 1_000_000},
            checks.number(0, 1_000_000, integer=True),
            openai=("top_k",),
            option=("--top-k",),
            metavar="K",
        ),
    )
    min_p: float = field(
        default=0.0,
        metadata=_spec(
            "Drop tokens less likely than min_p times the most likely one; 0 = off.",
            {"type": "number", "minimum": 0, "maximum": 1},
            checks.number(0.0, 1.0),
            openai=("min_p",),
            option=("--min-p",),
            metavar="P",
        ),
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata=_spec(
            "Divide the scores of tokens already in the last repetition_context_size tokens by this; 1 = off.",
            {"type": "number", "minimum": 0.01, "maximum": 10},
            checks.number(0.01, 10.0),
            openai=("repetition_penalty",),
            option=("--repetition-penalty",),
            metavar="R",
        ),
    )
    repetition_context_size: int = field(
        default=20,
        metadata=_spec(
            "How many of the last tokens repetition_penalty looks at.",
            {"type": "integer", "minimum": 1, "maximum": 4096},
            checks.number(1, 4096, integer=True),
            openai=("repetition_context_size",),
            option=("--repetition-context-size",),
            metavar="N",
        ),
    )
    presence_penalty: float = field(
        default=0.0,
        metadata=_spec(
            "Subtract this from the score of every token in the last 20 (OpenAI's presence penalty); 0 = off.",
            {"type": "number", "minimum": -2, "maximum": 2},
            checks.number(-2.0, 2.0),
            openai=("presence_penalty",),
            option=("--presence-penalty",),
            metavar="X",
        ),
    )
    frequency_penalty: float = field(
        default=0.0,
        metadata=_spec(
            "Subtract this times its count in the last 20 tokens from each token's score (OpenAI's); 0 = off.",
            {"type": "number", "minimum": -2, "maximum": 2},
            checks.number(-2.0, 2.0),
            openai=("frequency_penalty",),
            option=("--frequency-penalty",),
            metavar="X",
        ),
    )
    logit_bias: dict[int, float] | None = field(
        default=None,
        metadata=_spec(
            f"Token id -> a bias from -100 to 100 added to its score (at most {MAX_LOGIT_BIAS} entries).",
            {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
            checks.logit_bias,
            openai=("logit_bias",),
        ),
    )
    logprobs: bool = field(
        default=False,
        metadata=_spec(
            "Return each generated token's log probability.",
            {"type": "boolean"},
            checks.flag,
            openai=("logprobs",),
        ),
    )
    top_logprobs: int = field(
        default=0,
        metadata=_spec(
            f"With each token, its N most likely alternatives and their log probabilities (0-{MAX_TOP_LOGPROBS}); "
            "implies logprobs.",
            {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
            checks.number(0, MAX_TOP_LOGPROBS, integer=True),
            openai=("top_logprobs",),
            option=("--logprobs",),
            metavar="N",
        ),
    )
    keep_alive: float | None = field(
        default=None,
        metadata=_spec(
            "How long the model stays loaded after this request: seconds or a duration such as "
            "'10m'; negative = forever, 0 = unload at once; absent = the host's idle_timeout.",
            {"$ref": "#/components/schemas/KeepAlive"},
            checks.keep_alive,
            openai=("keep_alive",),
            option=("--keep-alive",),
            metavar="DUR",
            worker=False,
        ),
    )

    @classmethod
    def parse(cls, values: Mapping[str, Any], limits: Limits | None = None) -> GenerationRequest:
        """Check every field of ``values`` (``None`` = absent); raises InvalidRequestError naming the first bad one."""
        limits = limits or Limits()
        specs = field_specs()
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise InvalidRequestError(f"unknown fields {unknown}: accepted are {', '.join(specs)}", param=unknown[0])
        given = {name: specs[name].check(name, value, limits) for name, value in values.items() if value is not None}
        given.setdefault("max_tokens", min(field_default("max_tokens"), limits.max_tokens_bound))  # within bounds
        if given.get("top_logprobs"):  # asking for alternatives asks for log probabilities
            given.setdefault("logprobs", True)
        if ("prompt" in given) == ("messages" in given):
            raise InvalidRequestError("give exactly one of prompt or messages")
        chars = len(given["prompt"]) if "prompt" in given else sum(len(m["content"]) for m in given["messages"])
        if chars > limits.max_prompt_chars:
            limit = limits.max_prompt_chars
            raise PromptTooLargeError(
                f"the prompt is {chars} characters; the limit is {limit}",
                param="messages" if "messages" in given else "prompt",
                limit=limit,
                value=chars,
            )
        return cls(**given)

    def worker_message(self) -> dict[str, Any]:
        """The fields the worker needs, as the ``generate`` message carries them."""
        return {name: getattr(self, name) for name, spec in field_specs().items() if spec.worker}


def field_specs() -> dict[str, FieldSpec]:
    """Every request field's spec, in declaration order."""
    return {f.name: f.metadata["spec"] for f in fields(GenerationRequest)}


def field_default(name: str) -> Any:
    """The default of field ``name`` when a request leaves it out."""
    f = GenerationRequest.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING else f.default


def json_schema(name: str) -> dict[str, Any]:
    """Field ``name``'s JSON Schema with its help and default, as the OpenAPI document shows it."""
    spec = field_specs()[name]
    schema = dict(spec.schema, description=spec.help)
    default = field_default(name)
    if default is None:
        schema["nullable"] = True
    elif default != []:
        schema["default"] = default
    if "$ref" in schema:  # OpenAPI 3.0 ignores a $ref's siblings: wrap it
        schema = {"allOf": [{"$ref": schema.pop("$ref")}], **schema}
    return schema
