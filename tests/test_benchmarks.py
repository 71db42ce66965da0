"""The benchmarks still run: a --quick pass of each, with no timing asserts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What sampling_cost.py reports per batch size and case, each with its ratio to plain.
MEASURES = (
    "ms_per_token",
    "worker_ms_per_token",
    "cpu_ms_per_token",
    "worker_cpu_ms_per_token",
    "caller_cpu_ms_per_token",
)


def test_engine_vs_direct_quick_run_reports_both_paths_and_their_ratio(tmp_path):
    out = tmp_path / "engine_vs_direct.md"
    # The child inherits MLX_JUPYTER_LOCKDEP=validate and the test cache from conftest.
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_vs_direct.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"benchmark failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    table = out.read_text(encoding="utf-8")
    header = next(line for line in table.splitlines() if line.startswith("| model | params"))
    for column in ("direct tok/s", "engine tok/s", "engine/direct", "direct TTFT ms", "engine TTFT ms"):
        assert column in header, f"no {column!r} column in {header!r}"
    rows = [line for line in table.splitlines() if line.startswith(("| builtin:tiny |", "| random-small-v2 |"))]
    assert len(rows) == 4, f"expected a main and a diagnostics row per model:\n{table}"
    assert table in done.stdout, "the table printed differs from the file written"


def test_run_all_quick_writes_every_section_a_verdict_per_target_and_a_png(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"benchmark failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    table = (tmp_path / "run_all.md").read_text(encoding="utf-8")
    assert table in done.stdout, "the table printed differs from the file written"
    for section in ("## Single stream", "## Concurrent clients", "## Model loads", "## Status endpoints under load"):
        assert section in table, f"no {section!r} in:\n{table}"
    for path in ("| direct |", "| engine |", "| rest |", "| openai |", "| mlx_lm.server |"):
        assert path in table, f"no single-stream row {path!r}"
    for clients in (1, 4, 8):
        assert any(line.startswith("| ") and f"| {clients} |" in line for line in table.splitlines())
    for endpoint in ("mlx/api/health", "mlx/api/models"):
        assert f"| {endpoint} |" in table
    verdicts = [line for line in table.splitlines() if line.startswith("- ") and "reached" in line]
    assert len(verdicts) == 5, f"expected one verdict per target:\n{table}"
    assert (tmp_path / "run_all.png").read_bytes().startswith(b"\x89PNG")


def test_sampling_cost_quick_run_reports_every_case_at_both_batch_sizes_against_plain(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sampling_cost.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"benchmark failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    table = (tmp_path / "sampling_cost.md").read_text(encoding="utf-8")
    assert table in done.stdout, "the table printed differs from the file written"
    report = json.loads((tmp_path / "sampling_cost.json").read_text(encoding="utf-8"))
    assert report["model"] == "builtin:pydoc" and report["batches"] == [1, 8]
    cases = report["cases"]
    assert list(cases) == [
        "plain",
        "repetition_penalty 1.3",
        "presence + frequency 0.5",
        next(c for c in cases if c.startswith("logit_bias")),
        "logprobs, top 5",
        "all",
    ]
    assert cases["all"] == {k: v for name, fields in cases.items() if name != "all" for k, v in fields.items()}
    assert 1 <= len(next(v for c, v in cases.items() if c.startswith("logit_bias"))["logit_bias"]) <= 8
    rows = {(r["batch"], r["case"]): r for r in report["results"]}
    assert set(rows) == {(b, c) for b in (1, 8) for c in cases}
    for (batch, case), row in rows.items():
        for key in [*MEASURES, *(m.replace("ms_per_token", "ratio") for m in MEASURES)]:
            assert math.isfinite(row[key]) and row[key] > 0, f"{key} of {case} at batch {batch}: {row[key]}"
        if case == "plain":
            assert row["ratio"] == row["cpu_ratio"] == 1.0
        streams = row["rounds"]["completion_tokens"]
        assert len(streams) == batch * report["repeats"] and all(2 <= n <= report["tokens"] for n in streams)
        assert f"| {batch} | {case} |" in table
    processing = {(r["batch"], r["case"]): r for r in report["processing"]}
    assert set(processing) == set(rows) and "## The score processing alone" in table
    for (batch, case), row in processing.items():
        assert math.isfinite(row["us_per_step"]) and row["us_per_step"] > 0, f"{case} at batch {batch}: {row}"
        assert math.isfinite(row["extra_us_per_token"]) and (case != "plain" or row["extra_us_per_token"] == 0)
