"""GenerationRequest: every field of a generation request, declared once with its type, range, default and help."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from mlx_jupyter.engine.errors import InvalidRequestError, PromptTooLargeError
from mlx_jupyter.engine.keep_alive import parse_keep_alive

ROLES = ("system", "user", "assistant")
# What one request may cost every other request on its model: the stop strings are
# matched against the text after every token.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


# The largest max_tokens when the host sets no bound of its own: the model's context bounds it.
MAX_TOKENS_CEILING = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """The host's bounds on a request. Args: max_tokens (0 = only the model's context), max_prompt_chars."""

    max_tokens: int = 0
    max_prompt_chars: int = 1_000_000

    @property
    def max_tokens_bound(self) -> int:
        return self.max_tokens or MAX_TOKENS_CEILING


Check = Callable[[str, Any, Limits], Any]
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


def _show(value: Any) -> str:
    """A short repr for an error message (a 5,000-digit integer has no repr at all)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(lo: float, hi: float | None = None, *, integer: bool = False) -> Check:
    def check(name: str, value: Any, limits: Limits) -> Any:
        top = limits.max_tokens_bound if hi is None else hi
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InvalidRequestError(
                f"{name} must be {'an integer' if integer else 'a number'}, not {_show(value)}", param=name
            )
        if not (lo <= value <= top) or (not integer and not math.isfinite(value)):
            limit = top if value > top else lo
            shown = value if abs(value) < 2**53 else None  # JSON keeps a number exact only so far
            raise InvalidRequestError(
                f"{name} must be between {lo:g} and {top:g}, not {_show(value)}", param=name, limit=limit, value=shown
            )
        return value if integer else float(value)

    return check


def _model(name: str, value: Any, limits: Limits) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"model must be a non-empty string, not {_show(value)}", param=name)
    return value


def _prompt(name: str, value: Any, limits: Limits) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError("prompt must be a non-empty string", param=name)
    return value


def _messages(name: str, value: Any, limits: Limits) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} objects", param=name)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'content'", param=name)
        if m.get("role") not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role {_show(m.get('role'))} is not supported: use one of {', '.join(ROLES)}", param=name
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _stops(name: str, value: Any, limits: Limits) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequestError("stop must be a non-empty string or a list of them", param=name)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"stop has {len(stops)} strings; the limit is {MAX_STOP_STRINGS}",
            param=name,
            limit=MAX_STOP_STRINGS,
            value=len(stops),
        )
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise InvalidRequestError(
            f"a stop string is {longest} characters long; the limit is {MAX_STOP_CHARS}",
            param=name,
            limit=MAX_STOP_CHARS,
            value=longest,
        )
    return list(stops)


def _flag(name: str, value: Any, limits: Limits) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false, not {_show(value)}", param=name)
    return value


MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_TOP_LOGPROBS = 20


def _logit_bias(name: str, value: Any, limits: Limits) -> dict[int, float]:
    """``{token id: bias}``; ids come as JSON object keys (strings) or integers."""
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{name} must be an object of token id -> bias, not {_show(value)}", param=name)
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            f"{name} has {len(value)} entries; the limit is {MAX_LOGIT_BIAS}",
            param=name,
            limit=MAX_LOGIT_BIAS,
            value=len(value),
        )
    bias = _number(-100.0, 100.0)
    out = {}
    for token, weight in value.items():
        if isinstance(token, bool) or not (isinstance(token, int) or (isinstance(token, str) and token.isdigit())):
            raise InvalidRequestError(f"{name} keys must be token ids (integers), not {_show(token)}", param=name)
        out[int(token)] = bias(f"{name}[{token}]", weight, limits)
    return out


def _keep_alive(name: str, value: Any, limits: Limits) -> float | None:
    return parse_keep_alive(value)


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
            _model,
            openai=("model",),
            option=("-m", "--model"),
            worker=False,
        ),
    )
    prompt: str | None = field(
        default=None,
        metadata=_spec("Text to continue, as written (no chat template).", {"type": "string", "minLength": 1}, _prompt),
    )
    messages: list[dict[str, str]] | None = field(
        default=None,
        metadata=_spec(
            "Chat messages ({role, content}), formatted with the model's chat template.",
            {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Message"}},
            _messages,
        ),
    )
    max_tokens: int = field(
        default=512,
        metadata=_spec(
            "Most tokens to generate; at most the host's max_tokens_limit and the model's context.",
            {"type": "integer", "minimum": 1},
            _number(1, integer=True),
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
            _number(0.0, 100.0),
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
            _number(0.0, 1.0),
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
            _number(0, 2**63 - 1, integer=True),
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
            _stops,
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
            _number(0, 1_000_000, integer=True),
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
            _number(0.0, 1.0),
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
            _number(0.01, 10.0),
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
            _number(1, 4096, integer=True),
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
            _number(-2.0, 2.0),
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
            _number(-2.0, 2.0),
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
            _logit_bias,
            openai=("logit_bias",),
        ),
    )
    logprobs: bool = field(
        default=False,
        metadata=_spec(
            "Return each generated token's log probability.",
            {"type": "boolean"},
            _flag,
            openai=("logprobs",),
        ),
    )
    top_logprobs: int = field(
        default=0,
        metadata=_spec(
            f"With each token, its N most likely alternatives and their log probabilities (0-{MAX_TOP_LOGPROBS}); "
            "implies logprobs.",
            {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
            _number(0, MAX_TOP_LOGPROBS, integer=True),
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
            _keep_alive,
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
