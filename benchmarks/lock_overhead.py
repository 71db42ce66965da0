"""Cost per acquire+release of a RankedLock in each checker mode, against a plain threading.Lock.

Run: ``python benchmarks/lock_overhead.py [--repeat 9] [--number 100000]``. Prints Markdown
tables and writes them to ``benchmarks/results/lock_overhead.md``. Times are nanoseconds per
acquisition (one acquire plus its release): the median and the best of the repeats. The
nested pair is ``with activity_lock, state_lock:`` as the WorkerManager takes them, divided
by two. Cases are timed round-robin, one run of each per round, so load from other processes
falls on all of them alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import threading
import timeit
from dataclasses import dataclass, field
from pathlib import Path

from mlx_jupyter.engine import locks
from mlx_jupyter.engine.locks import RankedLock

RESULTS = Path(__file__).resolve().parent / "results" / "lock_overhead.md"
MODES = ("plain", "off", "observe", "validate")


@dataclass
class Case:
    """One timed statement, run under a checker mode, counted per ``per`` acquisitions."""

    label: str
    stmt: str
    names: dict[str, object]
    mode: str = "validate"
    per: int = 1
    runs: list[float] = field(default_factory=list)

    def run(self, number: int) -> None:
        locks.set_mode("off" if self.mode == "plain" else self.mode)
        self.runs.append(timeit.Timer(self.stmt, globals=self.names).timeit(number) * 1e9 / number / self.per)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        return min(self.runs)


def run_round_robin(cases: list[Case], number: int, repeat: int) -> None:
    for _ in range(repeat):
        for case in cases:
            case.run(number)


def mode_cases() -> list[tuple[str, Case, Case]]:
    rows = []
    for mode in MODES:
        if mode == "plain":
            names = {"outer": threading.Lock(), "inner": threading.Lock()}
        else:
            names = {"outer": RankedLock("activity_lock"), "inner": RankedLock("state_lock")}
        single = Case(mode, "with inner: pass", names, mode)
        pair = Case(mode, "with outer, inner: pass", names, mode, per=2)
        rows.append((mode, single, pair))
    return rows


def mode_table(rows: list[tuple[str, Case, Case]]) -> list[str]:
    plain = rows[0][2].median
    lines = [
        "| lock | single, median | single, best | nested pair, median | nested pair, best | pair vs plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, single, pair in rows:
        label = "threading.Lock" if mode == "plain" else f"RankedLock, {mode}"
        lines.append(
            f"| {label} | {single.median:,.0f} | {single.best:,.0f} "
            f"| {pair.median:,.0f} | {pair.best:,.0f} | {pair.median / plain:.1f}x |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="timing rounds; the tables show median and best")
    parser.add_argument("--number", type=int, default=100_000, help="statements per timing run")
    args = parser.parse_args()
    # observe logs every acquisition at DEBUG: measured as deployed, with that level disabled.
    logging.getLogger(locks.__name__).setLevel(logging.WARNING)
    mode_before = locks.get_mode()
    try:
        modes = mode_cases()
        cases = [case for _, single, pair in modes for case in (single, pair)]
        run_round_robin(cases, args.number, args.repeat)
    finally:
        locks.set_mode(mode_before)
    assert locks.violations() == [], locks.violations()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    report = [
        "# RankedLock overhead",
        "",
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load} at the end; {args.repeat} rounds of {args.number:,}. "
        "Nanoseconds per acquisition (acquire + release).",
        "",
        *mode_table(modes),
        "",
    ]
    text = "\n".join(report)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
