"""Train the built-in model ``builtin:pydoc-chat``: builtin:pydoc taught to answer questions about Python.

Question/answer pairs come from text that ships with Python: the opening of each
``pydoc_data.topics`` topic ("Explain the `with` statement.") and the first paragraph of
the docstrings of common standard-library functions, classes and methods ("What does
`itertools.chain` do?"), asked in several phrasings. Training starts from builtin:pydoc's
weights and tokenizer and counts the loss on the answers only; every answer ends with the
end-of-text token, so generation stops. Deterministic like ``train_builtin.py`` (whose
pieces it shares): fixed seeds, data order and held-out set. Regenerate the shipped model with::

    .venv/bin/python scripts/train_builtin_chat.py --out mlx_jupyter/builtin_models/pydoc-chat
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import jinja2
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from tokenizers import Tokenizer
from train_builtin import (
    BLAS_ENV,
    HELD_OUT_EVERY,
    Recipe,
    card_fields,
    held_out_topic_names,
    make_optimizer,
    use_fast_blas,
    write_folder,
)

from mlx_jupyter.builtin_models import PACKAGED_MODELS
from mlx_jupyter.builtin_models.builder import CHAT_TEMPLATE_EOS_ANSWERS, EOS

# The standard-library modules whose public functions, classes and methods become questions.
MODULES = (
    *("builtins", "abc", "argparse", "array", "asyncio", "base64", "bisect", "calendar", "collections"),
    *("contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fnmatch"),
    *("fractions", "functools", "glob", "gzip", "hashlib", "heapq", "html", "inspect", "io", "itertools"),
    *("json", "logging", "math", "operator", "os", "os.path", "pathlib", "pickle", "platform", "pprint"),
    *("queue", "random", "re", "secrets", "shlex", "shutil", "socket", "sqlite3", "statistics", "string"),
    *("struct", "subprocess", "sys", "tempfile", "textwrap", "threading", "time", "traceback", "types"),
    *("typing", "unicodedata", "urllib.parse", "uuid", "warnings", "weakref", "zipfile"),
)
# Every HELD_OUT_EVERY-th documented name, sorted, from HELD_OUT_NAME_FIRST on, is held out.
HELD_OUT_NAME_FIRST = 5
NAME_QUESTIONS = (
    "What does `{name}` do?",
    "Explain `{name}`.",
    "What is `{name}` for?",
    "Describe `{name}` in Python.",
    "How does `{name}` work?",
)
TOPIC_QUESTIONS = (
    "Explain {subject}.",
    "What is {subject}?",
    "Tell me about {subject}.",
    "How does {subject} work in Python?",
    "Describe {subject}.",
)
SELF_QUESTIONS = (
    "What can you answer?",
    "What can I ask you?",
    "What are you?",
    "Who are you?",
    "What do you know?",
    "Hello!",
    "Help",
    "What kind of questions do you answer?",
)
SELF_ANSWER = (
    "I am builtin:pydoc-chat, a small language model trained on the documentation that ships "
    "with Python. I answer short questions about Python: ask what a function of the standard "
    "library does, such as `itertools.chain` or `os.path.join`, or ask me to explain a statement "
    "or part of the language, such as the `with` statement. My answers are often wrong: check them "
    "in the Python documentation."
)
SYSTEM_PROMPTS = (None, "You answer questions about Python.", "You are a helpful assistant.")
ANSWER_CHARS = 320  # answers are cut at a sentence end within this many characters
EVAL_QUESTIONS = 60  # per set: held-out names, held-out topics, seen names, seen topics
EVAL_MAX_TOKENS = 96
SAMPLES_SHOWN = 5


@dataclass(frozen=True)
class ChatRecipe(Recipe):
    """builtin:pydoc's architecture; the steps, rows and learning rate of the question training."""

    seq_len: int = 256  # a row packs whole examples up to this many tokens
    batch_size: int = 8
    steps: int = 650
    warmup_steps: int = 30
    learning_rate: float = 1e-3
    final_learning_rate: float = 1e-4
    eval_every: int = 50
    eval_windows: int = 64  # held-out examples whose answer loss is tracked


# A recipe that only proves the script runs: a few steps and a short evaluation.
QUICK = replace(ChatRecipe(), steps=3, warmup_steps=1, eval_every=3, eval_windows=8)


@dataclass(frozen=True)
class Pair:
    """One question/answer pair; ``key`` names what it asks about (a dotted name, a topic, "self")."""

    key: str
    kind: str  # "name", "topic" or "self"
    questions: tuple[str, ...]
    answer: str


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGED_MODELS / "pydoc-chat", help="model folder (replaced)")
    parser.add_argument("--base", type=Path, default=PACKAGED_MODELS / "pydoc", help="builtin:pydoc's folder")
    parser.add_argument("--quick", action="store_true", help="a few steps and a short evaluation")
    parser.add_argument("--steps", type=int, help="override the recipe's number of training steps")
    parser.add_argument("--eval-questions", type=int, default=EVAL_QUESTIONS, help="questions per evaluation set")
    args = parser.parse_args(argv)
    recipe = QUICK if args.quick else ChatRecipe()
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps, eval_every=min(recipe.eval_every, args.steps))
    train(recipe, args.base, args.out, 4 if args.quick else args.eval_questions)


def build_pairs() -> tuple[list[Pair], list[Pair]]:
    """Every pair, split into (train, held out); the same lists on every run of one Python version."""
    names = _name_pairs()
    held_names = {p.key for k, p in enumerate(names) if k % HELD_OUT_EVERY == HELD_OUT_NAME_FIRST}
    held_topics = set(held_out_topic_names())
    topics = _topic_pairs()
    held = [p for p in names if p.key in held_names] + [p for p in topics if p.key.split("#")[0] in held_topics]
    # Some topics repeat sections of others ("augassign" is one of "assignment"): held out means held out everywhere.
    held_answers = {p.answer for p in held}
    train = [p for p in names + topics if p.answer not in held_answers]
    train.append(Pair("self", "self", SELF_QUESTIONS, SELF_ANSWER))
    return train, held


def first_paragraph(doc: str) -> str:
    """A docstring's first prose paragraph on one line, without a leading call signature, cut short."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    # C functions open with their signature ("chain(*iterables) --> chain object").
    while paragraphs and re.match(r"^[\w.]+\(.*\)( *-+> *.*)?$", paragraphs[0]):
        paragraphs.pop(0)
    return _shorten(paragraphs[0]) if paragraphs else ""


def _shorten(text: str) -> str:
    if len(text) <= ANSWER_CHARS:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text[:ANSWER_CHARS])]
    return text[: ends[-1]] if ends else text[:ANSWER_CHARS].rsplit(" ", 1)[0] + " ..."


def _name_pairs() -> list[Pair]:
    found: dict[str, str] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for attr in sorted(set(public)):
            obj = getattr(module, attr, None)
            if not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            # Keep what the module defines, not what it imported from elsewhere.
            home = getattr(obj, "__module__", None)
            if module_name != "builtins" and home not in (module_name, module.__name__, "_" + module_name, "posix"):
                continue
            prefix = "" if module_name == "builtins" else module_name + "."
            _add(found, prefix + attr, obj)
            if inspect.isclass(obj):
                for method, value in sorted(vars(obj).items()):
                    if not method.startswith("_") and inspect.isroutine(value):
                        _add(found, f"{prefix}{attr}.{method}", value)
    # A docstring shared by many names (inherited boilerplate) says nothing about any of them.
    counts = Counter(found.values())
    return [
        Pair(name, "name", tuple(q.format(name=name) for q in NAME_QUESTIONS), answer)
        for name, answer in sorted(found.items())
        if counts[answer] <= 2
    ]


def _add(found: dict[str, str], name: str, obj: Any) -> None:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
    answer = first_paragraph(doc)
    if len(answer) >= 30 and name not in found:
        found[name] = answer


def _topic_pairs() -> list[Pair]:
    """A pair per topic and per titled section of a topic: its title asked about, its opening as the answer."""
    from pydoc_data.topics import topics

    pairs = []
    for name in sorted(topics):
        for k, (title, body) in enumerate(_sections(topics[name])):
            answer = _prose_opening(body)
            if answer:
                subject = _subject(title)
                pairs.append(
                    Pair(f"{name}#{k}", "topic", tuple(q.format(subject=subject) for q in TOPIC_QUESTIONS), answer)
                )
    return pairs


def _sections(text: str) -> list[tuple[str, str]]:
    """(title, body) for the topic and each of its sections, split on reST title underlines."""
    lines = text.splitlines()
    starts = [i - 1 for i in range(1, len(lines)) if re.fullmatch(r"([*=])\1{3,}", lines[i]) and lines[i - 1].strip()]
    ends = [*starts[1:], len(lines) + 1]
    return [(lines[s], "\n".join(lines[s + 2 : e])) for s, e in zip(starts, ends, strict=True)]


def _prose_opening(body: str) -> str:
    for paragraph in re.split(r"\n[ \t]*\n", body.strip("\n")):
        # Grammar, code, notes and source links are indented or marked; prose starts at the margin.
        if paragraph.strip() and not paragraph.startswith((" ", "**", "=", "New in", "Changed in", "Deprecated")):
            text = " ".join(paragraph.split())
            if len(text) >= 40:
                # An opening that introduces grammar or a list ends with a colon; as an answer it ends there.
                return _shorten(re.sub(r":$", ".", text))
    return ""


def _subject(title: str) -> str:
    subject = re.sub(r'"([^"]+)"', r"`\1`", title.strip())
    # "The `with` statement" -> "the `with` statement"; "Assignment statements" -> "assignment statements".
    if subject.startswith("The ") or (subject[1:2].islower() and not re.search(r"[A-Z]", subject[1:])):
        subject = subject[0].lower() + subject[1:]
    return subject


def render_prompt(template: jinja2.Template, question: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return template.render(messages=messages, add_generation_prompt=True)


def encode_example(tokenizer: Tokenizer, prompt: str, answer: str, eos: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + end-of-text, and the mask of the tokens the loss counts."""
    prompt_ids = tokenizer.encode(prompt).ids
    answer_ids = [*tokenizer.encode(answer).ids, eos]
    return prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids)


def pack_rows(examples: list[tuple[list[int], list[int]]], seq_len: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole examples packed in order into rows of ``seq_len + 1`` tokens, padded with masked end-of-text."""
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    mask: list[int] = []
    for e_ids, e_mask in examples:
        e_ids, e_mask = e_ids[: seq_len + 1], e_mask[: seq_len + 1]
        if len(ids) + len(e_ids) > seq_len + 1:
            rows.append((ids, mask))
            ids, mask = [], []
        ids, mask = ids + e_ids, mask + e_mask
    rows.append((ids, mask))
    pad = [(r + [eos] * (seq_len + 1 - len(r)), m + [0] * (seq_len + 1 - len(m))) for r, m in rows]
    return np.array([r for r, _ in pad], np.int32), np.array([m for _, m in pad], np.float32)


def train(recipe: ChatRecipe, base: Path, out: Path, eval_questions: int) -> dict[str, Any]:
    """Fine-tune builtin:pydoc (``base``) on the question/answer pairs and write ``out``."""
    mx.set_default_device(mx.cpu)
    mx.random.seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]

    train_pairs, held_pairs = build_pairs()
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS)
    template = jinja2.Template(CHAT_TEMPLATE_EOS_ANSWERS)
    config = json.loads((base / "config.json").read_text())
    config.pop("completion_model", None)  # builtin:pydoc's mark: this one answers chat messages
    model = Model(ModelArgs.from_dict(config))
    model.load_weights(str(base / "model.safetensors"))
    model.set_dtype(mx.float32)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"data: {len(train_pairs)} train pairs, {len(held_pairs)} held-out pairs; model: {n_params} parameters",
        flush=True,
    )

    held_eval = [held_pairs[k] for k in rng.permutation(len(held_pairs))[: recipe.eval_windows]]
    held_examples = [
        encode_example(tokenizer, render_prompt(template, p.questions[0], None), p.answer, eos) for p in held_eval
    ]
    held_x, held_y, held_m = _split_rows(*pack_rows(held_examples, recipe.seq_len, eos))
    optimizer = make_optimizer(recipe)
    loss_and_grad = nn.value_and_grad(model, _masked_loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x: mx.array, y: mx.array, m: mx.array) -> mx.array:
        loss, grads = loss_and_grad(model, x, y, m)
        grads, _ = optim.clip_grad_norm(grads, recipe.grad_clip)
        optimizer.update(model, grads)
        return loss

    rows = np.zeros((0, recipe.seq_len + 1), np.int32), np.zeros((0, recipe.seq_len + 1), np.float32)
    history: list[dict[str, float]] = []
    recent: list[float] = []
    epochs = 0
    examples_seen = 0
    for i in range(1, recipe.steps + 1):
        if len(rows[0]) < recipe.batch_size:
            epochs += 1
            packed = pack_rows(_one_pass(train_pairs, rng, tokenizer, template, eos), recipe.seq_len, eos)
            rows = np.concatenate([rows[0], packed[0]]), np.concatenate([rows[1], packed[1]])
        n = recipe.batch_size
        (batch_ids, batch_mask), rows = (rows[0][:n], rows[1][:n]), (rows[0][n:], rows[1][n:])
        examples_seen += int((batch_ids == eos).sum())
        loss = step(*_split_rows(batch_ids, batch_mask))
        mx.eval(state)
        recent.append(loss.item())
        if i % recipe.eval_every == 0 or i == recipe.steps:
            held = _masked_loss(model, held_x, held_y, held_m).item()
            entry = {"step": i, "train_loss": float(np.mean(recent)), "held_out_loss": held}
            history.append(entry)
            recent = []
            losses = f"train {entry['train_loss']:.3f}, held-out {held:.3f}"
            print(f"step {i}/{recipe.steps} (pass {epochs}): {losses}, {time.monotonic() - started:.0f}s", flush=True)
    train_s = time.monotonic() - started

    info = {
        "recipe": asdict(recipe),
        "base": {"model": "builtin:pydoc", "sha256": _sha256(base / "model.safetensors")},
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": importlib.metadata.version("mlx-lm"),
        "data": {
            "source": "pydoc_data.topics and standard-library docstrings",
            "modules": ", ".join(MODULES),
            "train_pairs": len(train_pairs),
            "held_out_pairs": len(held_pairs),
            "train_names": sum(p.kind == "name" for p in train_pairs),
            "train_topic_sections": sum(p.kind == "topic" for p in train_pairs),
            "held_out_names": sum(p.kind == "name" for p in held_pairs),
            "held_out_topic_sections": sum(p.kind == "topic" for p in held_pairs),
            "held_out_topics": held_out_topic_names(),
            "passes": epochs,
            "examples_seen": examples_seen,
        },
        "parameters": int(n_params),
        "history": history,
        "train_seconds": round(train_s, 1),
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs, BLAS: {os.environ.get(BLAS_ENV, 'bundled')}",
        "load_average": [round(load_at_start, 1), round(os.getloadavg()[0], 1)],
    }
    evaluate = partial(_evaluate, sets=_eval_sets(train_pairs, held_pairs, eval_questions))
    write_folder(out, model, tokenizer, config, info, evaluate, _model_card, CHAT_TEMPLATE_EOS_ANSWERS)
    print(f"wrote {out} in {time.monotonic() - started:.0f}s", flush=True)
    return info


def _one_pass(
    pairs: list[Pair], rng: np.random.Generator, tokenizer: Tokenizer, template: jinja2.Template, eos: int
) -> list[tuple[list[int], list[int]]]:
    """Every pair once, in a fresh order, each with a phrasing and a system prompt drawn at random."""
    examples = []
    for k in rng.permutation(len(pairs)):
        pair = pairs[k]
        question = pair.questions[rng.integers(len(pair.questions))]
        system = SYSTEM_PROMPTS[rng.integers(len(SYSTEM_PROMPTS))]
        examples.append(encode_example(tokenizer, render_prompt(template, question, system), pair.answer, eos))
    return examples


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _split_rows(ids: np.ndarray, mask: np.ndarray) -> tuple[mx.array, mx.array, mx.array]:
    return mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(mask[:, 1:])


def _masked_loss(model: nn.Module, x: mx.array, y: mx.array, m: mx.array) -> mx.array:
    losses = nn.losses.cross_entropy(model(x), y, reduction="none")
    return (losses * m).sum() / m.sum()


def _eval_sets(train_pairs: list[Pair], held_pairs: list[Pair], n: int) -> dict[str, list[Pair]]:
    """Fixed evaluation questions: every k-th pair of each kind, so each set spreads over the sorted names."""

    def spread(pairs: list[Pair]) -> list[Pair]:
        return pairs[:: max(1, len(pairs) // n)][:n]

    return {
        "held-out names": spread([p for p in held_pairs if p.kind == "name"]),
        "held-out topics": spread([p for p in held_pairs if p.kind == "topic"]),
        "seen names": spread([p for p in train_pairs if p.kind == "name"]),
        "seen topics": spread([p for p in train_pairs if p.kind == "topic"]),
    }


def word_f1(answer: str, reference: str) -> float:
    """Word-overlap F1 between two texts (lower-cased words, counted with multiplicity)."""
    a = Counter(re.findall(r"[a-z0-9_]+", answer.lower()))
    r = Counter(re.findall(r"[a-z0-9_]+", reference.lower()))
    common = sum((a & r).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def _evaluate(folder: Path, sets: dict[str, list[Pair]]) -> dict[str, Any]:
    """Greedy answers from the saved files, loaded the way the engine loads them, scored against the references."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(folder))

    def ask(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return mlx_lm.generate(model, tokenizer, prompt, max_tokens=EVAL_MAX_TOKENS)

    results: dict[str, Any] = {}
    for label, pairs in sets.items():
        rows = []
        for pair in pairs:
            answer = ask(pair.questions[0])
            f1 = word_f1(answer, pair.answer)
            rows.append({"question": pair.questions[0], "answer": answer, "reference": pair.answer, "f1": f1})
        results[label] = {"mean_f1": float(np.mean([r["f1"] for r in rows])) if rows else 0.0, "questions": rows}
    results["self"] = {"question": SELF_QUESTIONS[0], "answer": ask(SELF_QUESTIONS[0])}
    return results


def _model_card(info: dict[str, Any], folder: Path) -> str:
    template = (Path(__file__).parent / "builtin_chat_model_card.md").read_text(encoding="utf-8")
    first = info["history"][0]
    evaluation = info["samples"]
    sets = [k for k in evaluation if k != "self"]
    scores = "\n".join(f"| {k} | {len(evaluation[k]['questions'])} | {evaluation[k]['mean_f1']:.2f} |" for k in sets)
    samples = "\n\n".join(
        f"### {k}\n\n" + "\n\n".join(_sample(r) for r in evaluation[k]["questions"][:SAMPLES_SHOWN]) for k in sets
    )
    return template.format(
        **card_fields(info, folder),
        held_out_topic_names=", ".join(info["data"]["held_out_topics"]),
        base_sha=info["base"]["sha256"][:16],
        first_held_out_loss=f"{first['held_out_loss']:.2f}",
        scores=scores,
        eval_max_tokens=EVAL_MAX_TOKENS,
        samples=samples,
        self_question=evaluation["self"]["question"],
        self_answer=evaluation["self"]["answer"],
        self_reference=SELF_ANSWER,
        name_questions="; ".join(NAME_QUESTIONS),
        topic_questions="; ".join(TOPIC_QUESTIONS),
    )


def _sample(row: dict[str, Any]) -> str:
    answer = f"```text\n{row['answer']}\n```"
    reference = f"```text\n{row['reference']}\n```"
    return f"**Q:** {row['question']} (word F1 {row['f1']:.2f})\n\n{answer}\n\nReference:\n\n{reference}"


if __name__ == "__main__":
    use_fast_blas()
    main()
