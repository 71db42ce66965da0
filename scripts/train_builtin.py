"""Train the built-in model ``builtin:pydoc``: a small llama on CPython's own documentation.

Deterministic: fixed seeds, a fixed data order and a fixed held-out split; the Python
version the text came from and every hyperparameter go into ``training.json`` and the
model card. Regenerate the shipped model with::

    .venv/bin/python scripts/train_builtin.py --out mlx_jupyter/builtin_models/pydoc
"""

from __future__ import annotations

import argparse
import ctypes.util
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.llama import Model, ModelArgs

from mlx_jupyter.builtin_models import PACKAGED_MODELS
from mlx_jupyter.builtin_models.builder import EOS, llama_config, train_bpe_tokenizer, write_model_files

# Every HELD_OUT_EVERY-th topic (sorted by name, starting at HELD_OUT_FIRST) is held out.
HELD_OUT_EVERY = 16
HELD_OUT_FIRST = 7
SAMPLE_PROMPTS = ["The for statement", "The with statement", "A list is", "An exception is", "The import statement"]
BLAS_ENV = "MLX_JUPYTER_TRAIN_BLAS"


@dataclass(frozen=True)
class Recipe:
    """Every choice that shapes the weights."""

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 704
    context: int = 512
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 400
    warmup_steps: int = 30
    learning_rate: float = 2e-3
    final_learning_rate: float = 2e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_windows: int = 32


# A recipe small enough for CI to prove the script runs end to end in seconds.
QUICK = Recipe(
    vocab_size=320,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    seq_len=32,
    batch_size=4,
    steps=5,
    warmup_steps=2,
    eval_every=5,
    eval_windows=4,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGED_MODELS / "pydoc", help="model folder (replaced)")
    parser.add_argument("--quick", action="store_true", help="a tiny recipe that only proves the script runs")
    parser.add_argument("--steps", type=int, help="override the recipe's number of training steps")
    args = parser.parse_args(argv)
    recipe = QUICK if args.quick else Recipe()
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps, eval_every=min(recipe.eval_every, args.steps))
    train(recipe, args.out)


def train(recipe: Recipe, out: Path) -> dict[str, Any]:
    """Train ``recipe`` on pydoc_data.topics and write a loadable model folder to ``out``."""
    mx.set_default_device(mx.cpu)
    mx.random.seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    started = time.monotonic()
    # The machine may be shared: the load average puts the training time in context.
    load_at_start = os.getloadavg()[0]

    train_texts, held_texts, held_names = _split_topics()
    tokenizer = train_bpe_tokenizer(train_texts + held_texts, recipe.vocab_size)
    eos = tokenizer.token_to_id(EOS)
    train_ids = _token_stream(tokenizer, train_texts, eos)
    held_ids = _token_stream(tokenizer, held_texts, eos)
    print(f"data: {len(train_ids)} train tokens, {len(held_ids)} held-out tokens ({', '.join(held_names)})", flush=True)

    config = llama_config(
        tokenizer,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        intermediate_size=recipe.intermediate_size,
        context=recipe.context,
        dtype="float16",
    )
    # It continues text: %%mlx sends it raw prompts (its chat template only lets chat endpoints accept it).
    config["completion_model"] = True
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {n_params} parameters", flush=True)

    optimizer = make_optimizer(recipe)
    loss_and_grad = nn.value_and_grad(model, _loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x: mx.array, y: mx.array) -> mx.array:
        loss, grads = loss_and_grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, recipe.grad_clip)
        optimizer.update(model, grads)
        return loss

    held_x, held_y = _eval_windows(held_ids, recipe.seq_len, recipe.eval_windows)
    history: list[dict[str, float]] = []
    recent: list[float] = []
    for i in range(1, recipe.steps + 1):
        x, y = _batch(train_ids, rng, recipe.batch_size, recipe.seq_len)
        loss = step(x, y)
        mx.eval(state)
        recent.append(loss.item())
        if i % recipe.eval_every == 0 or i == recipe.steps:
            held = _loss(model, held_x, held_y).item()
            entry = {"step": i, "train_loss": float(np.mean(recent)), "held_out_loss": held}
            history.append(entry)
            recent = []
            elapsed = time.monotonic() - started
            losses = f"train {entry['train_loss']:.3f}, held-out {held:.3f}"
            print(f"step {i}/{recipe.steps}: {losses}, {elapsed:.0f}s", flush=True)
    train_s = time.monotonic() - started

    info = {
        "recipe": asdict(recipe),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": importlib.metadata.version("mlx-lm"),
        "data": {
            "source": "pydoc_data.topics",
            "topics": len(train_texts) + len(held_texts),
            "chars": sum(map(len, train_texts + held_texts)),
            "train_tokens": len(train_ids),
            "held_out_tokens": len(held_ids),
            "held_out_topics": held_names,
            "held_out_windows": held_x.shape[0],
        },
        "parameters": int(n_params),
        "history": history,
        "train_seconds": round(train_s, 1),
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs, BLAS: {os.environ.get(BLAS_ENV, 'bundled')}",
        "load_average": [round(load_at_start, 1), round(os.getloadavg()[0], 1)],
    }
    write_folder(out, model, tokenizer, config, info, _greedy_samples, _model_card)
    print(f"wrote {out} in {time.monotonic() - started:.0f}s", flush=True)
    return info


def make_optimizer(recipe: Recipe) -> optim.Optimizer:
    """AdamW with a linear warm-up to the recipe's learning rate, then cosine decay."""
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(0.0, recipe.learning_rate, recipe.warmup_steps),
            optim.cosine_decay(
                recipe.learning_rate, max(1, recipe.steps - recipe.warmup_steps), recipe.final_learning_rate
            ),
        ],
        [recipe.warmup_steps],
    )
    return optim.AdamW(learning_rate=schedule, weight_decay=recipe.weight_decay)


def held_out_topic_names() -> list[str]:
    """The topics no built-in model trains on: every HELD_OUT_EVERY-th by sorted name."""
    from pydoc_data.topics import topics

    return [n for k, n in enumerate(sorted(topics)) if k % HELD_OUT_EVERY == HELD_OUT_FIRST]


def _split_topics() -> tuple[list[str], list[str], list[str]]:
    from pydoc_data.topics import topics

    held = held_out_topic_names()
    train = [n for n in sorted(topics) if n not in held]
    return [topics[n] for n in train], [topics[n] for n in held], held


def _token_stream(tokenizer: Any, texts: list[str], eos: int) -> np.ndarray:
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.int32)


def _batch(ids: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int) -> tuple[mx.array, mx.array]:
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch)
    windows = np.stack([ids[s : s + seq_len + 1] for s in starts])
    return mx.array(windows[:, :-1]), mx.array(windows[:, 1:])


def _eval_windows(ids: np.ndarray, seq_len: int, count: int) -> tuple[mx.array, mx.array]:
    """Consecutive non-overlapping windows from the start of the held-out text."""
    count = min(count, (len(ids) - 1) // seq_len)
    windows = np.stack([ids[k * seq_len : (k + 1) * seq_len + 1] for k in range(count)])
    return mx.array(windows[:, :-1]), mx.array(windows[:, 1:])


def _loss(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def write_folder(
    out: Path,
    model: nn.Module,
    tokenizer: Any,
    config: dict[str, Any],
    info: dict[str, Any],
    samples: Callable[[Path], dict[str, Any]],
    card: Callable[[dict[str, Any], Path], str],
    chat_template: str | None = None,
) -> None:
    """Write the model to a fresh folder beside ``out``, sample it through mlx-lm, then swap it in.

    ``samples`` reads the written folder and its result goes into ``info["samples"]``;
    ``card`` turns ``info`` into the MODEL_CARD.md text.
    """
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        weights = dict(tree_flatten(tree_map(lambda p: p.astype(mx.float16), model.parameters())))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_model_files(tmp, tokenizer, config, chat_template)
        info["samples"] = samples(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / "MODEL_CARD.md").write_text(card(info, tmp), encoding="utf-8")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _greedy_samples(folder: Path, max_tokens: int = 40) -> dict[str, str]:
    """Greedy continuations from the saved float16 files, loaded the way the engine loads them."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(folder))
    return {p: mlx_lm.generate(model, tokenizer, p, max_tokens=max_tokens) for p in SAMPLE_PROMPTS}


def _model_card(info: dict[str, Any], folder: Path) -> str:
    template = (Path(__file__).parent / "builtin_model_card.md").read_text(encoding="utf-8")
    recipe = info["recipe"]
    samples = "\n\n".join(f"```text\n{p}{t}\n```" for p, t in info["samples"].items())
    return template.format(
        **card_fields(info, folder),
        held_out_names=", ".join(info["data"]["held_out_topics"]),
        tokens_seen=f"{recipe['steps'] * recipe['batch_size'] * recipe['seq_len']:,}",
        samples=samples,
    )


def card_fields(info: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What every built-in model's card says of its run, from its ``training.json`` record."""
    recipe, final = info["recipe"], info["history"][-1]
    return {
        **info["data"],
        "python": info["python"],
        "mlx": info["mlx"],
        "mlx_lm": info["mlx_lm"],
        "load_start": info["load_average"][0],
        "load_end": info["load_average"][1],
        "parameters": f"{info['parameters']:,}",
        "size_mb": f"{(folder / 'model.safetensors').stat().st_size / 1e6:.1f}",
        "hardware": info["hardware"],
        "train_minutes": f"{info['train_seconds'] / 60:.1f}",
        "train_loss": f"{final['train_loss']:.2f}",
        "held_out_loss": f"{final['held_out_loss']:.2f}",
        "recipe": json.dumps(recipe, indent=2),
        **{f"r_{k}": v for k, v in recipe.items()},
    }


def use_fast_blas() -> None:
    """Re-run under OpenBLAS on Linux when it is installed.

    The Linux ``mlx[cpu]`` wheel bundles the reference BLAS, about 20x slower at
    matrix products than OpenBLAS; preloading OpenBLAS makes mlx's ``cblas_sgemm``
    calls land there, which turns an hour of training into minutes.
    """
    if sys.platform != "linux" or BLAS_ENV in os.environ:
        return
    found = ctypes.util.find_library("openblas")
    if not found:
        print("OpenBLAS not found (apt-get install libopenblas0-pthread): training will be slow", flush=True)
        os.environ[BLAS_ENV] = "bundled"
        return
    preload = " ".join(filter(None, [found, os.environ.get("LD_PRELOAD")]))
    os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, LD_PRELOAD=preload, **{BLAS_ENV: found}))


if __name__ == "__main__":
    use_fast_blas()
    main()
