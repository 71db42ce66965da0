"""Tests for the default model builtin:pydoc-chat: it answers questions about Python, and its training script."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_jupyter.builtin_models import PACKAGED_MODELS
from mlx_jupyter.engine import WorkerManager
from mlx_jupyter.engine.models import DEFAULT_MODEL, ModelResolver
from mlx_jupyter.server.app import MLXExtension
from tests.english import english_problems
from tests.helpers import child_pids, wait_for
from tests.models import PYDOC, PYDOC_CHAT, TINY

ROOT = Path(__file__).resolve().parent.parent
FOLDER = PACKAGED_MODELS / "pydoc-chat"
# Questions whose answers it was trained on.
SEEN = ["What can you answer?", "Explain the `with` statement.", "What does `os.path.join` do?"]
# Answers are a sentence or two, shorter than the prose the English check was written for; the
# model is small and often names things that do not exist, so a fifth of the words may be unknown.
MIN_WORDS = 4
KNOWN_SHARE = 0.8


def training() -> dict:
    return json.loads((FOLDER / "training.json").read_text())


def held_out_questions() -> list[str]:
    """Two questions about functions and one about a topic that training never saw, from the model card's sets."""
    sets = training()["samples"]
    return [q["question"] for q in sets["held-out names"]["questions"][:2] + sets["held-out topics"]["questions"][:1]]


@pytest.fixture(scope="module")
def manager():
    with WorkerManager(idle_timeout=0, queue_timeout=60, first_token_timeout=60, max_tokens_limit=4096) as m:
        yield m
    assert wait_for(lambda: not child_pids(), timeout=10), f"worker processes left behind: {child_pids()}"


def ask(manager: WorkerManager, question: str, **kwargs):
    return manager.generate(messages=[{"role": "user", "content": question}], max_tokens=160, **kwargs)


def test_pydoc_chat_is_the_default_model_of_the_engine_and_the_server() -> None:
    assert DEFAULT_MODEL == PYDOC_CHAT
    with WorkerManager() as manager:
        assert manager.default_model == DEFAULT_MODEL
    assert MLXExtension().default_model == DEFAULT_MODEL


@pytest.mark.parametrize("question", SEEN)
def test_a_request_naming_no_model_gets_an_english_answer_that_ends(manager, question) -> None:
    result = ask(manager, question)

    assert result.model == PYDOC_CHAT
    assert result.finish_reason == "stop", f"the answer did not end: {result.text!r}"
    assert english_problems(result.text, MIN_WORDS, KNOWN_SHARE) == [], result.text


def test_questions_held_out_of_training_get_english_answers_too(manager) -> None:
    for question in held_out_questions():
        result = ask(manager, question, model=PYDOC_CHAT)
        assert english_problems(result.text, MIN_WORDS, KNOWN_SHARE) == [], (question, result.text)


def test_the_english_check_rejects_random_weights_in_the_same_setting(manager) -> None:
    # The check must be able to fail: builtin:tiny asked the same questions does not pass it.
    for question in SEEN:
        assert english_problems(ask(manager, question, model=TINY).text, MIN_WORDS, KNOWN_SHARE) != []


def test_greedy_answers_are_deterministic(manager) -> None:
    first = ask(manager, SEEN[1], model=PYDOC_CHAT).text
    assert [ask(manager, SEEN[1], model=PYDOC_CHAT).text for _ in range(2)] == [first, first]


def test_it_takes_chat_messages_and_builtin_pydoc_takes_raw_prompts() -> None:
    specs = {s.id: s for s in ModelResolver().available()}
    assert specs[PYDOC_CHAT].chat is True
    assert specs[PYDOC].chat is False
    assert specs[TINY].chat is True


def test_the_shipped_model_fits_the_size_budget_and_records_how_it_was_made() -> None:
    total = sum(p.stat().st_size for p in FOLDER.iterdir())
    info = training()
    card = (FOLDER / "MODEL_CARD.md").read_text()

    assert total <= 20 * 1024 * 1024
    assert info["base"]["model"] == PYDOC
    assert info["data"]["held_out_pairs"] > 0 and info["data"]["train_pairs"] > info["data"]["held_out_pairs"]
    assert info["history"][-1]["held_out_loss"] < info["history"][0]["held_out_loss"]
    for label in ("held-out names", "held-out topics", "seen names", "seen topics"):
        assert f"| {label} |" in card
        assert f"### {label}" in card
        assert len(info["samples"][label]["questions"]) >= 5
    assert card.count("**Q:**") == 20, "five unedited samples of each set"
    assert f"CPython {info['python']}" in card
    assert "PSF License" in card


def test_the_chat_training_script_runs_end_to_end_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "model"

    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_builtin_chat.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "training.json").read_text())
    assert info["python"] == platform.python_version()
    assert info["recipe"]["steps"] == 3 and info["history"][-1]["step"] == 3
    # The evaluation answers come from mlx_lm.load on the written folder, so it loads.
    assert {"held-out names", "seen names", "self"} <= set(info["samples"])
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|endoftext|>" in tokenizer_config["chat_template"], "an answer must end with the stop token"
    assert "completion_model" not in json.loads((out / "config.json").read_text())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".model-*")), "the temporary folder was left behind"
