"""Reports over run folders: a Table-3-style markdown table and training-dynamics plots.

    write_report(["runs/sgsd-s1", "runs/sgsd-s2", "runs/opsd-s1"], "reports/main")

reads each run's `config.yaml`, `metrics.jsonl` and `eval/step-N/summary.json` and writes
`DIR/report.md` with:

- the main table: methods x benchmarks + Avg. (avg@k in %, the paper's best-checkpoint protocol:
  per run, the checkpoint with the highest mean avg@k over the test benchmarks); the best value of a
  column in **bold**, the second best <u>underlined</u> (ties share the mark; values compared as
  printed). Runs of one method with different seeds are shown as mean ± sample std (ddof=1). A "Base"
  row comes from the runs' step-0 evaluations (the model before training).
- with validation sources: the same table with the checkpoint chosen on the validation sources.
- `accuracy.png`: avg@k against step, one panel per benchmark plus the average, one line per
  method (mean over seeds, band = ± std).
- `polarity.png`: the stacked teacher-polarity mix (helpful / warning / misleading /
  over-suppressive / neutral) against step, one panel per method that logs it.
- `signals.png`: mean robust support and mean reward against step, one line per run; the support on
  correct and on wrong rollouts (`support_correct` / `support_wrong`) when the runs log it.

Per-step training curves are smoothed with a trailing moving average (`smooth` steps, stated in
the titles).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sgsd.errors import DataError, UserError
from sgsd.evaluate import read_summaries, select_checkpoints
from sgsd.fileio import atomic_write_text, read_jsonl
from sgsd.objectives import POLARITY_FRACTIONS

METHOD_NAMES = {
    "base": "Base",
    "base_skill": "Base+Skill",
    "grpo": "GRPO",
    "grpo_skill": "GRPO+Skill",
    "opsd": "OPSD",
    "opsd_skill": "OPSD+Skill",
    "sgsd": "SGSD",
}
ROW_ORDER = list(METHOD_NAMES.values())
POLARITY = list(  # metrics.jsonl column, legend label, colour
    zip(
        POLARITY_FRACTIONS,
        ("helpful", "warning", "misleading", "over-suppressive", "neutral"),
        ("#2e7d32", "#1565c0", "#c62828", "#ef6c00", "#9e9e9e"),
        strict=True,
    )
)


@dataclass
class RunData:
    """One run folder: its label (method), seed, per-step training metrics and per-step eval summaries."""

    path: Path
    label: str
    seed: int | None = None
    metrics: list[dict] = field(default_factory=list)
    evals: dict[int, dict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label if self.seed is None else f"{self.label} (seed {self.seed})"


def load_run(run_dir: str | Path, label: str | None = None) -> RunData:
    """Read a run folder. The label is `label`, else from config.yaml: "Base+Skill" when
    eval.with_skills is set, else the display name of train.method."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    config = {}
    if (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text("utf-8")) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{run_dir / 'config.yaml'}: invalid YAML ({exc})") from exc
    train = config.get("train", {}) or {}
    if label is None:
        if (config.get("eval", {}) or {}).get("with_skills"):
            label = "Base+Skill"
        elif "method" in train:
            label = METHOD_NAMES.get(train["method"], train["method"])
        else:
            raise UserError(f"{run_dir}: no config.yaml with train.method; give the run a label")
    metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    evals = read_summaries(run_dir / "eval")
    return RunData(run_dir, label, train.get("seed"), metrics, evals)


# ----------------------------------------------------------------------------
# Tables


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _sources_of(runs: Sequence[RunData], exclude: Sequence[str]) -> list[str]:
    sources: list[str] = []
    for run in runs:
        for summary in run.evals.values():
            for s in summary.get("results", {}):
                if s not in sources and s not in exclude:
                    sources.append(s)
    return sources


def table_rows(
    runs: Sequence[RunData],
    test_sources: Sequence[str],
    validation_sources: Sequence[str] = (),
    base_row: bool = True,
) -> dict[str, dict[str, list]]:
    """{row label: {source or "Avg." or "step": [one value per run]}} with avg@k in %.

    Trained runs use the best-on-test checkpoint, or the validation-selected one when
    `validation_sources` is given. The "Base" row collects step 0 of every run that is not Base+Skill.
    """
    rows: dict[str, dict[str, list]] = {}

    def add(label, summary, step):
        results = summary.get("results", {})
        row = rows.setdefault(label, {s: [] for s in [*test_sources, "Avg.", "step"]})
        present = [s for s in test_sources if s in results]
        for s in present:
            row[s].append(100 * results[s]["avg@k"])
        if len(present) == len(test_sources):
            row["Avg."].append(100 * statistics.fmean(results[s]["avg@k"] for s in test_sources))
        row["step"].append(step)

    if base_row:
        for run in runs:
            if run.label != "Base+Skill" and 0 in run.evals:
                add("Base", run.evals[0], 0)
    for run in runs:
        if not run.evals:
            continue
        selection = select_checkpoints(run.evals, test_sources, validation_sources)
        chosen = selection["validation"] if validation_sources else selection["best_on_test"]
        if chosen is None:
            continue
        if run.label in ("Base", "Base+Skill") or chosen["step"] != 0:
            add(run.label, run.evals[chosen["step"]], chosen["step"])
    order = {name: i for i, name in enumerate(ROW_ORDER)}
    return dict(sorted(rows.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def markdown_table(rows: dict[str, dict[str, list]], columns: Sequence[str]) -> str:
    """Markdown table: best mean of each column in **bold**, second best <u>underlined</u>."""
    printed: dict[tuple[str, str], float | None] = {}
    for label, row in rows.items():
        for col in columns:
            printed[label, col] = round(statistics.fmean(row[col]), 1) if row[col] else None
    marks: dict[tuple[str, str], str] = {}
    for col in columns:
        ranked = sorted({v for (lab, c), v in printed.items() if c == col and v is not None}, reverse=True)
        for (lab, c), v in printed.items():
            if c == col and v is not None and ranked:
                marks[lab, c] = (
                    "bold" if v == ranked[0] else "under" if len(ranked) > 1 and v == ranked[1] else ""
                )

    def cell(label, col):
        values = rows[label][col]
        if not values:
            return "–"
        mean, std = _mean_std(values)
        text = f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")
        mark = marks.get((label, col), "")
        return f"**{text}**" if mark == "bold" else f"<u>{text}</u>" if mark == "under" else text

    header = ["Method", *columns, "Step", "Runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in rows.items():
        steps = ", ".join(str(s) for s in row["step"])
        lines.append(
            "| "
            + " | ".join([label, *(cell(label, c) for c in columns), steps, str(len(row["step"]))])
            + " |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Plots


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over the last `window` values (NaNs skipped)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(statistics.fmean(recent) if recent else math.nan)
    return out


def setup_matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 10, "figure.dpi": 110})
    return plt


def _by_label(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    grouped: dict[str, list[RunData]] = {}
    for run in runs:
        grouped.setdefault(run.label, []).append(run)
    return grouped


def plot_accuracy(runs: Sequence[RunData], test_sources: Sequence[str], out_png: Path) -> Path | None:
    """avg@k (%) against step, one panel per benchmark plus the average; mean ± std over seeds."""
    evaluated = [r for r in runs if len(r.evals) > 1]
    if not evaluated or not test_sources:
        return None
    plt = setup_matplotlib()
    panels = [*test_sources, "Average"]
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for i, (label, group) in enumerate(_by_label(evaluated).items()):
            steps = sorted({s for r in group for s in r.evals})
            means, stds = [], []
            for step in steps:
                vals = []
                for run in group:
                    res = run.evals.get(step, {}).get("results", {})
                    sources = test_sources if panel == "Average" else [panel]
                    if all(s in res for s in sources):
                        vals.append(100 * statistics.fmean(res[s]["avg@k"] for s in sources))
                means.append(statistics.fmean(vals) if vals else math.nan)
                stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            colour = f"C{i}"
            ax.plot(steps, means, marker="o", color=colour, label=f"{label} (n={len(group)})")
            if len(group) > 1:
                lo = [m - s for m, s in zip(means, stds, strict=True)]
                hi = [m + s for m, s in zip(means, stds, strict=True)]
                ax.fill_between(steps, lo, hi, color=colour, alpha=0.2)
        ax.set_title(panel)
        ax.set_xlabel("training step")
        ax.set_ylabel("avg@k accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="best")
    fig.suptitle("Held-out accuracy during training (step 0 = base model; band = ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _metric_series(group: Sequence[RunData], key: str) -> tuple[list[int], list[float]]:
    """Mean over runs of `key` at each step (steps where any run logs it)."""
    per_step: dict[int, list[float]] = {}
    for run in group:
        for row in run.metrics:
            if key in row and row[key] is not None and "step" in row:
                per_step.setdefault(int(row["step"]), []).append(float(row[key]))
    steps = sorted(per_step)
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def plot_polarity(runs: Sequence[RunData], out_png: Path, smooth: int = 5) -> Path | None:
    """Stacked teacher-polarity fractions against step, one panel per method that logs them."""
    groups = {
        label: group
        for label, group in _by_label(runs).items()
        if any(key in row for run in group for row in run.metrics for key, _, _ in POLARITY)
    }
    if not groups:
        return None
    plt = setup_matplotlib()
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False, sharey=True)
    for ax, (label, group) in zip(axes.flat, groups.items(), strict=True):
        steps = sorted({int(r["step"]) for run in group for r in run.metrics if "step" in r})
        layers = []
        for key, _, _ in POLARITY:
            s, v = _metric_series(group, key)
            lookup = dict(zip(s, v, strict=True))
            layers.append(_smooth([lookup.get(step, math.nan) for step in steps], smooth))
        layers = [[0.0 if math.isnan(x) else x for x in layer] for layer in layers]
        ax.stackplot(
            steps,
            *layers,
            labels=[name for _, name, _ in POLARITY],
            colors=[c for _, _, c in POLARITY],
            alpha=0.9,
        )
        ax.set_title(f"{label} (n={len(group)})")
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
        ax.margins(x=0)
    axes.flat[0].set_ylabel("fraction of teachers")
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="polarity")
    fig.suptitle(f"Teacher polarity mix (moving average over {smooth} steps)")
    fig.tight_layout()
    fig.savefig(out_png, bbox_inches="tight")
    plt.close(fig)
    return out_png


def plot_signals(runs: Sequence[RunData], out_png: Path, smooth: int = 5) -> Path | None:
    """Mean robust support and mean reward against step, one line per run; and, where runs log it
    (`sgsd.metrics.support_by_outcome`), the support on correct (solid) and on wrong (dashed) rollouts."""
    panels = [
        (keys, title)
        for keys, title in (
            (("mean_support",), "mean robust support"),
            (("reward_mean",), "mean reward"),
            (("support_correct", "support_wrong"), "support by outcome (solid: correct, dashed: wrong)"),
        )
        if any(k in row for run in runs for row in run.metrics for k in keys)
    ]
    if not panels:
        return None
    plt = setup_matplotlib()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    colours = {label: f"C{i}" for i, label in enumerate(_by_label(runs))}
    styles = ["-", "--", ":", "-."]
    for ax, (keys, title) in zip(axes.flat, panels, strict=True):
        seen: dict[str, int] = {}
        for run in runs:
            if not any(_metric_series([run], k)[0] for k in keys):
                continue
            idx = seen[run.label] = seen.get(run.label, -1) + 1
            for j, key in enumerate(keys):
                steps, values = _metric_series([run], key)
                if not steps:
                    continue
                style = styles[j] if len(keys) > 1 else styles[idx % len(styles)]
                suffix = f" ({key.split('_')[-1]})" if len(keys) > 1 else ""
                ax.plot(steps, _smooth(values, smooth), color=colours[run.label], linestyle=style,
                        label=run.name + suffix)  # fmt: skip
        ax.set_title(f"{title} (moving average over {smooth} steps)", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(title.split(" (")[0])
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------
# The report


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    test_sources: Sequence[str] | None = None,
    validation_sources: Sequence[str] = (),
    smooth: int = 5,
) -> Path:
    """Write `out_dir/report.md` (tables) and its PNG figures for the given run folders.

    `labels` (one per run) override the method names from config.yaml; `test_sources` (slugs,
    e.g. aime24) default to every evaluated source that is not a validation source.
    """
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"got {len(labels)} labels for {len(run_dirs)} runs; give one label per run")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    if not any(r.evals for r in runs):
        raise UserError(
            "none of the runs has evaluation results (RUN/eval/step-N/summary.json); run `sgsd eval`"
        )
    validation_sources = list(validation_sources)
    tests = list(test_sources) if test_sources else _sources_of(runs, validation_sources)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k_values = sorted(
        {res.get("k") for r in runs for s in r.evals.values() for res in s.get("results", {}).values()}
    )

    parts = ["# SGSD report", ""]
    parts += ["## Runs", "", "| Run | Method | Seed | Evaluated steps |", "|---|---|---|---|"]
    for run in runs:
        steps = ", ".join(str(s) for s in run.evals) or "–"
        parts.append(
            f"| `{run.path}` | {run.label} | {run.seed if run.seed is not None else '–'} | {steps} |"
        )
    columns = [*tests, "Avg."]
    parts += [
        "",
        f"## Main results (avg@{'/'.join(str(k) for k in k_values)}, %, best checkpoint on the test benchmarks)",
        "",
        "Each run's checkpoint is the one with the highest mean avg@k over the test benchmarks (the paper's",
        "protocol, which selects on the test set). Best in **bold**, second best <u>underlined</u>;",
        "several seeds: mean ± std.",
        "",
        markdown_table(table_rows(runs, tests), columns),
    ]
    if validation_sources:
        parts += [
            f"## Checkpoint chosen on held-out validation ({', '.join(validation_sources)})",
            "",
            "The checkpoint with the highest mean avg@k on the validation sources; test scores at that step.",
            "",
            markdown_table(table_rows(runs, tests, validation_sources), columns),
        ]
    figures = [
        ("Training dynamics: accuracy against step", plot_accuracy(runs, tests, out_dir / "accuracy.png")),
        ("Teacher polarity mix", plot_polarity(runs, out_dir / "polarity.png", smooth)),
        ("Support and reward", plot_signals(runs, out_dir / "signals.png", smooth)),
    ]
    parts += ["## Figures", ""]
    for title, path in figures:
        if path is not None:
            parts += [f"### {title}", "", f"![{title}]({path.name})", ""]
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(parts).rstrip() + "\n")
    json_rows = {"best_on_test": table_rows(runs, tests)}
    if validation_sources:
        json_rows["validation"] = table_rows(runs, tests, validation_sources)
    atomic_write_text(out_dir / "table.json", json.dumps(json_rows, indent=2) + "\n")
    return report
