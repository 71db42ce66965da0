"""Tests for the trained built-in model builtin:pydoc (text continuation) and its training script."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

from mlx_jupyter.builtin_models import PACKAGED_MODELS
from mlx_jupyter.engine import WorkerManager
from tests.english import english_problems
from tests.helpers import child_pids, wait_for
from tests.models import PYDOC, TINY

ROOT = Path(__file__).resolve().parent.parent


def test_builtin_pydoc_continues_text_in_english_about_python() -> None:
    with WorkerManager(idle_timeout=0, queue_timeout=60, first_token_timeout=60) as manager:
        result = manager.generate("The for statement", model=PYDOC, max_tokens=40)
        statuses = manager.status()

    assert [s.id for s in statuses] == [PYDOC]
    assert result.model == PYDOC
    assert result.finish_reason in ("length", "stop")
    assert english_problems(result.text) == [], result.text
    assert wait_for(lambda: not child_pids(), timeout=10), f"worker processes left behind: {child_pids()}"


def test_the_english_check_rejects_the_random_weights_of_builtin_tiny(make_manager) -> None:
    # The check must be able to fail: the untrained model's greedy output does not pass it.
    manager = make_manager()

    text = manager.generate("The for statement", model=TINY, max_tokens=40).text

    assert english_problems(text) != [], text


def test_the_shipped_model_fits_the_size_budget_and_records_how_it_was_made() -> None:
    folder = PACKAGED_MODELS / "pydoc"
    total = sum(p.stat().st_size for p in folder.iterdir())
    info = json.loads((folder / "training.json").read_text())
    card = (folder / "MODEL_CARD.md").read_text()

    assert total <= 10 * 1024 * 1024
    assert info["data"]["source"] == "pydoc_data.topics"
    assert f"CPython {info['python']}" in card
    assert "Zero-Clause BSD" in card and "PSF License" in card
    assert info["history"][-1]["held_out_loss"] < info["history"][0]["held_out_loss"]
    # It continues text: %%mlx sends it raw prompts, not chat messages.
    assert json.loads((folder / "config.json").read_text())["completion_model"] is True


def test_the_training_script_runs_end_to_end_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "model"

    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_builtin.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "training.json").read_text())
    assert info["python"] == platform.python_version()
    assert info["recipe"]["steps"] == 5 and info["history"][-1]["step"] == 5
    # The samples in the card come from mlx_lm.load on the written folder, so it loads.
    assert set(info["samples"]) >= {"The for statement", "A list is"}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".model-*")), "the temporary folder was left behind"
