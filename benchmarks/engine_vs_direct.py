"""Benchmark: tokens/s and time to first token of the engine against direct mlx_lm.stream_generate."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mlx_jupyter.builtin_models.builder import random_llama_weights
from mlx_jupyter.engine import WorkerManager
from mlx_jupyter.engine.models import builtin_model_path, cache_dir, create_atomically

PROMPT = "The Zen of Python, by Tim Peters"
TARGET_RATIO = 0.95
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "engine_vs_direct.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Recipe:
    """A random-weight llama the benchmark writes itself; ``name`` carries a version, bump it on change."""

    name: str
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    seed: int = 0


# hidden 768 / 12 layers / 12 heads as GPT-2 small; the wider MLP brings it to ~100M parameters.
# Seeds picked so that greedy decoding of the prompt yields visible text at every token
# (some seeds repeat a partial UTF-8 byte, whose text only arrives at the end).
RANDOM_100M = Recipe("random-100m-v2", hidden_size=768, layers=12, heads=12, intermediate_size=2560, seed=1)
RANDOM_SMALL = Recipe("random-small-v2", hidden_size=256, layers=4, heads=4, intermediate_size=768, seed=1)


@dataclass
class Sample:
    """One generation as the caller saw it.

    Args:
        ttft_s: from the call to the first chunk with text.
        decode_s: from the first chunk with text to the final chunk (the one with finish_reason).
        total_s: from the call to the final chunk.
        tokens: completion tokens, as mlx-lm counts them.
        prompt_tokens: prompt tokens, as mlx-lm counts them.
        text: the whole answer.
        inner_tps: mlx-lm's own generation_tps, measured in the process that runs the model.
        cpu_s: CPU time of this process and the worker together during the call (None where the
            worker's is unknown); unlike wall time it barely moves when other programs load the machine.
    """

    ttft_s: float
    decode_s: float
    total_s: float
    tokens: int
    prompt_tokens: int
    text: str
    inner_tps: float
    cpu_s: float | None = None

    @property
    def tps(self) -> float:
        # mlx-lm's convention: all completion tokens over the time after the first one.
        return self.tokens / self.decode_s


@dataclass
class ModelResult:
    """Interleaved samples of both paths on one model."""

    model: str
    params: int
    direct: list[Sample] = field(default_factory=list)
    engine: list[Sample] = field(default_factory=list)

    def rounds(self) -> list[tuple[Sample, Sample]]:
        # Paired by round: each round's two runs saw the same background noise.
        return list(zip(self.direct, self.engine, strict=True))

    def ratio(self) -> float:
        return statistics.median(e.tps / d.tps for d, e in self.rounds())

    def ttft_overhead_ms(self) -> float:
        return 1000 * statistics.median(e.ttft_s - d.ttft_s for d, e in self.rounds())

    def same_text(self) -> bool:
        return len({s.text for s in self.direct + self.engine}) == 1


# -- the generated model ------------------------------------------------------


def ensure_model(recipe: Recipe) -> Path:
    """The folder of ``recipe``'s model under the cache, written once and atomically."""
    target = cache_dir() / "bench" / recipe.name
    if not (target / "config.json").is_file():
        print(f"writing {recipe.name} to {target}", file=sys.stderr)
        create_atomically(target, lambda folder: write_model(recipe, folder))
    return target


def write_model(recipe: Recipe, folder: Path) -> None:
    """A llama mlx-lm loads, with the built-in model's tokenizer; config.json last marks it complete."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    tiny = builtin_model_path("tiny")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tiny / name, folder / name)
    config = json.loads((tiny / "config.json").read_text(encoding="utf-8"))
    config.update(
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        intermediate_size=recipe.intermediate_size,
        vocab_size=Tokenizer.from_file(str(tiny / "tokenizer.json")).get_vocab_size(),
        torch_dtype="float32",
    )
    # float32: MLX's CPU backend decodes float16 weights about half as fast.
    save_file(random_llama_weights(config, recipe.seed), str(folder / "model.safetensors"), metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- the two paths --------------------------------------------------------------


def run_direct(model: Any, tokenizer: Any, max_tokens: int) -> Sample:
    """mlx-lm in this process, with the worker's sampler settings."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    start = time.perf_counter()
    sampler = make_sampler(temp=0.0, top_p=1.0)
    first = end = None
    parts, last = [], None
    for last in stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens, sampler=sampler):
        now = time.perf_counter()
        if first is None and last.text:
            first = now
        parts.append(last.text)
        if last.finish_reason is not None:
            end = now
    assert last is not None and first is not None and end is not None, "direct generation gave no text"
    return Sample(
        ttft_s=first - start,
        decode_s=end - first,
        total_s=end - start,
        tokens=last.generation_tokens,
        prompt_tokens=last.prompt_tokens,
        text="".join(parts),
        inner_tps=last.generation_tps,
    )


def run_engine(manager: WorkerManager, model_id: str, max_tokens: int) -> Sample:
    """The engine's streaming generate, timed in the caller as a notebook would see it."""
    start = time.perf_counter()
    first = end = None
    parts, final = [], None
    for chunk in manager.stream_generate(PROMPT, model=model_id, max_tokens=max_tokens, temperature=0.0, seed=0):
        now = time.perf_counter()
        if first is None and chunk.text:
            first = now
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            final, end = chunk, now
    assert final is not None and first is not None and end is not None, "engine generation gave no text"
    assert final.usage is not None and final.timings is not None
    return Sample(
        ttft_s=first - start,
        decode_s=end - first,
        total_s=end - start,
        tokens=final.usage["completion_tokens"],
        prompt_tokens=final.usage["prompt_tokens"],
        text="".join(parts),
        inner_tps=final.timings["generation_tps"],
    )


def bench_model(manager: WorkerManager, model_id: str, path: Path, runs: int, max_tokens: int) -> ModelResult:
    """Load both paths, warm each up once, then alternate their runs so both see the same noise."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, tokenizer = load(str(path))
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"{model_id}: {params:,} parameters", file=sys.stderr)
    manager.load(model_id)
    result = ModelResult(model_id, params)
    paths = (
        (partial(run_direct, model, tokenizer, max_tokens), result.direct),
        (partial(run_engine, manager, model_id, max_tokens), result.engine),
    )
    worker_pid = manager.status()[0].pid
    for run, _ in paths:
        run()
    for i in range(runs):
        # Alternating which path goes first cancels a bias for or against running second.
        for run, samples in paths if i % 2 == 0 else reversed(paths):
            samples.append(with_cpu_time(run, worker_pid))
        d, e = result.direct[-1], result.engine[-1]
        print(
            f"{model_id}: round {i + 1}/{runs}: direct {d.tps:.1f} tok/s, ttft {1000 * d.ttft_s:.1f} ms; "
            f"engine {e.tps:.1f} tok/s, ttft {1000 * e.ttft_s:.1f} ms",
            file=sys.stderr,
        )
    manager.unload(model_id)
    # Free this model before the next one so the two never compete for memory.
    del model, tokenizer
    gc.collect()
    mx.clear_cache()
    return result


def with_cpu_time(run: Callable[[], Sample], worker_pid: int | None) -> Sample:
    """``run()``, with the CPU time this process and the worker spent on it."""
    caller, worker = time.process_time(), process_cpu_s(worker_pid)
    sample = run()
    worker_after = process_cpu_s(worker_pid)
    if worker is not None and worker_after is not None:
        sample.cpu_s = time.process_time() - caller + worker_after - worker
    return sample


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds the threads of ``pid`` have run, from Linux's nanosecond schedstat; None elsewhere."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    total = 0
    for task in tasks:
        # A thread that ended in between takes its time with it; the worker's threads live as long as it does.
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


# -- the report -----------------------------------------------------------------


def _median(samples: list[Sample], value: Callable[[Sample], float]) -> float:
    return statistics.median(value(s) for s in samples)


def _both(result: ModelResult, value: Callable[[Sample], float], spec: str) -> str:
    return f"{_median(result.direct, value):{spec}} / {_median(result.engine, value):{spec}}"


def _cpu_ms_per_token(samples: list[Sample]) -> str:
    known = [1000 * s.cpu_s / s.tokens for s in samples if s.cpu_s is not None]
    return f"{statistics.median(known):.2f}" if known else "n/a"


def render(results: list[ModelResult], args: argparse.Namespace, wall_s: float) -> str:
    import mlx.core as mx
    import mlx_lm

    lines = [
        "# Engine vs direct mlx-lm",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.platform()}, {os.cpu_count()} CPUs, mlx {mx.__version__} "
        f"({mx.default_device()}), mlx-lm {mlx_lm.__version__}, Python {platform.python_version()}.",
        f"Greedy decoding, prompt {PROMPT!r}, max_tokens {args.tokens}, {args.runs} run(s) per path after one "
        f"warm-up each, direct and engine runs alternated{' (--quick)' if args.quick else ''}. "
        f"Whole run: {wall_s:.0f} s.",
        "",
        "| model | params | prompt tokens | completion tokens (direct / engine) | direct tok/s | engine tok/s "
        "| engine/direct | direct TTFT ms | engine TTFT ms | TTFT overhead ms | same text |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        counts = f"{'/'.join(sorted({str(s.tokens) for s in r.direct}))} / "
        counts += "/".join(sorted({str(s.tokens) for s in r.engine}))
        lines.append(
            f"| {r.model} | {r.params / 1e6:.1f}M | {r.direct[0].prompt_tokens} | {counts} "
            f"| {_median(r.direct, lambda s: s.tps):.1f} | {_median(r.engine, lambda s: s.tps):.1f} "
            f"| {r.ratio():.3f} | {_median(r.direct, lambda s: 1000 * s.ttft_s):.1f} "
            f"| {_median(r.engine, lambda s: 1000 * s.ttft_s):.1f} | {r.ttft_overhead_ms():+.1f} "
            f"| {'yes' if r.same_text() else 'NO'} |"
        )
    lines += [
        "",
        "tok/s = completion tokens / (final chunk - first chunk with text), as seen by the caller (the same",
        "convention as mlx-lm's generation_tps); TTFT = call → first chunk with text. Columns are medians over",
        "the runs; engine/direct and the TTFT overhead are medians of the per-round pairs. On runs of a few",
        "milliseconds (builtin:tiny, --quick) a caller scheduled late receives the first chunks in a burst,",
        "which shortens the measured decode time: compare the total column there.",
        "",
        "Diagnostics, each as direct / engine: mlx-lm's own generation_tps where the model runs (this process /",
        "the worker), CPU time per completion token (this process and the worker together; it moves far less",
        "than wall time when other programs load the machine), and the whole call → final chunk.",
        "",
        "| model | mlx-lm tok/s | CPU ms per token | total s | per-round engine/direct |",
        "|---|--:|--:|--:|---|",
    ]
    for r in results:
        pairs = ", ".join(f"{e.tps / d.tps:.3f}" for d, e in r.rounds())
        lines.append(
            f"| {r.model} | {_both(r, lambda s: s.inner_tps, '.1f')} "
            f"| {_cpu_ms_per_token(r.direct)} / {_cpu_ms_per_token(r.engine)} "
            f"| {_both(r, lambda s: s.total_s, '.2f')} "
            f"| {pairs} |"
        )
    lines += ["", _verdict(results), ""]
    return "\n".join(lines)


def _verdict(results: list[ModelResult]) -> str:
    target = f"Target: engine >= {TARGET_RATIO:.2f} x direct tok/s on {RANDOM_100M.name}"
    big = next((r for r in results if r.model == RANDOM_100M.name), None)
    if big is None:
        return f"{target}: not measured (--quick runs only the small models)."
    ratio = big.ratio()
    return f"{target}: {'met' if ratio >= TARGET_RATIO else 'NOT met'} ({ratio:.3f})."


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 run of 16 tokens on the small models only (for CI)")
    parser.add_argument("--tokens", type=int, help="max_tokens per generation (default 128; 16 with --quick)")
    parser.add_argument("--runs", type=int, help="measured runs per path and model (default 5; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Markdown report (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (16 if args.quick else 128)
    args.runs = args.runs or (1 if args.quick else 5)
    # Worker log lines go to stderr only when something is wrong; stdout is the table.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    recipe = RANDOM_SMALL if args.quick else RANDOM_100M
    models = [("builtin:tiny", builtin_model_path("tiny")), (recipe.name, ensure_model(recipe))]
    results = []
    with WorkerManager(model_dirs=[str(cache_dir() / "bench")], idle_timeout=0, max_loaded_models=1) as manager:
        for model_id, path in models:
            results.append(bench_model(manager, model_id, path, args.runs, args.tokens))
    report = render(results, args, time.perf_counter() - started)
    print(report)
    write_atomically(args.out, report)

    unequal = [r.model for r in results if {s.tokens for s in r.direct} != {s.tokens for s in r.engine}]
    if unequal:
        # Different amounts of work make the ratio meaningless: fail instead of reporting it quietly.
        print(f"error: direct and engine generated different token counts on {', '.join(unequal)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
