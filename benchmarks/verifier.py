"""Verifier throughput: items/second in-process (workers=0) and pooled (workers=2, and 1).

A fixed, deterministically generated 1,000-item set of mixed formats (boxed integers, LaTeX
fractions, radicals, decimals, GSM8K `####`, "Answer:" lines, tuples/intervals, equations, wrong
answers, completions without an answer). All modes grade the same set side by side in one run,
interleaved: the set is cut into --rounds parts and each round grades its part in every mode, in a
rotating order, so a change in the machine's load hits every mode alike. Both pools are started
before the rounds. The in-process grader and each pool first grade a disjoint warm-up set (numbers
offset by 10,000, so no cache entry is shared with the timed set): the antlr LaTeX parser builds
its DFA cache during the first few hundred parses of every process (about 25% of the cold cost,
and each worker of a pool learns it separately), and a trainer's long-lived pool is warm. Start-up
and warm-up are timed apart from the steady-state throughput. CPU seconds of this process and of
each worker are reported per mode. With --json the last line is one JSON object
(inprocess_items_s, pooled_items_s, ratio, ...).

    cd <repo> && HF_HUB_OFFLINE=1 python benchmarks/verifier.py [--items 1000] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def make_items(n: int, seed: int = 0, offset: int = 0) -> list[tuple[str, str]]:
    """(completion, gold) pairs; about 60% correct, with reasoning text padding each completion.
    `offset` shifts every number (a warm-up set that shares no answer with the timed one)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(1, 999) + offset, rng.randint(2, 99) + offset
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
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up items per pool and in-process")
    parser.add_argument(
        "--rounds", type=int, default=4, help="interleaved rounds (each mode grades 1/rounds)"
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sgsd import verifier

    items = make_items(args.items)
    warmup = make_items(args.warmup, seed=1, offset=10_000)
    load_before = os.getloadavg()[0]
    print(f"items: {len(items)}; load average before: {load_before:.2f}; cores: {os.cpu_count()}")

    # Both pools live side by side; grade_many uses the process-wide pool, so each round installs
    # the one it measures (benchmark-only plumbing).
    start = time.perf_counter()
    pools = {n: verifier.GraderPool(n) for n in dict.fromkeys([args.workers, 1])}
    for n, pool in pools.items():
        verifier._pool = pool
        verifier.grade_many(warmup, workers=n)
    startup_s = time.perf_counter() - start
    verifier._pool = None
    verifier.grade_many(warmup, workers=0)

    modes = ["in-process", f"pooled-{args.workers}", "pooled-1"]
    seconds = dict.fromkeys(modes, 0.0)
    cpu = {m: [0.0] for m in modes}
    results: dict[str, list] = {m: [] for m in modes}
    chunk = -(-len(items) // args.rounds)
    for r in range(args.rounds):
        part = items[r * chunk : (r + 1) * chunk]
        for mode in modes[r % 3 :] + modes[: r % 3]:  # rotate the order: load drifts between rounds
            workers = 0 if mode == "in-process" else int(mode.split("-")[1])
            pids = [w.process.pid for w in pools[workers]._workers] if workers else []
            verifier._pool = pools.get(workers)
            before = [_own_cpu_s()] + [_process_cpu_s(p) for p in pids]
            t = time.perf_counter()
            results[mode] += verifier.grade_many(part, workers=workers)
            seconds[mode] += time.perf_counter() - t
            after = [_own_cpu_s()] + [_process_cpu_s(p) for p in pids]
            used = [b - a for a, b in zip(before, after, strict=True)]
            cpu[mode] = [
                c + u for c, u in zip(cpu[mode] + [0.0] * (len(used) - len(cpu[mode])), used, strict=True)
            ]
    replaced = sum(pool.replaced for pool in pools.values())
    for pool in pools.values():
        pool.close()
    verifier._pool = None
    assert replaced == 0, "a worker was replaced during the timed rounds"

    verdicts = [[r.correct for r in results[m]] for m in modes]
    assert all(v == verdicts[0] for v in verdicts), "modes disagree"
    load_after = os.getloadavg()[0]
    rate = {m: len(items) / seconds[m] for m in modes}
    single_s, pooled_s, one_s = (seconds[m] for m in modes)
    print(f"correct: {sum(verdicts[0])}/{len(items)}; {args.rounds} interleaved rounds")
    for m in modes:
        parts = ", ".join(f"{c:.2f}" for c in cpu[m])
        print(
            f"{m:>12}: {rate[m]:8.1f} items/s  ({seconds[m]:.2f} s; CPU s of this process, workers: {parts})"
        )
    print(f"pools start-up + warm-up: {startup_s:.2f} s (once per process)")
    print(
        f"ratio pooled / in-process: {single_s / pooled_s:.2f}x (workers={args.workers}), "
        f"{single_s / one_s:.2f}x (workers=1); load average after: {load_after:.2f}"
    )
    if args.json:
        figures = {
            "items": len(items),
            "workers": args.workers,
            "rounds": args.rounds,
            "inprocess_items_s": round(rate[modes[0]], 1),
            "pooled_items_s": round(rate[modes[1]], 1),
            "pooled_1_worker_items_s": round(rate[modes[2]], 1),
            "ratio": round(single_s / pooled_s, 3),
            "ratio_1_worker": round(single_s / one_s, 3),
            "pool_startup_s": round(startup_s, 2),
            "inprocess_cpu_s": round(cpu[modes[0]][0], 2),
            "pooled_cpu_s": [round(c, 2) for c in cpu[modes[1]]],  # this process, then each worker
            "pooled_1_worker_cpu_s": [round(c, 2) for c in cpu[modes[2]]],
            "load_before": round(load_before, 2),
            "load_after": round(load_after, 2),
            "cores": os.cpu_count(),
        }
        print(json.dumps(figures))


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
