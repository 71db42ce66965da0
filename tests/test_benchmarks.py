"""The benchmarks still run: a --quick pass of each, with no timing asserts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
