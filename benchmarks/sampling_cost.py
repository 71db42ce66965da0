"""Benchmark: what penalties, logit bias and log probabilities cost per decoded token, at batch 1 and batch 8.

Run: ``python benchmarks/sampling_cost.py [--quick] [--out DIR]``. Each case is the same greedy
request on builtin:pydoc with some sampling fields added; batch 8 is 8 such requests sent to the
engine at once, so they decode as rows of one batch. Cases are run round-robin, one run of each per
round and in a rotating order, so load from other processes falls on all of them alike. A case's
cost is the median over the rounds, its ratio the median of its per-round ratios to plain.
A second measure times the score processing of one step alone, in this process, where the
forward pass does not drown it. Writes ``sampling_cost.json`` and ``sampling_cost.md`` to DIR
(default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine_vs_direct import process_cpu_s, write_atomically  # this folder is on sys.path when run as a script

from mlx_jupyter.engine import WorkerManager
from mlx_jupyter.engine.models import ModelResolver

MODEL = "builtin:pydoc"
# Documentation prose, which builtin:pydoc continues at length rather than ending.
PROMPT = "The json module"
BATCHES = (1, 8)
RESULTS = Path(__file__).resolve().parent / "results"
# Common tokens pushed down, as a user steering word choice would; the cost does not depend on which.
BIASED_WORDS = (" the", " is", ".", ",")
MEASURES = (
    "ms_per_token",
    "worker_ms_per_token",
    "cpu_ms_per_token",
    "worker_cpu_ms_per_token",
    "caller_cpu_ms_per_token",
)


@dataclass
class Run:
    """One stream as its caller saw it.

    Args:
        tokens: completion tokens.
        ms_per_token: (final chunk - first chunk) / (tokens - 1), in the caller: what the
            notebook or server sees, decoding of the answer's frames included.
        worker_ms_per_token: the same span measured in the worker (its ``generation_tps``).
    """

    tokens: int
    ms_per_token: float
    worker_ms_per_token: float


@dataclass
class Cell:
    """Everything measured for one case at one batch size, one value per round: the median of its
    streams, except the CPU times: the worker's, this process's (the engine's parent side and the
    callers) and both together, over all the round's tokens. Unlike wall time they barely move
    when other programs load the machine; NaN where the worker's is unknown (no Linux /proc)."""

    batch: int
    case: str
    ms_per_token: list[float] = field(default_factory=list)
    worker_ms_per_token: list[float] = field(default_factory=list)
    cpu_ms_per_token: list[float] = field(default_factory=list)
    worker_cpu_ms_per_token: list[float] = field(default_factory=list)
    caller_cpu_ms_per_token: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)


def cases(model_path: Path) -> dict[str, dict[str, Any]]:
    """The request fields of each case; ``all`` is every one of them together."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    ids = sorted({i for word in BIASED_WORDS for i in tokenizer.encode(word, add_special_tokens=False).ids})
    each = {
        "plain": {},
        "repetition_penalty 1.3": {"repetition_penalty": 1.3},
        "presence + frequency 0.5": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
        f"logit_bias ({len(ids)} ids)": {"logit_bias": {str(i): -5.0 for i in ids}},
        "logprobs, top 5": {"logprobs": True, "top_logprobs": 5},
    }
    return {**each, "all": {k: v for fields in each.values() for k, v in fields.items()}}


def stream_once(manager: WorkerManager, fields: dict[str, Any], max_tokens: int) -> Run:
    first = end = final = None
    for chunk in manager.stream_generate(PROMPT, model=MODEL, max_tokens=max_tokens, temperature=0.0, **fields):
        now = time.perf_counter()
        first = first or now
        if chunk.finish_reason is not None:
            final, end = chunk, now
    assert final is not None and first is not None and end is not None, "the stream gave no final chunk"
    assert final.finish_reason in ("length", "stop"), f"the stream ended with {final.finish_reason!r}"
    tokens = final.usage["completion_tokens"]
    tps = (final.timings or {}).get("generation_tps")
    if tokens < 2 or not tps:
        raise RuntimeError(f"{tokens} completion token(s) leave no decode to time; raise --tokens")
    return Run(tokens, 1000 * (end - first) / (tokens - 1), 1000 / tps)


def run_batch(manager: WorkerManager, fields: dict[str, Any], max_tokens: int, clients: int) -> list[Run]:
    """``clients`` streams started together (they share the worker's batch), each in its own thread."""
    runs: list[Run | BaseException] = []
    barrier = threading.Barrier(clients)

    def client() -> None:
        barrier.wait(60)
        try:
            runs.append(stream_once(manager, fields, max_tokens))
        except BaseException as exc:  # re-raised below, in the measuring thread
            runs.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    errors = [r for r in runs if isinstance(r, BaseException)]
    if errors or len(runs) != clients:
        raise RuntimeError(f"{len(errors)} of {clients} streams failed: {errors[:1]!r}")
    return runs  # type: ignore[return-value]


def measure(manager: WorkerManager, fields_of: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[Cell]:
    worker = manager.status()[0].pid
    cells = []
    names = list(fields_of)
    for batch in BATCHES:
        by_case = {name: Cell(batch, name) for name in names}
        for name in names:  # warm-up: each case's code paths compiled and cached once
            run_batch(manager, fields_of[name], args.tokens, batch)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                caller_cpu, worker_cpu = time.process_time(), process_cpu_s(worker)
                runs = run_batch(manager, fields_of[name], args.tokens, batch)
                caller_cpu, worker_cpu = time.process_time() - caller_cpu, _spent(worker_cpu, process_cpu_s(worker))
                per_token = 1000 / sum(x.tokens for x in runs)
                cell = by_case[name]
                cell.caller_cpu_ms_per_token.append(caller_cpu * per_token)
                cell.worker_cpu_ms_per_token.append(worker_cpu * per_token)
                cell.cpu_ms_per_token.append((caller_cpu + worker_cpu) * per_token)
                cell.ms_per_token.append(statistics.median(x.ms_per_token for x in runs))
                cell.worker_ms_per_token.append(statistics.median(x.worker_ms_per_token for x in runs))
                cell.completion_tokens += [x.tokens for x in runs]
            line = ", ".join(f"{n} {by_case[n].worker_ms_per_token[-1]:.2f}" for n in names)
            print(f"batch {batch}, round {r + 1}/{args.repeats}: decode ms/token {line}", file=sys.stderr)
        cells += by_case.values()
    return cells


# -- the score processing alone, in this process ------------------------------------


def processing_costs(fields_of: dict[str, dict[str, Any]], steps: int, repeats: int) -> list[dict[str, Any]]:
    """CPU µs of one decode step's score processing alone, per batch size and case.

    On real logits of the model (its last position after the prompt, one copy per row), what a
    worker's step does between the forward pass and the next: each row's processors, as mlx-lm's
    BatchGenerator applies them (row by row, on the row's recent tokens), the normalisation, the
    batch's greedy sampler and, with logprobs, the worker's pick of each row's top entries. The
    processors, sampler and pick are the engine's own (``mlx_lm_adapter``). Cases run round-robin,
    ``steps`` steps per run; the median of ``repeats`` runs, in this process's CPU time.
    """
    import mlx.core as mx

    from mlx_jupyter.engine import mlx_lm_adapter as lm
    from mlx_jupyter.engine.request import GenerationRequest

    model, tokenizer, _ = lm.load(str(ModelResolver().resolve(MODEL).path))
    prompt = lm.encode_prompt(tokenizer, PROMPT)
    logits = model(mx.array([prompt]))[:, -1, :]
    history = mx.array([(prompt * 20)[:20]])  # a full window for the penalties
    greedy = lm.sampler(0.0, 1.0, 0, 0.0)
    rows = []
    for batch in BATCHES:
        scores = mx.repeat(logits, batch, axis=0)
        mx.eval(scores)
        work = {}
        for name, fields in fields_of.items():
            r = GenerationRequest.parse({"prompt": PROMPT, **fields})
            processors = lm.logits_processors(
                r.logit_bias, r.repetition_penalty, r.repetition_context_size, r.presence_penalty, r.frequency_penalty
            )
            work[name] = _step(scores, history, processors, greedy, r.top_logprobs if r.logprobs else None)
        runs: dict[str, list[float]] = {name: [] for name in work}
        for name in work:  # warm-up
            work[name]()
        for i in range(repeats):
            for name in list(work)[i % len(work) :] + list(work)[: i % len(work)]:
                start = time.process_time()
                for _ in range(steps):
                    work[name]()
                runs[name].append(1e6 * (time.process_time() - start) / steps)
        plain = statistics.median(runs["plain"])
        for name, values in runs.items():
            us = statistics.median(values)
            rows.append({"batch": batch, "case": name, "us_per_step": us, "extra_us_per_token": (us - plain) / batch})
    return rows


def _step(scores: Any, history: Any, processors: list[Any], sampler: Any, top: int | None) -> Any:
    """One step's score processing, as a function of nothing (see ``processing_costs``)."""
    import mlx.core as mx

    from mlx_jupyter.engine import mlx_lm_adapter as lm

    def step() -> None:
        x = scores
        if processors:
            processed = []
            for e in range(scores.shape[0]):
                row = scores[e : e + 1]
                for processor in processors:
                    row = processor(history, row)
                processed.append(row)
            x = mx.concatenate(processed, axis=0)
        logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
        sampled = sampler(logprobs)
        mx.eval(sampled, logprobs)
        if top is not None:
            for e, token in enumerate(sampled.tolist()):
                lm.top_logprobs(logprobs[e], token, top)

    return step


def _spent(before: float | None, after: float | None) -> float:
    return after - before if before is not None and after is not None else math.nan


def _median(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else statistics.median(values)


def summary(cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per batch and case: medians, and the median per-round ratio to plain at that batch."""
    plain = {c.batch: c for c in cells if c.case == "plain"}
    rows = []
    for c in cells:
        base = plain[c.batch]
        row: dict[str, Any] = {"batch": c.batch, "case": c.case}
        for key in MEASURES:
            values, plain_values = getattr(c, key), getattr(base, key)
            row[key] = _median(values)
            row[key.replace("ms_per_token", "ratio")] = _median(
                [x / p for x, p in zip(values, plain_values, strict=True)]
            )
        row["completion_tokens"] = sorted(set(c.completion_tokens))
        row["rounds"] = asdict(c)
        rows.append(row)
    return rows


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Sampling cost per token",
        "",
        f"{report['date']}, {report['machine']}; {report['command']}. {report['model']}, greedy, prompt "
        f"{PROMPT!r}, max_tokens {report['tokens']}, {report['repeats']} round(s) after a warm-up; "
        f"batch 8 = 8 requests at once. Whole run {report['wall_s']:.0f} s.",
        "",
        "decode ms/token: the worker's own time from a stream's first token to its end, per further token "
        "(median of the streams, then of the rounds; at batch 8 one step decodes a token for each of the 8). "
        "CPU ms/token: CPU time of the worker plus that of the calling process (the engine's parent side, which "
        "reads each token's frame, and the callers) over all the round's tokens; it moves far less than wall "
        "time when other programs load the machine. x plain: the median of the per-round ratios to the plain "
        "request at the same batch size. "
        "The JSON file also has the caller's wall time per token (first chunk to final chunk), which a caller "
        "scheduled late on a busy machine shortens by taking the chunks in a burst.",
        "",
        "| batch | case | decode ms/token | x plain | CPU ms/token (worker + caller) | x plain | tokens |",
        "|--:|---|--:|--:|--:|--:|--:|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['batch']} | {row['case']} | {row['worker_ms_per_token']:.2f} | {row['worker_ratio']:.2f} "
            f"| {row['cpu_ms_per_token']:.2f} ({row['worker_cpu_ms_per_token']:.2f} + "
            f"{row['caller_cpu_ms_per_token']:.2f}) | {row['cpu_ratio']:.2f} "
            f"| {'/'.join(map(str, row['completion_tokens']))} |"
        )
    lines += [
        "",
        "## The score processing alone",
        "",
        "CPU µs of one decode step between the forward pass and the next, in the benchmark process on the "
        "model's real logits: each row's processors, normalisation, greedy sampling and, with logprobs, the "
        "top-5 pick per row (the engine's own functions, applied as mlx-lm's BatchGenerator applies them). "
        f"Medians of {report['processing_repeats']} runs of {report['processing_steps']} steps; extra = "
        "(case - plain) / batch, per token.",
        "",
        "| batch | case | µs per step | extra µs per token |",
        "|--:|---|--:|--:|",
    ]
    for row in report["processing"]:
        lines.append(
            f"| {row['batch']} | {row['case']} | {row['us_per_step']:.0f} | {row['extra_us_per_token']:+.0f} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 16 tokens (for CI)")
    parser.add_argument("--tokens", type=int, help="max_tokens per request (default 128; 16 with --quick)")
    parser.add_argument("--repeats", type=int, help="measured rounds (default 5; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the JSON and Markdown ({RESULTS})")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (16 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 5)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    fields_of = cases(Path(ModelResolver().resolve(MODEL).path))
    with WorkerManager(idle_timeout=0, max_loaded_models=1) as manager:
        manager.load(MODEL)
        cells = measure(manager, fields_of, args)
    steps = 20 if args.quick else 200
    processing = processing_costs(fields_of, steps, args.repeats)
    import mlx.core as mx
    import mlx_lm

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the "
        f"end), mlx {mx.__version__} ({mx.default_device()}), mlx-lm {mlx_lm.__version__}, "
        f"Python {platform.python_version()}",
        "command": f"`python benchmarks/sampling_cost.py{' --quick' if args.quick else ''}`",
        "model": MODEL,
        "prompt": PROMPT,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "batches": list(BATCHES),
        "cases": fields_of,
        "results": summary(cells),
        "processing_steps": steps,
        "processing_repeats": args.repeats,
        "processing": processing,
        "wall_s": time.perf_counter() - started,
    }
    table = render(report)
    print(table)
    write_atomically(args.out / "sampling_cost.json", json.dumps(report, indent=2) + "\n")
    write_atomically(args.out / "sampling_cost.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
