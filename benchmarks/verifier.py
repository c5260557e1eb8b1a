"""Verifier throughput: items/second in-process (workers=0) and pooled (workers=2).

A fixed, deterministically generated 1,000-item set of mixed formats (boxed integers, LaTeX
fractions, radicals, decimals, GSM8K `####`, "Answer:" lines, tuples/intervals, equations, wrong
answers, completions without an answer). Both modes grade the same set side by side in one run;
the pool's start-up is timed separately from its steady-state throughput.

    cd <repo> && HF_HUB_OFFLINE=1 python benchmarks/verifier.py [--items 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def make_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(completion, gold) pairs; about 60% correct, with reasoning text padding each completion."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(2, 99)
        right = rng.random() < 0.6
        kind = i % 8
        if kind == 0:
            gold, answer = str(a), str(a if right else a + 1)
            tail = f"\\boxed{{{answer}}}"
        elif kind == 1:
            gold, answer = (
                f"\\frac{{{a}}}{{{b}}}",
                f"\\dfrac{{{2 * a}}}{{{2 * b}}}" if right else f"\\frac{{{b}}}{{{a}}}",
            )
            tail = f"$\\boxed{{{answer}}}$"
        elif kind == 2:
            gold = f"{b}\\sqrt{{2}}"
            tail = f"\\boxed{{\\sqrt{{{2 * b * b}}}}}" if right else f"\\boxed{{{b}\\sqrt{{3}}}}"
        elif kind == 3:
            gold = f"{a}.5"
            tail = f"\\boxed{{{2 * a + 1}/2}}" if right else f"\\boxed{{{a}.25}}"
        elif kind == 4:
            gold = str(1000 * a)
            tail = f"#### {1000 * a:,}" if right else f"#### {1000 * a + 7:,}"
        elif kind == 5:
            gold = str(a)
            tail = f"Answer: {a if right else a - 1}"
        elif kind == 6:
            gold = f"({a}, {a + b})"
            tail = f"\\boxed{{\\left({a},{a + b}\\right)}}" if right else f"\\boxed{{[{a},{a + b}]}}"
        else:
            gold = str(b)
            tail = f"\\boxed{{x = {b}}}" if right else "I could not finish."
        padding = " ".join(
            f"step {j}: {rng.randint(0, 99)} + {rng.randint(0, 99)}" for j in range(rng.randint(5, 40))
        )
        items.append((f"Let us solve it. {padding}\n{tail}", gold))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sgsd import verifier

    items = make_items(args.items)
    print(f"items: {len(items)}; load average before: {os.getloadavg()[0]:.2f}; cores: {os.cpu_count()}")

    start = time.perf_counter()
    single = verifier.grade_many(items, workers=0)
    single_s = time.perf_counter() - start

    start = time.perf_counter()
    verifier.grade_many(items[:1], workers=args.workers)  # starts the shared pool
    startup_s = time.perf_counter() - start
    start = time.perf_counter()
    pooled = verifier.grade_many(items, workers=args.workers)
    pooled_s = time.perf_counter() - start
    verifier.shutdown_pool()

    assert [r.correct for r in single] == [r.correct for r in pooled], "modes disagree"
    correct = sum(r.correct for r in single)
    print(f"correct: {correct}/{len(items)}")
    print(f"in-process (workers=0): {len(items) / single_s:8.1f} items/s  ({single_s:.2f} s)")
    print(f"pooled (workers={args.workers}):      {len(items) / pooled_s:8.1f} items/s  ({pooled_s:.2f} s)")
    print(f"pool start-up:          {startup_s:8.2f} s (once per process)")
    print(
        f"ratio pooled / in-process: {single_s / pooled_s:.2f}x; load average after: {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
