"""Learning benchmark: held-out avg@k against training wall-clock time, SGSD against its baselines.

Every variant starts from the same model (the embedded default, Qwen2.5-Coder-0.5B on reasoning-gym
chain_sum; `benchmarks/configs/learning.yaml`) and trains for the same budget of training seconds
(`train.time_budget_s`; evaluation time is not counted), with the same seeds. Held-out avg@k is
measured before training (step 0), every `--eval-every-min` minutes of training
(`train.eval_every_s`) and at the end. Variants (`VARIANTS` below): sgsd, grpo, opsd, and the two
ablations the paper stresses, sgsd without outcome-validated polarity and sgsd with one teacher.

Each (variant, seed) is its own `python -m sgsd train` subprocess writing OUT/runs/VARIANT/seed-S/
(log in train.log), so a crash or a cut-off machine loses only that run. A finished run writes
done.json and is skipped next time; an unfinished one with a complete checkpoint is resumed with
`--resume` (one without is started again). Seeds and variants can be added later. Finished runs keep
only their newest checkpoint (`--keep-checkpoints` keeps all).

Afterwards (or with `--report-only`) the script writes, from every run folder under OUT/runs:

- table.md / table.json: per variant base avg@k (step 0), final and best avg@k, final - base,
  mean ± std over seeds, seeds and steps done;
- learning.png: avg@k against training minutes, mean over seeds with a ± std band (each run's
  curve is linearly interpolated onto a common grid of minutes, its final value held to the
  latest final evaluation);
- diagnostics.png / diagnostics.md: why a method does or does not learn: reward, mean robust
  support, mean |Delta| (teacher - student log-prob gap), kept-token fraction and the polarity mix
  against training minutes, and their means, skipped steps and truncation.

    HF_HUB_OFFLINE=1 python benchmarks/learning.py --seeds 0,1,2 --budget-min 20 --eval-every-min 5
    python benchmarks/learning.py --dry-run                       # print the commands only
    python benchmarks/learning.py --report-only                   # tables and plots from the runs
    python benchmarks/learning.py --config sgsd/configs/tiny.yaml --set model.name=TINY_DIR \\
        --methods sgsd,grpo --seeds 0 --budget-min 0.05 --eval-every-min 0.02 --out /tmp/l  # smoke
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "learning.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "learning"

# variant -> (display label, dotted overrides on top of the shared config)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "sgsd": ("SGSD", ["train.method=sgsd"]),
    "grpo": (
        "GRPO",
        ["train.method=grpo", "rollout.num_generations=4", "train.batch_size=2", "train.micro_batch_size=1"],
    ),
    # the paper's OPSD: one frozen teacher that sees the reference answer, full-vocabulary forward KL
    "opsd": (
        "OPSD",
        ["train.method=opsd", "teachers.count=1", "teachers.mode=frozen", "objective.loss=forward_kl"],
    ),
    "sgsd_no_polarity": ("SGSD w/o polarity", ["train.method=sgsd", "objective.use_polarity=false"]),
    "sgsd_single_teacher": ("SGSD K=1", ["train.method=sgsd", "teachers.count=1"]),
}
POLARITY_KEYS = [
    "helpful_fraction",
    "warning_fraction",
    "misleading_fraction",
    "over_suppressive_fraction",
    "neutral_fraction",
]


class Axis(NamedTuple):
    """The compute axis of curves and budgets: a cumulative metrics.jsonl key in seconds, the train.*
    settings of its budget and evaluation interval, and the axis label (in minutes)."""

    key: str
    budget: str
    every: str
    label: str
    short: str


WALL = Axis("train_time_s", "time_budget_s", "eval_every_s", "training time (min, evaluation excluded)",
            "training time (min)")  # fmt: skip
CPU = Axis("train_cpu_s", "cpu_budget_s", "eval_every_cpu_s", "training CPU time (CPU-min, evaluation excluded)",
           "training CPU time (CPU-min)")  # fmt: skip

SIGNALS = [  # metrics.jsonl key, panel title
    ("reward_mean", "mean reward"),
    ("mean_support", "mean robust support"),
    ("mean_abs_delta", "mean |Δ| (teacher − student)"),
    ("kept_token_fraction", "kept-token fraction"),
]


# ---------------------------------------------------------------------------------------------------
# Running


def run_dir_of(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed-{seed}"


def train_command(
    config: Path,
    run_dir: Path,
    variant: str,
    seed: int,
    budget_s: float,
    eval_every_s: float,
    max_steps: int,
    extra: Sequence[str] = (),
    resume: bool = False,
) -> list[str]:
    """The `sgsd train` command line of one (variant, seed); `extra` overrides come last and win."""
    cmd = [sys.executable, "-m", "sgsd", "train", "-c", str(config), "-o", str(run_dir)]
    if resume:
        cmd.append("--resume")
    cmd += VARIANTS[variant][1]
    cmd += [
        f"train.seed={seed}",
        f"train.time_budget_s={budget_s:g}",
        f"train.eval_every_s={eval_every_s:g}",
        f"train.steps={max_steps}",
    ]
    return cmd + list(extra)


def base_eval_path(run_dir: Path) -> Path:
    return run_dir / "eval" / "step-000000" / "summary.json"


def shared_base_eval(out: Path, seed: int, exclude: str) -> Path | None:
    """The step-0 evaluation of another variant with this seed, if one exists. Step 0 is the same for
    every variant of a seed (same model with a zero LoRA update, same held-out problems, same eval
    seed `train.seed + 17`), so only the first run of a seed evaluates it; the others reuse it."""
    for variant in VARIANTS:
        path = base_eval_path(run_dir_of(out, variant, seed))
        if variant != exclude and path.is_file():
            return path
    return None


def has_checkpoint(run_dir: Path) -> bool:
    from sgsd.checkpoint import complete_checkpoints

    return bool(complete_checkpoints(run_dir))


def prune_checkpoints(run_dir: Path) -> None:
    """Keep only the newest complete checkpoint of a finished run (the evaluations are already written)."""
    from sgsd.checkpoint import complete_checkpoints

    for old in complete_checkpoints(run_dir)[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def _last_metrics(run_dir: Path) -> dict:
    from sgsd.fileio import read_jsonl

    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    return rows[-1] if rows else {}


def run_one(cli, variant: str, seed: int) -> str:
    """Train one (variant, seed) unless it is done; returns 'done', 'skipped', 'failed' or 'dry-run'."""
    run_dir = run_dir_of(cli.out, variant, seed)
    shared_base = shared_base_eval(cli.out, seed, exclude=variant)

    def command(resume: bool) -> list[str]:
        return train_command(
            cli.config,
            run_dir,
            variant,
            seed,
            cli.budget_min * 60,
            cli.eval_every_min * 60,
            cli.max_steps,
            [*cli.set, *(["train.eval_at_start=false"] if shared_base else [])],
            resume,
        )

    return train_once(
        run_dir,
        f"{variant} seed {seed}",
        command,
        {"variant": variant, "seed": seed},
        dry_run=cli.dry_run,
        keep_checkpoints=cli.keep_checkpoints,
    )


def train_once(
    run_dir: Path,
    name: str,
    command,
    record: dict,
    dry_run: bool = False,
    keep_checkpoints: bool = False,
) -> str:
    """Run `command(resume)` (an `sgsd train` command line writing `run_dir`) unless the run is done.

    A finished run has done.json and is skipped; an unfinished one with a complete checkpoint is
    resumed (`command(True)`); a folder without one is started again. The log goes to run_dir/train.log.
    On success done.json gets `record`, the steps, training time and compute counters of the last
    metrics row and the command, and all but the newest checkpoint are deleted (unless
    `keep_checkpoints`). Returns 'done', 'skipped', 'failed' or 'dry-run'."""
    from sgsd.fileio import atomic_write_json

    if (run_dir / "done.json").is_file():
        print(f"[skip] {name}: finished ({run_dir / 'done.json'})", flush=True)
        return "skipped"
    resume = run_dir.is_dir() and has_checkpoint(run_dir)
    cmd = command(resume)
    if dry_run:
        print(" ".join(cmd), flush=True)
        return "dry-run"
    if run_dir.is_dir() and not resume:  # started before but never checkpointed: start again
        print(f"[restart] {name}: no complete checkpoint in {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{'resume' if resume else 'train'}] {name} -> {run_dir}", flush=True)
    started = time.time()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - started
    if rc != 0:
        print(f"[failed] {name}: exit {rc} after {wall:.0f} s; see {run_dir / 'train.log'}", flush=True)
        return "failed"
    last = _last_metrics(run_dir)
    counters = ("train_time_s", "train_cpu_s", "rollouts_total", "completion_tokens_total")
    atomic_write_json(
        run_dir / "done.json",
        {
            **record,
            "steps": last.get("step", 0),
            **{k: last.get(k, 0.0) for k in counters},
            "wall_s_last_invocation": round(wall, 1),
            "command": cmd,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    if not keep_checkpoints:
        prune_checkpoints(run_dir)
    print(f"[done] {name}: {last.get('step', 0)} steps, {wall:.0f} s wall", flush=True)
    return "done"


# ---------------------------------------------------------------------------------------------------
# Aggregation (pure)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value); (nan, nan) when empty."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_avg_at_k(summary: dict) -> float:
    """avg@k in %, averaged over the summary's evaluation sources."""
    results = summary.get("results", {})
    if not results:
        return math.nan
    return 100 * statistics.fmean(r["avg@k"] for r in results.values())


def eval_curve(
    evals: dict[int, dict], metrics: Sequence[dict], key: str = WALL.key
) -> list[tuple[float, float]]:
    """[(training minutes, avg@k %)] per evaluated step; the minutes of step s are the `key` seconds
    (`train_time_s`, or `train_cpu_s`) logged with step s (0 for step 0). Steps with no logged time (a
    torn log) are left out."""
    minutes = {0: 0.0}
    for row in metrics:
        if "step" in row and key in row:
            minutes[int(row["step"])] = float(row[key]) / 60
    return [(minutes[s], mean_avg_at_k(summary)) for s, summary in sorted(evals.items()) if s in minutes]


def interpolate(curve: Sequence[tuple[float, float]], grid: Sequence[float]) -> list[float]:
    """Linear interpolation of a curve [(x, y)] sorted by x at `grid`; nan outside [first x, last x]."""
    out = []
    for g in grid:
        value = math.nan
        for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
            if x0 <= g <= x1:
                value = y0 if x1 == x0 else y0 + (y1 - y0) * (g - x0) / (x1 - x0)
                break
        if curve and math.isnan(value) and g == curve[-1][0]:
            value = curve[-1][1]
        out.append(value)
    return out


def extend_flat(curve: Sequence[tuple[float, float]], end: float) -> list[tuple[float, float]]:
    """The curve with its last value held until `end` (unchanged if it already reaches `end`)."""
    curve = list(curve)
    return [*curve, (end, curve[-1][1])] if curve and curve[-1][0] < end else curve


def time_grid(budget_min: float, every_min: float) -> list[float]:
    """0, every, 2*every, ... up to and including the budget."""
    n = int(math.floor(budget_min / every_min + 1e-9)) if every_min > 0 else 0
    grid = [round(i * every_min, 9) for i in range(n + 1)]
    return grid if grid[-1] >= budget_min - 1e-9 else [*grid, budget_min]


def binned_means(points: Sequence[tuple[float, float]], edges: Sequence[float]) -> list[float]:
    """Mean of the y values whose x lies in [edges[i], edges[i+1]) (the last bin includes its right
    edge); nan for an empty bin."""
    out = []
    for i in range(len(edges) - 1):
        last = i == len(edges) - 2
        ys = [y for x, y in points if edges[i] <= x < edges[i + 1] or (last and x == edges[i + 1])]
        out.append(statistics.fmean(ys) if ys else math.nan)
    return out


def column_mean(rows: Sequence[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))]
    return statistics.fmean(vals) if vals else math.nan


def early_late(rows: Sequence[dict], key: str) -> tuple[float, float]:
    """Mean of `key` over the first and the last quarter of the rows (at least one row each)."""
    vals = [float(r[key]) for r in rows if key in r]
    if not vals:
        return math.nan, math.nan
    q = max(1, len(vals) // 4)
    return statistics.fmean(vals[:q]), statistics.fmean(vals[-q:])


def run_scores(evals: dict[int, dict]) -> dict[str, float]:
    """base (step 0), final (last evaluated step), best (over evaluated steps after 0, else step 0)."""
    if not evals:
        return {}
    scores = {s: mean_avg_at_k(v) for s, v in evals.items()}
    trained = [v for s, v in scores.items() if s > 0] or list(scores.values())
    final = scores[max(scores)]
    return {
        "base": scores.get(0, math.nan),
        "final": final,
        "best": max(trained),
        "gain": final - scores.get(0, math.nan),
    }


# ---------------------------------------------------------------------------------------------------
# Reading runs and writing the report


def load_groups(out: Path, variants: dict[str, tuple] = VARIANTS, folder: str = "runs") -> dict[str, list]:
    """variant -> [sgsd.report.RunData] for every run folder under OUT/FOLDER/VARIANT/seed-S (in `variants`
    order, labelled by it)."""
    from sgsd.report import load_run

    root = out / folder
    groups: dict[str, list] = {}
    if not root.is_dir():
        return groups
    known = list(variants)
    folders = sorted(
        (d for d in root.iterdir() if d.is_dir()),
        key=lambda d: (known.index(d.name) if d.name in known else len(known), d.name),
    )
    for vdir in folders:
        runs = []
        for sdir in sorted(vdir.glob("seed-*"), key=lambda d: d.name):
            if (sdir / "config.yaml").is_file():
                run = load_run(sdir, label=variants.get(vdir.name, (vdir.name, []))[0])
                run.done = (sdir / "done.json").is_file()
                runs.append(run)
        if runs:
            groups[vdir.name] = runs
    share_base_evals(groups)
    return groups


def share_base_evals(groups: dict[str, list]) -> None:
    """Give every run without a step-0 evaluation the one of its seed (see `shared_base_eval`)."""
    base_by_seed = {r.seed: r.evals[0] for runs in groups.values() for r in runs if 0 in r.evals}
    for runs in groups.values():
        for run in runs:
            if 0 not in run.evals and run.seed in base_by_seed:
                run.evals[0] = base_by_seed[run.seed]


def _run_setting(run, section: str, key: str):
    import yaml

    cfg = yaml.safe_load((run.path / "config.yaml").read_text("utf-8")) or {}
    return (cfg.get(section) or {}).get(key)


def _steps_done(run) -> int:
    return int(run.metrics[-1].get("step", 0)) if run.metrics else 0


def _train_minutes(run, key: str = WALL.key) -> float:
    return float(run.metrics[-1].get(key, 0.0)) / 60 if run.metrics else 0.0


def write_table(groups: dict[str, list], out: Path) -> Path:
    from sgsd.fileio import atomic_write_json, atomic_write_text
    from sgsd.report import markdown_table

    columns = ["Base avg@k", "Final avg@k", "Best avg@k", "Final − base"]
    rows: dict[str, dict[str, list]] = {}
    data = {}
    for variant, runs in groups.items():
        label = runs[0].label
        row = rows[label] = {c: [] for c in [*columns, "step"]}
        for run in runs:
            scores = run_scores(run.evals)
            if not scores:
                continue
            for col, key in zip(columns, ("base", "final", "best", "gain")):
                if not math.isnan(scores[key]):
                    row[col].append(scores[key])
            row["step"].append(_steps_done(run))
        data[variant] = {
            "label": label,
            "seeds": [r.seed for r in runs],
            "finished": [r.done for r in runs],
            **{c: row[c] for c in columns},
            "steps": row["step"],
            "train_min": [_train_minutes(r) for r in runs],
        }
    ks = sorted(
        {
            res.get("k")
            for runs in groups.values()
            for r in runs
            for s in r.evals.values()
            for res in s.get("results", {}).values()
        }
        - {None}
    )
    budgets = sorted(
        {(_run_setting(r, "train", "time_budget_s") or 0) / 60 for rs in groups.values() for r in rs}
    )
    unfinished = [f"{v} seed {r.seed}" for v, rs in groups.items() for r in rs if not r.done]
    lines = [
        "# Learning benchmark: held-out avg@k after equal training time",
        "",
        f"avg@{'/'.join(map(str, ks)) or 'k'} in % over the held-out problems; mean ± std over seeds (ddof=1). "
        f"Training budget: {', '.join(f'{b:g}' for b in budgets)} min of training steps (evaluation not counted). "
        "Base = step 0 (before training), final = last evaluation, best = best evaluation after step 0. "
        "Step = optimizer steps done per seed; Runs = seeds.",
        "",
        markdown_table(rows, columns),
    ]
    if unfinished:
        lines += [f"Unfinished runs (partial results included): {', '.join(unfinished)}.", ""]
    lines += [
        "## Runs",
        "",
        "| Variant | Seed | Finished | Steps | Training min | Evaluations (min: avg@k %) |",
        "|---|---|---|---|---|---|",
    ]
    for runs in groups.values():
        for run in runs:
            curve = ", ".join(f"{m:.1f}: {a:.1f}" for m, a in eval_curve(run.evals, run.metrics))
            lines.append(
                f"| {run.label} | {run.seed} | {'yes' if run.done else 'no'} | {_steps_done(run)} "
                f"| {_train_minutes(run):.1f} | {curve or '–'} |"
            )
    lines.append("")
    path = out / "table.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_json(out / "table.json", data)
    return path


def plot_learning(groups: dict[str, list], out: Path, axis: Axis = WALL) -> Path | None:
    """avg@k (%) against training minutes (`axis`): mean over seeds on a common grid, band = ± std."""
    from sgsd.report import setup_matplotlib

    curves = {v: [(r, eval_curve(r.evals, r.metrics, axis.key)) for r in runs] for v, runs in groups.items()}
    if not any(len(c) > 1 for runs in curves.values() for _, c in runs):
        return None
    budget = max((_run_setting(r, "train", axis.budget) or 0) / 60 for rs in groups.values() for r in rs)
    every = (
        min(
            ((_run_setting(r, "train", axis.every) or 0) / 60 for rs in groups.values() for r in rs),
            default=0,
        )
        or budget / 4
    )
    end = max(c[-1][0] for runs in curves.values() for _, c in runs if c)
    if budget <= 0:
        budget = end
    # runs stop at the first step boundary past the budget, so final evaluations land a little after
    # it: the grid's last point is the latest final evaluation, and each finished run keeps its final
    # value from its own final evaluation to there (training has stopped, the model no longer changes)
    grid = [g for g in time_grid(budget, every) if g < budget - 1e-9] + [max(end, budget)]
    curves = {
        v: [(r, extend_flat(c, grid[-1]) if r.done else c) for r, c in runs] for v, runs in curves.items()
    }
    plt = setup_matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (variant, runs) in enumerate(curves.items()):
        per_run = [interpolate(c, grid) for _, c in runs if c]
        stats = [mean_std([vals[j] for vals in per_run]) for j in range(len(grid))]
        xs = [g for g, (m, _) in zip(grid, stats) if not math.isnan(m)]
        means = [m for m, _ in stats if not math.isnan(m)]
        stds = [s for m, s in stats if not math.isnan(m)]
        colour = f"C{i}"
        raw = [point for _, c in runs for point in c]
        ax.plot([x for x, _ in raw], [y for _, y in raw], "x", color=colour, alpha=0.4, markersize=5)
        ax.plot(xs, means, marker="o", color=colour, label=f"{groups[variant][0].label} (n={len(per_run)})")
        if len(per_run) > 1:
            ax.fill_between(
                xs,
                [m - s for m, s in zip(means, stds)],
                [m + s for m, s in zip(means, stds)],
                color=colour,
                alpha=0.2,
            )
    ax.set_xlabel(axis.label)
    ax.set_ylabel("held-out avg@k (%)")
    ax.set_title(
        f"Held-out avg@k against {axis.short.split(' (')[0]}\n(lines: mean over seeds on a common grid, "
        "band: ± std, x: each evaluation)",
        fontsize=11,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = out / "learning.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _time_edges(groups: dict[str, list], bins: int, key: str = WALL.key) -> list[float]:
    end = max(
        (float(r.get(key, 0)) / 60 for rs in groups.values() for run in rs for r in run.metrics),
        default=0.0,
    )
    end = end or 1.0
    return [end * i / bins for i in range(bins + 1)]


def _points(runs, key: str, x: str = WALL.key) -> list[tuple[float, float]]:
    return [
        (float(r[x]) / 60, float(r[key]))
        for run in runs
        for r in run.metrics
        if key in r and x in r and r[key] is not None
    ]


def plot_diagnostics(
    groups: dict[str, list], out: Path, bins: int = 12, axis: Axis = WALL, signals: Sequence = tuple(SIGNALS)
) -> Path | None:
    """Top row: reward, support, |Delta|, kept tokens against training minutes (mean over seeds and the
    steps in each time bin), one line per variant. Bottom row: the polarity mix per variant, one stacked
    bar per time bin (an empty bin stays empty)."""
    from sgsd.report import POLARITY, setup_matplotlib

    if not any(run.metrics for runs in groups.values() for run in runs):
        return None
    edges = _time_edges(groups, bins, axis.key)
    mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    polar = [v for v, runs in groups.items() if _points(runs, POLARITY_KEYS[0], axis.key)]
    ncols = max(len(signals), len(polar), 1)
    plt = setup_matplotlib()
    fig, axes = plt.subplots(2, ncols, figsize=(4.6 * ncols, 8.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], signals):
        for i, runs in enumerate(groups.values()):
            points = _points(runs, key, axis.key)
            if points:
                ax.plot(mids, binned_means(points, edges), marker=".", color=f"C{i}", label=runs[0].label)
        ax.set_title(title)
        ax.set_xlabel(axis.short)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    for ax, variant in zip(axes[1], polar):
        layers = [binned_means(_points(groups[variant], key, axis.key), edges) for key, _, _ in POLARITY]
        width = edges[1] - edges[0]
        bottom = [0.0] * len(mids)
        for layer, (_, name, colour) in zip(layers, POLARITY):  # stacked bars, one per time bin
            heights = [0.0 if math.isnan(v) else v for v in layer]
            ax.bar(mids, heights, width=width, bottom=bottom, color=colour, label=name, linewidth=0)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(f"polarity mix: {groups[variant][0].label}")
        ax.set_xlabel(axis.short)
        ax.set_ylim(0, 1)
    if polar:
        axes[1][0].set_ylabel("fraction of teachers")
        axes[1][len(polar) - 1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    for ax in [*axes[0][: len(signals)], *axes[1][: len(polar)]]:
        ax.set_xlim(0, edges[-1])
    for ax in [*axes[0][len(signals) :], *axes[1][len(polar) :]]:
        ax.axis("off")
    fig.suptitle(f"Training diagnostics (means over seeds and steps in {bins} equal time bins)")
    fig.tight_layout()
    path = out / "diagnostics.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# The raw evidence behind the polarity mix: every (rollout, teacher) decision's robust support and
# the per-token gaps Delta_t, as the trainer logs them (`decisions`, `delta_hist` in metrics.jsonl).


def decisions_of(runs) -> list[tuple[float, float, float]]:
    """(robust support a~, rho, reward) of every logged (rollout, teacher) decision of `runs`."""
    return [tuple(map(float, d)) for run in runs for row in run.metrics for d in row.get("decisions", [])]


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of already sorted values; nan when empty."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def support_summary(decisions: Sequence[tuple[float, float, float]], eps_a: float) -> dict[str, float]:
    """How the robust support of the decisions spreads around the dead zone [-eps_a, eps_a]: count,
    quantiles, the share above +eps_a / below -eps_a, the share above +eps_a among correct (r > 0)
    and among wrong (r <= 0) rollouts, and the mean support of each."""
    support = sorted(a for a, _, _ in decisions)
    n = len(support)

    def share(values, test):
        values = list(values)
        return sum(map(test, values)) / len(values) if values else math.nan

    return {
        "n": float(n),
        "p10": quantile(support, 0.1),
        "median": quantile(support, 0.5),
        "p90": quantile(support, 0.9),
        "above": share(support, lambda a: a > eps_a),
        "below": share(support, lambda a: a < -eps_a),
        "above_if_correct": share((a for a, _, r in decisions if r > 0), lambda a: a > eps_a),
        "above_if_wrong": share((a for a, _, r in decisions if r <= 0), lambda a: a > eps_a),
        "mean_if_correct": _mean([a for a, _, r in decisions if r > 0]),
        "mean_if_wrong": _mean([a for a, _, r in decisions if r <= 0]),
    }


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def delta_fractions(runs) -> list[float]:
    """Share of kept tokens per `sgsd.metrics.DELTA_EDGES` bin, summed over every logged step; [] if none."""
    totals: list[int] = []
    for run in runs:
        for row in run.metrics:
            hist = row.get("delta_hist")
            if hist:
                totals = [a + b for a, b in zip(totals, hist)] if totals else list(hist)
    n = sum(totals)
    return [c / n for c in totals] if n else []


def _eps_a(runs) -> float:
    value = _run_setting(runs[0], "objective", "threshold")
    return 0.05 if value is None else float(value)


def delta_bin_labels() -> list[str]:
    from sgsd.metrics import DELTA_EDGES

    edges = [f"{e:g}" for e in DELTA_EDGES]
    return [f"<{edges[0]}", *(f"[{a},{b})" for a, b in zip(edges, edges[1:])), f">={edges[-1]}"]


def plot_evidence(groups: dict[str, list], out: Path) -> Path | None:
    """Left: the distribution of robust support over all decisions of each distilling variant, correct and
    wrong rollouts apart, with the dead zone shaded. Right: the distribution of Delta_t over kept tokens."""
    from sgsd.report import setup_matplotlib

    with_support = {v: runs for v, runs in groups.items() if decisions_of(runs)}
    if not with_support:
        return None
    plt = setup_matplotlib()
    n = len(with_support)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.2 * (n + 1), 4.4), squeeze=False)
    axes = axes[0]
    values = [a for runs in with_support.values() for a, _, _ in decisions_of(runs)]
    lo, hi = min(values), max(values)
    pad = max(0.05 * (hi - lo), 0.01)
    bins = [lo - pad + (hi - lo + 2 * pad) * i / 30 for i in range(31)]
    for ax, runs in zip(axes, with_support.values()):
        eps_a = _eps_a(runs)
        decisions = decisions_of(runs)
        ax.axvspan(-eps_a, eps_a, color="0.85", label=f"dead zone ±{eps_a:g}")
        for name, test, colour in (
            ("correct (r>0)", lambda r: r > 0, "C2"),
            ("wrong (r≤0)", lambda r: r <= 0, "C3"),
        ):
            ax.hist([a for a, _, r in decisions if test(r)], bins=bins, color=colour, alpha=0.6, label=name)
        ax.set_title(f"robust support: {runs[0].label}\n({len(decisions)} decisions)", fontsize=10)
        ax.set_xlabel("ã (robust support)")
        ax.legend(fontsize=7)
    ax = axes[n]
    labels = delta_bin_labels()
    width = 0.8 / max(1, len(with_support))
    for i, runs in enumerate(with_support.values()):
        fractions = delta_fractions(runs)
        if fractions:
            ax.bar(
                [j + i * width for j in range(len(fractions))], fractions, width=width, label=runs[0].label
            )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=70, fontsize=7)
    ax.set_title("Δ_t = log p_T − log p_S over kept tokens", fontsize=10)
    ax.set_ylabel("share of tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "evidence.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def evidence_lines(groups: dict[str, list]) -> list[str]:
    """Markdown: the support distribution and the Delta distribution of each distilling variant."""
    rows = [(v, runs) for v, runs in groups.items() if decisions_of(runs)]
    if not rows:
        return []
    lines = [
        "## Robust support and Δ (the evidence behind the polarity mix)",
        "",
        "Every (rollout, teacher) decision of the runs: robust support ã quantiles, the share outside the "
        "dead zone ±ε_a, and the share with ã > ε_a among correct (r>0) and wrong (r≤0) rollouts "
        "(helpful and misleading, if polarity were on). Δ_t: share of kept tokens with −0.03 ≤ Δ_t < 0.03, "
        "Δ_t < −0.25 and Δ_t ≥ 0.25 nats.",
        "",
        "| Variant | Decisions | ã p10 | ã median | ã p90 | ã > ε_a | ã < −ε_a | ã > ε_a, r>0 | ã > ε_a, r≤0 "
        "| mean ã, r>0 | mean ã, r≤0 "
        "| −0.03≤Δ<0.03 | Δ<−0.25 | Δ≥0.25 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels = delta_bin_labels()
    small = {labels.index("[-0.03,0)"), labels.index("[0,0.03)")}
    low = set(range(labels.index("[-0.25,-0.1)")))
    high = set(range(labels.index("[0.25,0.5)"), len(labels)))
    for _, runs in rows:
        s = support_summary(decisions_of(runs), _eps_a(runs))
        fr = delta_fractions(runs)

        def part(idx, fr=fr):
            return sum(fr[i] for i in idx) if fr else math.nan

        cells = [
            runs[0].label,
            str(int(s["n"])),
            *(_fmt(s[k], 4) for k in ("p10", "median", "p90")),
            *(_fmt(s[k], 3) for k in ("above", "below", "above_if_correct", "above_if_wrong")),
            *(_fmt(s[k], 4) for k in ("mean_if_correct", "mean_if_wrong")),
            _fmt(part(small)),
            _fmt(part(low)),
            _fmt(part(high)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def write_diagnostics(groups: dict[str, list], out: Path, extra_lines: Sequence[str] = ()) -> Path:
    from sgsd.fileio import atomic_write_text

    header = [
        "Variant",
        "Seeds",
        "Steps/seed",
        "Skipped steps",
        "Reward first¼ → last¼",
        "helpful",
        "warning",
        "misleading",
        "over-supp.",
        "neutral",
        "mean support",
        "mean abs Δ",
        "kept tokens",
        "truncated",
    ]
    lines = [
        "# Learning benchmark: training diagnostics",
        "",
        "Means over every logged optimizer step of every seed. Polarity fractions (Table 2) are the shares",
        "of teachers that are helpful (r>0, support>eps), warning (r<0, support<-eps), misleading (r<0,",
        "support>eps), over-suppressive (r>0, support<-eps) or neutral (|support|<=eps). mean abs Δ is the",
        "mean |log p_T - log p_S| over kept tokens; kept tokens is the token-mask fraction; truncated is the",
        "share of rollouts cut at max_new_tokens. '–': the variant does not log it (GRPO has no teachers).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for runs in groups.values():
        rows = [r for run in runs for r in run.metrics]
        steps = [_steps_done(run) for run in runs]
        skipped = int(sum(float(r.get("skipped_step", 0)) for r in rows))
        per_run = [early_late(run.metrics, "reward_mean") for run in runs if run.metrics]
        early = statistics.fmean(e for e, _ in per_run) if per_run else math.nan
        late = statistics.fmean(x for _, x in per_run) if per_run else math.nan
        cells = [
            runs[0].label,
            str(len(runs)),
            ", ".join(map(str, steps)),
            str(skipped),
            f"{_fmt(early, 2)} → {_fmt(late, 2)}",
            *(_fmt(column_mean(rows, k)) for k in POLARITY_KEYS),
            _fmt(column_mean(rows, "mean_support")),
            _fmt(column_mean(rows, "mean_abs_delta")),
            _fmt(column_mean(rows, "kept_token_fraction")),
            _fmt(column_mean(rows, "truncated_fraction")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *evidence_lines(groups), *extra_lines]
    path = out / "diagnostics.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_report(out: Path) -> list[Path]:
    groups = load_groups(out)
    if not groups:
        print(f"no run folders under {out / 'runs'}: nothing to report", flush=True)
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_table(groups, out),
        plot_learning(groups, out),
        plot_diagnostics(groups, out),
        plot_evidence(groups, out),
        write_diagnostics(groups, out),
    ]
    written = [p for p in written if p is not None]
    for p in written:
        print(f"wrote {p}", flush=True)
    return written


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma list of training seeds, e.g. 0,1,2")
    parser.add_argument("--budget-min", type=float, default=20.0, help="training minutes per run")
    parser.add_argument("--eval-every-min", type=float, default=5.0, help="evaluate every N training minutes")
    parser.add_argument(
        "--max-steps", type=int, default=100_000, help="step cap (the budget normally stops first)"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="shared config of every variant")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra override for every run (repeatable), e.g. --set model.name=/path/tiny",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    parser.add_argument("--report-only", action="store_true", help="only write the tables and plots")
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep every checkpoint of finished runs"
    )
    cli = parser.parse_args(argv)
    cli.methods = [m.strip() for m in cli.methods.split(",") if m.strip()]
    unknown = [m for m in cli.methods if m not in VARIANTS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    try:
        cli.seeds = [int(s) for s in cli.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be a comma list of integers, got {cli.seeds!r}")
    if cli.budget_min <= 0 or cli.eval_every_min <= 0:
        parser.error("--budget-min and --eval-every-min must be > 0")
    cli.config, cli.out = cli.config.resolve(), cli.out.resolve()
    return cli


def main(argv=None) -> int:
    cli = parse_args(argv)
    if not cli.report_only:
        from sgsd.config import load_config
        from sgsd.fileio import atomic_write_text

        for variant in cli.methods:  # fail fast on a bad config before hours of training
            load_config(cli.config, [*VARIANTS[variant][1], *cli.set])
        if not cli.dry_run:
            (cli.out / "runs").mkdir(parents=True, exist_ok=True)
            atomic_write_text(cli.out / "runs" / ".gitignore", "*\n")
        status = {}
        for seed in cli.seeds:  # every variant of a seed before the next seed
            for variant in cli.methods:
                status[variant, seed] = run_one(cli, variant, seed)
        if cli.dry_run:
            return 0
        failed = [f"{v} seed {s}" for (v, s), st in status.items() if st == "failed"]
        write_report(cli.out)
        if failed:
            print(f"failed runs (rerun to resume): {', '.join(failed)}", flush=True)
            return 1
        return 0
    return 0 if write_report(cli.out) else 1


if __name__ == "__main__":
    sys.exit(main())
