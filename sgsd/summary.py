"""The closing summary of `sgsd train` and `sgsd eval --run`: what a run did, read from its folder.

    print(format_summary(run_summary("runs/demo", wall_s=512.0), title="sgsd train"))

Everything comes from the run folder's files, so the summary is the same after a resume and can be
printed for any finished run: `config.yaml` (method, planned steps, trackers), `metrics.jsonl` (steps
done, training time, the teacher-polarity mix), `eval/step-N/summary.json` (held-out accuracy before
and after training, the best checkpoint), `eval/selection.json` (validation sources chosen by
`sgsd eval --run ... --validation-sources`), `checkpoints/` and `report/*.png`.

- held-out before -> after: avg@k per test source and their mean at step 0 (the base model) and at the
  last evaluated step;
- best: the evaluated step (other than 0) with the highest mean avg@k over the test sources (the paper's
  protocol), shown when more than one trained step was evaluated; and, where validation sources exist,
  the step with the highest mean avg@k on them, with its test mean;
- polarity mix: the mean over logged steps of each step's fractions (helpful, warning, misleading,
  over-suppressive, neutral), and the last step's.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from sgsd.evaluate import list_checkpoints, read_summaries, select_checkpoints, step_dir_name
from sgsd.fileio import read_jsonl
from sgsd.objectives import POLARITY_FRACTIONS

PLOTS = ("accuracy.png", "polarity.png", "signals.png")
POLARITY_NAMES = ("helpful", "warning", "misleading", "over-suppressive", "neutral")


def write_run_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's report into `out_dir` (default RUN/report): report.md and its PNG plots once the
    run has evaluations, else only the training-signal plots. Returns the PNG paths written."""
    from sgsd.report import load_run, plot_polarity, plot_signals, write_report

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    run = load_run(run_dir)
    if run.evals:
        write_report([run_dir], out)
        return [out / name for name in PLOTS if (out / name).is_file()]
    out.mkdir(parents=True, exist_ok=True)
    made = [plot_polarity([run], out / "polarity.png"), plot_signals([run], out / "signals.png")]
    return [p for p in made if p is not None]


def _held_out(summary: dict, sources: list[str]) -> dict:
    results = summary.get("results", {})
    avg = {s: results[s]["avg@k"] for s in sources if s in results}
    return {"avg": avg, "mean": statistics.fmean(avg.values()) if avg and len(avg) == len(sources) else None}


def run_summary(run_dir: str | Path, wall_s: float | None = None) -> dict:
    """The facts of the closing summary as a dict (see the module docstring); `wall_s` is the calling
    command's own wall time, which no file records."""
    run_dir = Path(run_dir)
    config = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text("utf-8")) or {}
    train = config.get("train", {}) or {}
    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    rows = [r for r in rows if "step" in r]
    evals = read_summaries(run_dir / "eval")
    validation: list[str] = []
    selection_file = run_dir / "eval" / "selection.json"
    if selection_file.is_file():
        chosen = (json.loads(selection_file.read_text("utf-8")) or {}).get("validation") or {}
        validation = list(chosen.get("selected_by") or [])
    sources: list[str] = []
    for summary in evals.values():
        sources += [s for s in summary.get("results", {}) if s not in sources and s not in validation]
    ks = sorted({r.get("k") for s in evals.values() for r in s.get("results", {}).values()} - {None})

    out: dict = {
        "run_dir": str(run_dir),
        "method": train.get("method"),
        "steps_done": int(rows[-1]["step"]) if rows else 0,
        "steps_planned": train.get("steps"),
        "train_time_s": float(rows[-1].get("train_time_s", 0.0)) if rows else None,
        "wall_s": wall_s,
        "sources": sources,
        "k": ks,
        "before": None,
        "after": None,
        "best": None,
        "validation": None,
        "polarity": None,
        "polarity_last": None,
    }
    if evals:
        if 0 in evals:
            out["before"] = {"step": 0, **_held_out(evals[0], sources)}
        last = max(evals)
        if last != 0 or 0 not in evals:
            out["after"] = {"step": last, **_held_out(evals[last], sources)}
        trained = [s for s in evals if s != 0]
        picked = select_checkpoints(evals, sources, validation)
        if len(trained) > 1 and picked["best_on_test"]:
            out["best"] = _with_checkpoint(run_dir, picked["best_on_test"])
        if validation and picked["validation"]:
            out["validation"] = _with_checkpoint(run_dir, picked["validation"])
    polar = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in POLARITY_FRACTIONS)]
    if polar:
        out["polarity"] = {
            name: statistics.fmean(r[k] for r in polar)
            for name, k in zip(POLARITY_NAMES, POLARITY_FRACTIONS, strict=True)
        }
        out["polarity_last"] = {
            name: polar[-1][k] for name, k in zip(POLARITY_NAMES, POLARITY_FRACTIONS, strict=True)
        }
        out["polarity_steps"] = len(polar)
    out["checkpoints"] = sorted(list_checkpoints(run_dir))
    out["plots"] = [str(run_dir / "report" / n) for n in PLOTS if (run_dir / "report" / n).is_file()]
    out["trackers"] = list(train.get("report_to") or [])
    out["next"] = [f"sgsd report {run_dir} --out {run_dir / 'report'}", f"sgsd eval --run {run_dir}"]
    return out


def _with_checkpoint(run_dir: Path, chosen: dict) -> dict:
    ckpt = run_dir / "checkpoints" / step_dir_name(chosen["step"])
    return {
        "step": chosen["step"],
        "selected_by": chosen["selected_by"],
        "score": chosen["selection_score"],
        "test_mean": chosen["test_mean"],
        "checkpoint": str(ckpt) if ckpt.is_dir() else None,
    }


def duration(seconds: float) -> str:
    """42.0 -> '42 s', 252 -> '4 min 12 s', 3720 -> '1 h 02 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _tracker_line(name: str, run_dir: str) -> str:
    return {
        "tensorboard": f"tensorboard: tensorboard --logdir {Path(run_dir) / 'tensorboard'}",
        "wandb": f"wandb: {Path(run_dir) / 'wandb'} (run offline? upload it with wandb sync)",
        "mlflow": "mlflow: mlflow ui (store: $MLFLOW_TRACKING_URI, default ./mlflow.db)",
        "trackio": "trackio: trackio show --project sgsd",
    }.get(name, name)


def format_summary(s: dict, title: str = "sgsd train") -> str:
    """The summary as aligned text lines (see `run_summary`)."""
    lines = [f"== {title}: summary " + "=" * max(4, 60 - len(title))]

    def add(label: str, text: str) -> None:
        lines.append(f"{label:<12}{text}")

    planned = s["steps_planned"]
    steps = f"{s['steps_done']} of {planned} steps" if planned is not None else f"{s['steps_done']} steps"
    add("run", f"{s['run_dir']}  ({s['method'] or 'unknown method'}, {steps})")
    times = []
    if s["train_time_s"] is not None:
        times.append(f"{duration(s['train_time_s'])} in training steps")
    if s["wall_s"] is not None:
        times.append(f"{duration(s['wall_s'])} wall time for this command")
    if times:
        add("time", "; ".join(times))
    k = "/".join(str(v) for v in s["k"]) or "k"
    before, after = s["before"], s["after"]
    if before is None and after is None:
        add("held-out", "not evaluated (set data.eval_sources, or run the eval command below)")
    else:
        heads = [f"step {x['step']}" for x in (before, after) if x is not None]
        add("held-out", f"avg@{k}, " + " -> ".join(heads))
        width = max(len(src) for src in [*s["sources"], "mean"])
        for src in s["sources"] + (["mean"] if len(s["sources"]) > 1 else []):
            vals = [x["mean"] if src == "mean" else x["avg"].get(src) for x in (before, after) if x]
            text = " -> ".join("–" if v is None else f"{v:.3f}" for v in vals)
            if len(vals) == 2 and None not in vals:
                text += f"  ({vals[1] - vals[0]:+.3f})"
            add("", f"  {src:<{width}}  {text}")
    for label, pick in (("best", s["best"]), ("validation", s["validation"])):
        if pick is None:
            continue
        by = "the test sources" if label == "best" else ", ".join(pick["selected_by"])
        where = pick["checkpoint"] or "no checkpoint saved at that step"
        text = f"step {pick['step']} by mean avg@{k} on {by}: {pick['score']:.3f}"
        if label == "validation" and pick["test_mean"] is not None:
            text += f" (test mean {pick['test_mean']:.3f})"
        add(label, f"{text}; {where}")
    if s["polarity"]:
        mix = " · ".join(f"{name} {v:.2f}" for name, v in s["polarity"].items())
        add("polarity", f"{mix}  (mean of {s['polarity_steps']} steps)")
        last = " · ".join(f"{name} {v:.2f}" for name, v in s["polarity_last"].items())
        add("", f"{last}  (last step)")
    ckpts = s["checkpoints"]
    if ckpts:
        shown = ", ".join(str(c) for c in ckpts[-6:])
        more = f" (and {len(ckpts) - 6} earlier)" if len(ckpts) > 6 else ""
        add("checkpoints", f"{Path(s['run_dir']) / 'checkpoints'}: steps {shown}{more}")
    else:
        add("checkpoints", "none")
    if s["plots"]:
        add("plots", f"{Path(s['plots'][0]).parent}: " + ", ".join(Path(p).name for p in s["plots"]))
    else:
        add("plots", "not written yet (sgsd report, below)")
    for i, name in enumerate(s["trackers"]):
        add("trackers" if i == 0 else "", _tracker_line(name, s["run_dir"]))
    for i, cmd in enumerate(s["next"]):
        add("next" if i == 0 else "", cmd)
    return "\n".join(lines)
