"""Everything the worker uses of mlx and mlx-lm, pinned in one table and checked when a worker starts."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from collections.abc import Iterator
from typing import Any, NamedTuple

# The releases this module is tested with; pyproject.toml requires the same (a test checks).
MLX_VERSIONS = ">=0.32.2,<0.33"
MLX_LM_VERSIONS = ">=0.31.3,<0.33"


class Use(NamedTuple):
    """One thing the worker uses: ``module``'s attribute ``name`` (a dotted path).

    ``keywords`` are arguments the worker passes it by name; ``attributes`` are what the
    worker reads of it or of its results (a dataclass's fields, a class's methods).
    """

    module: str
    name: str
    keywords: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()


# Every use of mlx and mlx-lm in this module, so a release that moved one is caught at start-up
# rather than by an AttributeError in the middle of a request.
USES = (
    Use("mlx.core", "zeros"),
    Use("mlx.core", "get_active_memory"),
    Use("mlx.core", "get_peak_memory"),
    Use("mlx.core", "random.seed"),
    Use("mlx.core", "argpartition"),
    Use("mlx_lm", "load", keywords=("return_config",)),
    Use("mlx_lm", "stream_generate", keywords=("max_tokens",)),
    # stream_generate hands its other keywords (the sampler) to generate_step.
    Use("mlx_lm.generate", "generate_step", keywords=("sampler", "logits_processors")),
    Use(
        "mlx_lm.generate",
        "GenerationResponse",
        attributes=("text", "token", "logprobs", "generation_tokens", "finish_reason"),
    ),
    Use("mlx_lm.generate", "BatchGenerator", keywords=("stop_tokens", "completion_batch_size", "prefill_batch_size")),
    Use("mlx_lm.generate", "BatchGenerator.insert", keywords=("max_tokens", "samplers", "logits_processors")),
    Use("mlx_lm.generate", "BatchGenerator.remove"),
    Use("mlx_lm.generate", "BatchGenerator.next"),
    # Before 0.31 the batch answered with its own Response (and a stop_tokens set of ids).
    Use("mlx_lm.generate", "GenerationBatch.Response", attributes=("uid", "token", "logprobs", "finish_reason")),
    Use("mlx_lm.sample_utils", "make_sampler", keywords=("temp", "top_p", "min_p", "top_k")),
    Use(
        "mlx_lm.sample_utils",
        "make_logits_processors",
        keywords=(
            "logit_bias",
            "repetition_penalty",
            "repetition_context_size",
            "presence_penalty",
            "presence_context_size",
            "frequency_penalty",
            "frequency_context_size",
        ),
    ),
    Use("mlx_lm.models.cache", "make_prompt_cache"),
    Use("mlx_lm.tokenizer_utils", "TokenizerWrapper.detokenizer"),
    Use("mlx_lm.tokenizer_utils", "BPEStreamingDetokenizer"),
    Use("mlx_lm.tokenizer_utils", "SPMStreamingDetokenizer"),
    Use("mlx_lm.tokenizer_utils", "StreamingDetokenizer", attributes=("add_token", "finalize", "last_segment")),
)


class IncompatibleMLXLM(ImportError):
    """The installed mlx or mlx-lm lacks something in ``USES``; the message names each piece."""


def check() -> None:
    """Import mlx and mlx-lm and make sure they have everything in ``USES``.

    Raises:
        IncompatibleMLXLM: A module cannot be imported, or a name, keyword or attribute is
            missing; the message names every one and the tested releases.
    """
    problems = list(dict.fromkeys(p for use in USES if (p := _problem(use)) is not None))
    if problems:
        raise IncompatibleMLXLM(
            f"mlx-lm {_version('mlx_lm')} and mlx {_version('mlx.core')} lack what the mlx-jupyter worker uses: "
            f"{'; '.join(problems)}. mlx-jupyter is tested with mlx{MLX_VERSIONS} and "
            f"mlx-lm{MLX_LM_VERSIONS}: pip install 'mlx{MLX_VERSIONS}' 'mlx-lm{MLX_LM_VERSIONS}'"
        )


def _problem(use: Use) -> str | None:
    where = f"{use.module}.{use.name}"
    try:
        found: Any = importlib.import_module(use.module)
    except Exception as exc:  # a broken install raises more than ImportError
        return f"{use.module} cannot be imported ({type(exc).__name__}: {exc})"
    for part in use.name.split("."):
        if not hasattr(found, part):
            return f"{where} is missing"
        found = getattr(found, part)
    if lacking := [k for k in use.keywords if k not in _parameters(found)]:
        return f"{where} takes no {', '.join(repr(k) for k in lacking)} argument"
    names = {f.name for f in dataclasses.fields(found)} if dataclasses.is_dataclass(found) else set(dir(found))
    if lacking := [a for a in use.attributes if a not in names]:
        return f"{where} has no {', '.join(repr(a) for a in lacking)}"
    return None


def _parameters(function: Any) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # not callable, or a builtin without a signature
        return set()


def _version(module: str) -> str:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return "(unknown version)"


# -- the process ----------------------------------------------------------------


def warm_cxx_exceptions() -> None:
    """Throw one C++ exception on the main thread now, while memory is plentiful.

    libstdc++ allocates a thread's exception state at its first throw: were that first throw
    a bad_alloc at a load's memory bound, that allocation would fail too, and glibc would end
    the process instead of the load raising MemoryError.
    """
    import mlx.core as mx

    with contextlib.suppress(ValueError):
        mx.zeros((2,)).reshape(3)


def active_memory() -> int:
    import mlx.core as mx

    return int(mx.get_active_memory())


def peak_memory() -> int:
    import mlx.core as mx

    return int(mx.get_peak_memory())


# -- models and tokenizers ----------------------------------------------------------


def load(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """The model in folder ``path``, its tokenizer (mlx-lm's ``TokenizerWrapper``) and its config."""
    from mlx_lm import load

    return load(path, return_config=True)


def can_batch(model: Any) -> bool:
    """Whether requests to ``model`` can share a batch: caches that cannot merge (e.g. sliding windows) cannot."""
    from mlx_lm.models.cache import make_prompt_cache

    return all(hasattr(c, "merge") for c in make_prompt_cache(model))


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """``prompt``'s tokens, with the BOS token added unless the prompt begins with it (as mlx-lm does)."""
    bos = tokenizer.bos_token
    return list(tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """``messages`` through the model's chat template, ending where the assistant's answer begins."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def detokenizer(tokenizer: Any) -> Any:
    """A fresh streaming detokenizer: ``add_token(token)``, ``finalize()``, then read ``last_segment``."""
    return tokenizer.detokenizer


def sampler(temperature: float, top_p: float, top_k: int, min_p: float) -> Any:
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)


# The penalties' window, as mlx_lm.server sets it; repetition_penalty's is the request's.
PENALTY_CONTEXT = 20


def logits_processors(
    logit_bias: dict[int, float] | None,
    repetition_penalty: float,
    repetition_context_size: int,
    presence_penalty: float,
    frequency_penalty: float,
) -> list[Any]:
    """The request's processors of the scores before sampling; none for values that change nothing."""
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(
        logit_bias=logit_bias or None,
        repetition_penalty=None if repetition_penalty == 1.0 else repetition_penalty,
        repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty or None,
        presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=frequency_penalty or None,
        frequency_context_size=PENALTY_CONTEXT,
    )


def tokenizer_kind(tokenizer: Any) -> str:
    """How ``tokenizer``'s pieces spell bytes: ``"bpe"`` (byte-level), ``"spm"`` (sentencepiece) or ``"plain"``."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    detokenizer = tokenizer.detokenizer
    if isinstance(detokenizer, BPEStreamingDetokenizer):
        return "bpe"
    return "spm" if isinstance(detokenizer, SPMStreamingDetokenizer) else "plain"


def top_logprobs(logprobs: Any, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s log probability in the vector ``logprobs``, and the ``n`` most likely (id, logprob), best first."""
    import mlx.core as mx

    chosen = logprobs[token].item()
    if n <= 0:
        return chosen, []
    n = min(n, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, kth=n - 1)[:n]
    best = sorted(zip(ids.tolist(), logprobs[ids].tolist(), strict=True), key=lambda pair: -pair[1])
    return chosen, best


# -- decoding -----------------------------------------------------------------------


def generate_alone(
    model: Any,
    tokenizer: Any,
    tokens: list[int],
    max_tokens: int,
    sampler: Any,
    processors: list[Any],
    seed: int | None,
) -> Iterator[Any]:
    """One request decoded by itself: mlx-lm's responses (``text``, ``token``, ``logprobs``,
    ``generation_tokens``, ``finish_reason``).

    A ``seed`` seeds MLX's one global random state, which only a request alone may do.
    """
    import mlx.core as mx
    from mlx_lm import stream_generate

    if seed is not None:
        mx.random.seed(seed)
    return stream_generate(
        model, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler, logits_processors=processors
    )


class Batch:
    """mlx-lm's ``BatchGenerator`` as the worker uses it: rows join and leave between steps.

    Every row stops at the tokenizer's end-of-sequence tokens, given once as the batch's
    ``stop_tokens``: mlx-lm's per-row stop API has moved with each release (``state_machines``
    in 0.31, ``stop_sequences`` from ``make_stop_sequences`` in 0.32, ``stop_matchers`` from
    ``make_stop_matcher`` in its newer sources), while ``stop_tokens`` reads the same in all.
    """

    def __init__(self, model: Any, tokenizer: Any, size: int) -> None:
        from mlx_lm.generate import BatchGenerator

        self._generator = BatchGenerator(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=size,
            prefill_batch_size=size,
        )

    def add(self, tokens: list[int], max_tokens: int, sampler: Any, processors: list[Any]) -> int:
        """Queue a row for the next steps, with its own sampler and score processors; returns its uid."""
        (uid,) = self._generator.insert(
            [tokens], max_tokens=[max_tokens], samplers=[sampler], logits_processors=[processors]
        )
        return uid

    def remove(self, uids: list[int]) -> None:
        self._generator.remove(uids)

    def step(self) -> list[Any]:
        """Decode one step: a response (``uid``, ``token``, ``logprobs``, ``finish_reason``) per row with a token."""
        _, responses = self._generator.next()
        return responses
