"""Benchmark suite: one stream, many clients, model loads, status latency; against mlx-lm and mlx_lm.server."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the live-server harness lives with the tests

from engine_vs_direct import (  # noqa: E402  (this folder is on sys.path when run as a script)
    PROMPT,
    RANDOM_100M,
    RANDOM_SMALL,
    Sample,
    ensure_model,
    write_atomically,
)

from mlx_jupyter import sse  # noqa: E402
from mlx_jupyter.engine import WorkerManager  # noqa: E402
from mlx_jupyter.engine.errors import ModelNotFoundError  # noqa: E402
from mlx_jupyter.engine.models import ModelResolver, cache_dir  # noqa: E402
from tests.helpers import pid_alive, wait_for  # noqa: E402
from tests.live_server import LiveServer, free_port  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("direct", "engine", "rest", "openai", "mlx_lm.server")
CLIENTS = (1, 4, 8)
TRAINED = "builtin:pydoc"


@dataclass
class ModelReport:
    """Everything measured on one model; lists hold one value per measured run."""

    model: str
    path: Path
    single: dict[str, list[Sample]] = field(default_factory=lambda: {k: [] for k in PATHS})
    aggregate: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    loads: dict[str, list[float]] = field(default_factory=dict)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)


# -- HTTP clients -----------------------------------------------------------------


def post_events(client: httpx.Client, path: str, body: dict[str, Any]) -> Iterator[tuple[float, dict[str, Any]]]:
    """(arrival time, data object) for each Server-Sent Event of a POST, OpenAI's ``[DONE]`` left out."""
    with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"POST {path} -> {response.status_code}: {response.read()!r}")
        for event in sse.events(response):
            if event.data != sse.DONE:
                yield time.perf_counter(), event.json()


def timed_stream(events: Iterator[tuple[float, dict[str, Any]]], text_of: Callable[[dict], str]) -> Sample:
    """A Sample from an SSE stream whose last event carries OpenAI-style ``usage``."""
    start = time.perf_counter()
    first = end = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    for at, event in events:
        text = text_of(event)
        if text and first is None:
            first = at
        parts.append(text)
        usage = event.get("usage") or usage
        end = at
    assert first is not None and end is not None and usage, "the stream gave no text or no usage"
    return Sample(
        ttft_s=first - start,
        decode_s=max(end - first, 1e-6),  # a tiny model's whole answer may arrive in one read
        total_s=end - start,
        tokens=usage["completion_tokens"],
        prompt_tokens=usage["prompt_tokens"],
        text="".join(parts),
        inner_tps=float("nan"),
    )


def _choice_text(event: dict[str, Any]) -> str:
    return "".join(c.get("text") or "" for c in event.get("choices") or [])


def run_direct(model: Any, tokenizer: Any, prompt: str, max_tokens: int) -> Sample:
    """mlx-lm in this process, with the worker's sampler settings."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    def events() -> Iterator[tuple[float, dict[str, Any]]]:
        sampler = make_sampler(temp=0.0, top_p=1.0)
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler):
            usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generation_tokens}
            yield time.perf_counter(), {"text": r.text, "usage": usage if r.finish_reason else None}

    return timed_stream(events(), lambda e: e["text"])


def run_engine(manager: WorkerManager, model: str, prompt: str, max_tokens: int) -> Sample:
    def events() -> Iterator[tuple[float, dict[str, Any]]]:
        for chunk in manager.stream_generate(prompt, model=model, max_tokens=max_tokens, temperature=0.0):
            yield time.perf_counter(), {"text": chunk.text, "usage": chunk.usage}

    return timed_stream(events(), lambda e: e["text"])


def run_rest(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    return timed_stream(post_events(client, "mlx/api/generate", body), lambda e: e.get("text") or "")


def openai_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def run_openai(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> Sample:
    return timed_stream(post_events(client, "mlx/v1/completions", openai_body(model, prompt, max_tokens)), _choice_text)


class PeerServer:
    """``mlx_lm.server`` serving one model folder on a loopback port."""

    def __init__(self, path: Path, log_dir: Path) -> None:
        self.path = path
        port = free_port()
        self.log = open(log_dir / f"mlx_lm-server-{port}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(path), "--host", "127.0.0.1", f"--port={port}"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=300, limits=_LIMITS)
        if not wait_for(self._ready, timeout=120, interval=0.2) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"mlx_lm.server did not start; see {self.log.name}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            return True
        try:
            return self.client.get("v1/models").status_code == 200
        except httpx.TransportError:
            return False

    def run(self, prompt: str, max_tokens: int) -> Sample:
        events = post_events(self.client, "v1/completions", openai_body("default_model", prompt, max_tokens))
        return timed_stream(events, _choice_text)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=64)


# -- measurements --------------------------------------------------------------------


def bench_single(report: ModelReport, paths: dict[str, Callable[[str], Sample]], runs: int) -> None:
    """Warm each path up once, then run them in a rotating order so all see the same noise.

    Each round has its own prompt, the same for every path, so that no path's prompt
    cache (mlx_lm.server keeps one) skips the prefill the others do.
    """
    names = list(paths)
    for name in names:
        paths[name](f"[warm-up] {PROMPT}")
    for i in range(runs):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            report.single[name].append(paths[name](f"[{i}] {PROMPT}"))
        line = ", ".join(f"{n} {report.single[n][-1].tps:.0f}" for n in names)
        print(f"{report.model}: single stream round {i + 1}/{runs}: tok/s {line}", file=sys.stderr)


def concurrent(run: Callable[[int], Sample], clients: int) -> float:
    """Aggregate completion tokens/s of ``clients`` simultaneous streams, first request to last token."""
    samples: list[Sample | BaseException] = []
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait(60)
        try:
            samples.append(run(i))
        except BaseException as exc:  # re-raised below, in the measuring thread
            samples.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - start
    errors = [s for s in samples if isinstance(s, BaseException)]
    if errors or len(samples) != clients:
        raise RuntimeError(f"{len(errors)} of {clients} clients failed: {errors[:1]!r}")
    return sum(s.tokens for s in samples) / wall  # type: ignore[union-attr]


def bench_aggregate(report: ModelReport, live: LiveServer, peer: PeerServer, runs: int, max_tokens: int) -> None:
    # A prompt that differs from its first token per client and round: mlx_lm.server's
    # prompt cache would otherwise skip most of the prefill of every prompt but the first.
    def ours(r: int) -> Callable[[int], Sample]:
        return lambda i: run_openai(live.client, report.model, f"[{r}.{i}] {PROMPT}", max_tokens)

    def theirs(r: int) -> Callable[[int], Sample]:
        return lambda i: peer.run(f"[{r}.{i}] {PROMPT}", max_tokens)

    for clients in CLIENTS:
        for r in range(runs):
            pair = [("ours", ours), ("mlx_lm.server", theirs)]
            for name, make in pair if r % 2 == 0 else reversed(pair):
                report.aggregate.setdefault((name, clients), []).append(concurrent(make(r), clients))
            print(
                f"{report.model}: {clients} clients round {r + 1}/{runs}: ours "
                f"{report.aggregate['ours', clients][-1]:.0f}, mlx_lm.server "
                f"{report.aggregate['mlx_lm.server', clients][-1]:.0f} tok/s",
                file=sys.stderr,
            )


def bench_loads(report: ModelReport, other: str, model_dirs: list[str], runs: int) -> None:
    """mlx_lm.load itself, engine loads cold and with the warm spare, switching, unload to memory free."""
    from mlx_lm import load

    def add(name: str, seconds: float) -> None:
        report.loads.setdefault(name, []).append(seconds)

    for _ in range(runs):
        start = time.perf_counter()
        model, tokenizer = load(str(report.path))
        add("mlx_lm.load (in process)", time.perf_counter() - start)
        del model, tokenizer
    for spare in (False, True):
        with WorkerManager(model_dirs=model_dirs, idle_timeout=0, warm_spare=spare) as manager:
            for _ in range(runs):
                if spare:
                    wait_for(lambda m=manager: m.spare_pid is not None, timeout=60)
                start = time.perf_counter()
                pid = manager.load(report.model).pid
                add("engine load, with spare" if spare else "engine load, cold", time.perf_counter() - start)
                start = time.perf_counter()
                manager.unload(report.model)
                wait_for(lambda p=pid: not _rss_bytes(p), timeout=30, interval=0.002)
                add("unload until the worker's RSS is gone", time.perf_counter() - start)
    with WorkerManager(model_dirs=model_dirs, idle_timeout=0, max_loaded_models=1) as manager:
        manager.load(other)
        for _ in range(runs):
            for target in (report.model, other):
                wait_for(lambda m=manager: m.spare_pid is not None, timeout=60)
                start = time.perf_counter()
                manager.load(target)
                if target == report.model:
                    add("switch from the other model (evict + load)", time.perf_counter() - start)


def _rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid``, 0 once it has exited (a zombie holds no memory)."""
    if not pid_alive(pid):
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def bench_status_latency(report: ModelReport, live: LiveServer, samples: int, max_tokens: int) -> None:
    """GET health and models while 8 streams run; only samples taken while all 8 still run count."""
    streaming, done = threading.Event(), threading.Event()
    running = [0]
    lock = threading.Lock()

    def stream(i: int) -> None:
        body = {"model": report.model, "prompt": f"{PROMPT} <{i}>", "max_tokens": max_tokens, "stream": True}
        events = post_events(live.client, "mlx/api/generate", body)
        next(events)
        with lock:
            running[0] += 1
            if running[0] == 8:
                streaming.set()
        try:
            for _ in events:
                if done.is_set():
                    break  # closing the response cancels the generation
        finally:
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    if not streaming.wait(120):
        raise RuntimeError("the 8 streams did not all start")
    for i in range(samples):
        for name, path in (("health", "mlx/api/health"), ("models", "mlx/api/models")):
            start = time.perf_counter()
            response = live.client.get(path)
            elapsed = 1000 * (time.perf_counter() - start)
            response.raise_for_status()
            if running[0] == 8:
                report.latency_ms.setdefault(name, []).append(elapsed)
        time.sleep(0.02 if i % 2 else 0.005)  # not in lock-step with the token rhythm
    done.set()
    for t in threads:
        t.join(600)


# -- the report ---------------------------------------------------------------------


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _paired_ratio(report: ModelReport, name: str) -> float:
    return _med([s.tps / d.tps for d, s in zip(report.single["direct"], report.single[name], strict=True)])


def _ttft_overhead_ms(report: ModelReport, name: str) -> float:
    pairs = zip(report.single["direct"], report.single[name], strict=True)
    return _med([1000 * (s.ttft_s - d.ttft_s) for d, s in pairs])


def render(reports: list[ModelReport], args: argparse.Namespace, notes: list[str], wall_s: float) -> str:
    import mlx.core as mx
    import mlx_lm

    load = os.getloadavg()
    lines = [
        "# mlx-jupyter benchmarks",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.platform()}, {os.cpu_count()} CPUs (load average "
        f"{load[0]:.1f} at the end), mlx {mx.__version__} ({mx.default_device()}), mlx-lm {mlx_lm.__version__}, "
        f"Python {platform.python_version()}. Command: `python benchmarks/run_all.py"
        f"{' --quick' if args.quick else ''}`; whole run {wall_s:.0f} s.",
        f"Greedy decoding of {PROMPT!r} behind a tag that differs per round and client; {args.runs} "
        f"measured run(s) per cell after a warm-up ({args.agg_runs} "
        "per client count), paths and servers interleaved; every figure is a median.",
        *notes,
        "",
        "## Single stream",
        "",
        f"max_tokens {args.tokens}. tok/s = completion tokens / (last event - first event with text), as the "
        "client sees it; TTFT = request sent -> first text. Ratios and TTFT overheads are medians of per-round "
        "pairs against direct `mlx_lm.stream_generate` in the benchmark process.",
        "",
        "| model | path | tok/s | x direct | TTFT ms | TTFT overhead ms | completion tokens |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for r in reports:
        for name in PATHS:
            samples = r.single[name]
            lines.append(
                f"| {r.model} | {name} | {_med([s.tps for s in samples]):.1f} | {_paired_ratio(r, name):.3f} "
                f"| {_med([1000 * s.ttft_s for s in samples]):.1f} | {_ttft_overhead_ms(r, name):+.1f} "
                f"| {'/'.join(sorted({str(s.tokens) for s in samples}))} |"
            )
    lines += [
        "",
        "## Concurrent clients",
        "",
        f"Each client streams one `/v1/completions` answer of {args.agg_tokens} tokens (its own prompt); aggregate "
        "= all completion tokens / (first request -> last token). Ours is the OpenAI endpoint of the Jupyter "
        "server extension.",
        "",
        "| model | clients | ours tok/s | mlx_lm.server tok/s | ours / mlx_lm.server | ours / our 1 client |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in reports:
        solo = _med(r.aggregate["ours", 1])
        for n in CLIENTS:
            ours, theirs = _med(r.aggregate["ours", n]), _med(r.aggregate["mlx_lm.server", n])
            lines.append(f"| {r.model} | {n} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} | {ours / solo:.2f} |")
    lines += [
        "",
        "## Model loads",
        "",
        "Seconds, as the caller of `WorkerManager.load` / `unload` sees them. Cold = a new worker process "
        "(Python start, mlx import, load); with spare = a warm spare worker adopts the model; switch = loading "
        "this model into the only slot held by the other one (evicting it); unload = `unload()` call until the "
        "worker's RSS is gone from /proc.",
        "",
        "| model | " + " | ".join(reports[0].loads) + " |",
        "|---|" + "--:|" * len(reports[0].loads),
    ]
    for r in reports:
        lines.append(f"| {r.model} | " + " | ".join(f"{_med(v):.3f}" for v in r.loads.values()) + " |")
    lines += [
        "",
        "## Status endpoints under load",
        "",
        "Milliseconds per GET while 8 REST streams run on the model (the samples taken while all 8 ran).",
        "",
        "| model | endpoint | samples | p50 ms | p99 ms |",
        "|---|---|--:|--:|--:|",
    ]
    for r in reports:
        for name, values in r.latency_ms.items():
            lines.append(f"| {r.model} | mlx/api/{name} | {len(values)} | {_med(values):.1f} | {_p99(values):.1f} |")
    lines += ["", "## Targets", "", *targets(reports), ""]
    return "\n".join(lines)


def targets(reports: list[ModelReport]) -> list[str]:
    """One line per target of the issue, judged on the largest model measured."""
    r = reports[-1]
    rest_ratio, ttft = _paired_ratio(r, "rest"), _ttft_overhead_ms(r, "rest")
    eight, peer = _med(r.aggregate["ours", 8]), _med(r.aggregate["mlx_lm.server", 8])
    solo = _med(r.aggregate["ours", 1])
    p99 = max(_p99(v) for v in r.latency_ms.values())

    def verdict(ok: bool) -> str:
        return "reached" if ok else "NOT reached"

    return [
        f"On {r.model}:",
        f"- single-stream REST >= 0.95 x direct tok/s: {verdict(rest_ratio >= 0.95)} ({rest_ratio:.3f})",
        f"- TTFT overhead <= 10 ms p50 (REST vs direct): {verdict(ttft <= 10)} ({ttft:+.1f} ms)",
        f"- 8 clients >= 1.0 x mlx_lm.server: {verdict(eight >= peer)} ({eight / peer:.2f})",
        f"- 8 clients >= 2.5 x our single stream: {verdict(eight >= 2.5 * solo)} ({eight / solo:.2f})",
        f"- status endpoints p99 <= 20 ms under load: {verdict(p99 <= 20)} ({p99:.1f} ms)",
    ]


def plot(reports: list[ModelReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(12, 4 * len(reports)), squeeze=False)
    for row, r in zip(axes, reports, strict=True):
        single = [_med([s.tps for s in r.single[n]]) for n in PATHS]
        row[0].bar(PATHS, single, color=["#777", "#1f77b4", "#1f77b4", "#1f77b4", "#d62728"])
        row[0].set_title(f"{r.model}: single stream")
        row[0].set_ylabel("tokens/s")
        row[0].tick_params(axis="x", labelrotation=20)
        for name, color in (("ours", "#1f77b4"), ("mlx_lm.server", "#d62728")):
            row[1].plot(CLIENTS, [_med(r.aggregate[name, n]) for n in CLIENTS], "o-", color=color, label=name)
        row[1].set_title(f"{r.model}: aggregate over concurrent clients")
        row[1].set_xlabel("clients")
        row[1].set_ylabel("tokens/s")
        row[1].set_xticks(CLIENTS)
        row[1].set_ylim(bottom=0)
        row[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- driver -------------------------------------------------------------------------


def pick_models(quick: bool) -> tuple[list[tuple[str, Path]], list[str]]:
    """The trained built-in model (or the tiny one where it is missing) and the generated one."""
    resolver = ModelResolver()
    notes = []
    try:
        trained = resolver.resolve(TRAINED)
    except ModelNotFoundError:
        trained = resolver.resolve("builtin:tiny")
        notes.append(f"{TRAINED} is not available in this checkout: builtin:tiny stands in for it.")
    if quick:
        return [(trained.id, Path(trained.path))], ["--quick: one small model, one run, few tokens.", *notes]
    big = ensure_model(RANDOM_100M)
    return [(trained.id, Path(trained.path)), (RANDOM_100M.name, big)], notes


def bench_model(
    model: str, path: Path, other: str, args: argparse.Namespace, manager: WorkerManager, live: LiveServer, tmp: Path
) -> ModelReport:
    from mlx_lm import load

    report = ModelReport(model, path)
    direct = list(load(str(path)))  # model and tokenizer, freed once the single-stream runs are done
    manager.load(model)
    peer = PeerServer(path, tmp)
    try:
        n = args.tokens
        bench_single(
            report,
            {
                "direct": lambda prompt: run_direct(*direct, prompt, n),
                "engine": lambda prompt: run_engine(manager, model, prompt, n),
                "rest": lambda prompt: run_rest(live.client, model, prompt, n),
                "openai": lambda prompt: run_openai(live.client, model, prompt, n),
                "mlx_lm.server": lambda prompt: peer.run(prompt, n),
            },
            args.runs,
        )
        direct.clear()
        manager.unload(model)  # its worker would only take memory from here on
        bench_aggregate(report, live, peer, args.agg_runs, args.agg_tokens)
    finally:
        peer.stop()
    bench_status_latency(report, live, args.latency_samples, args.latency_tokens)
    bench_loads(report, other, [str(cache_dir() / "bench")], args.runs)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one small model, one run, few tokens (for CI)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for run_all.md and run_all.png ({RESULTS})")
    args = parser.parse_args(argv)
    args.runs = 1 if args.quick else 3
    args.agg_runs = 1 if args.quick else 2
    args.tokens = 16 if args.quick else 64
    args.agg_tokens = 16 if args.quick else 32
    args.latency_samples = 10 if args.quick else 150
    # Long enough that no stream ends before all 8 run (they are closed once sampled), and
    # within builtin:pydoc's 512-token context, which bounds max_tokens.
    args.latency_tokens = 500
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    models, notes = pick_models(args.quick)
    other = "builtin:tiny" if models[0][0] != "builtin:tiny" else RANDOM_SMALL.name
    if other == RANDOM_SMALL.name:
        ensure_model(RANDOM_SMALL)
    reports = []
    with tempfile.TemporaryDirectory(prefix="mlx-bench-") as tmp_name:
        tmp = Path(tmp_name)
        live = LiveServer(tmp, cache_dir() / "bench", idle_timeout=0, max_loaded_models=1, queue_timeout=300)
        # On a loaded CPU, 8 prompts prefilled together can keep a stream silent for a minute.
        live.client.timeout = httpx.Timeout(600)
        try:
            with WorkerManager(model_dirs=[str(cache_dir() / "bench")], idle_timeout=0, max_loaded_models=1) as manager:
                for model, path in models:
                    reports.append(bench_model(model, path, other, args, manager, live, tmp))
        finally:
            live.stop()
    report = render(reports, args, notes, time.perf_counter() - started)
    print(report)
    write_atomically(args.out / "run_all.md", report)
    plot(reports, args.out / "run_all.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
