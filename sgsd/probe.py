"""The teacher-signal probe: does a model + skill bank give SGSD's support estimate anything to say?

Before spending GPU days on SGSD one wants to know whether the robust support a~ of the retrieved
teachers separates correct from wrong rollouts at all. `run_probe` samples rollouts for a problem set
with the training sampler, grades them, scores them under the K retrieved teachers exactly as
training does (the trainer's own prompts, alignment and token mask), plus a content-free null teacher
and optional planted skill-mistake pairs, and `analyse` reports per support estimator
(`sgsd.objectives.SUPPORT_ESTIMATORS`):

* mean support on correct and on wrong rollouts;
* AUC = P(support of a correct rollout's decision > support of a wrong one's), ties counting 1/2,
  over (rollout, teacher) decisions, with a percentile bootstrap CI that resamples problems;
* the Table 2 polarity mix at eps_a and the mean |gap| that enters the support;
and, as confounds, the AUC of completion shortness (-length) and of the student's own mean token
log-prob, which need no teacher. A planted pair (role helpful / misleading / null) gets the same
figures and a verdict: its support should be higher on correct (helpful) or on wrong (misleading)
rollouts, or neither (null).

Problems go in rounds of `probe.chunk_problems`: sample, grade, score, save `rounds/round-NNN.pt`
(per-token gaps, expected gaps, masks, the rollouts), so an interrupted probe resumes and a slow one
can be analysed on the rounds it has finished (`sgsd probe --analyse-only`, no model loaded). The
output folder gets `probe.json`, `probe.md`, `probe.png` and `rollouts.jsonl` (every file atomic).
`analyse` is pure (tensors in, a dict out); `run_probe` is a thin driver over `sgsd.trainer.Trainer`.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgsd.errors import DataError
from sgsd.objectives import POLARITY_FRACTIONS, SUPPORT_ESTIMATORS, estimate_support
from sgsd.prompts import NULL_MISTAKE, NULL_SKILL, PlainMistake, PlainSkill

ROLES = ("helpful", "misleading", "null")
EXPECTED_SIDE = {"helpful": "correct", "misleading": "wrong", "null": "neither"}


# ---------------------------------------------------------------------------------------------------
# Planted pairs


@dataclass(frozen=True)
class PlantedPair:
    name: str
    role: str  # helpful | misleading | null
    skill: PlainSkill
    mistake: PlainMistake


def load_planted(path: str | Path) -> list[PlantedPair]:
    """Planted pairs from a JSON list (or {"pairs": [...]}) of {name, role, skill: {title, principle,
    when_to_apply}, mistake: {description, how_to_avoid}}; role is helpful, misleading or null."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"planted pairs file not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read planted pairs from {path}: {exc}") from exc
    items = data.get("pairs") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty list of planted pairs")
    pairs, names = [], set()
    for i, item in enumerate(items):
        where = f"{path}: pair {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where} must be an object")
        name, role = item.get("name"), item.get("role")
        if not isinstance(name, str) or not name or name in names:
            raise DataError(f"{where}: needs a unique non-empty 'name'")
        if role not in ROLES:
            raise DataError(f"{where} ({name}): 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        skill, mistake = item.get("skill"), item.get("mistake")
        try:
            pairs.append(
                PlantedPair(
                    name,
                    role,
                    PlainSkill(**{k: str(skill[k]) for k in ("title", "principle", "when_to_apply")}),
                    PlainMistake(**{k: str(mistake[k]) for k in ("description", "how_to_avoid")}),
                )
            )
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"{where} ({name}): needs skill {{title, principle, when_to_apply}} and "
                f"mistake {{description, how_to_avoid}} ({exc!r})"
            ) from exc
        names.add(name)
    return pairs


# ---------------------------------------------------------------------------------------------------
# Pure statistics


def auc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties 1/2 (Mann-Whitney); NaN without both classes."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _ranks(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def bootstrap_auc(scores, labels, groups, n: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile CI of `auc` resampling whole groups (problems) with replacement -> (lo, hi).

    Resamples that lack one class are skipped; (NaN, NaN) when fewer than half are usable."""
    scores, labels, groups = np.asarray(scores, float), np.asarray(labels, bool), np.asarray(groups)
    ids = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in ids]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pick = np.concatenate([members[j] for j in rng.integers(0, len(ids), len(ids))])
        value = auc(scores[pick], labels[pick])
        if not math.isnan(value):
            values.append(value)
    if len(values) < n / 2:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))


def polarity_mix(support, correct, threshold: float) -> dict[str, float]:
    """The Table 2 shares over decisions (support [n], correct [n]) at eps_a = threshold."""
    support, correct = np.asarray(support, float), np.asarray(correct, bool)
    n = max(1, len(support))
    up, down = support > threshold, support < -threshold
    return {
        "helpful_fraction": float((correct & up).sum() / n),
        "warning_fraction": float((~correct & down).sum() / n),
        "misleading_fraction": float((~correct & up).sum() / n),
        "over_suppressive_fraction": float((correct & down).sum() / n),
        "neutral_fraction": float((~up & ~down).sum() / n),
    }


def _separation(scores, labels, groups, n_boot: int, seed: int) -> dict[str, Any]:
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    lo, hi = bootstrap_auc(scores, labels, groups, n_boot, seed)
    return {
        "mean_correct": float(scores[labels].mean()) if labels.any() else float("nan"),
        "mean_wrong": float(scores[~labels].mean()) if (~labels).any() else float("nan"),
        "auc": auc(scores, labels),
        "auc_ci": [lo, hi],
        "n": int(len(scores)),
    }


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    i = 0
    while i < len(values):  # average ranks over ties (1-based)
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _side(ci) -> str:
    lo, hi = ci
    if lo > 0.5:
        return "correct"
    if hi < 0.5:
        return "wrong"
    return "neither"


# ---------------------------------------------------------------------------------------------------
# The analysis


def estimator_supports(
    delta, baseline, null_delta, mask, teacher_mask, retrieved, clip, eps
) -> dict[str, torch.Tensor]:
    """Support [R, J] of every teacher column under every estimator.

    `delta`, `baseline` [R, J, T]; `null_delta` [R, T]; `mask` [R, T]; `teacher_mask` [R, J];
    `retrieved` [J] bool marks the retrieved teachers. teacher_centred subtracts the mean over the
    row's valid retrieved teachers, from planted columns too (NaN columns when fewer than 2 are retrieved).
    """
    out = {}
    for name in ("paper", "expected", "null_relative"):
        out[name] = estimate_support(
            delta, mask, teacher_mask, name, clip, eps,
            baseline=baseline if name == "expected" else None,
            null_delta=null_delta if name == "null_relative" else None,
        )  # fmt: skip
    paper = out["paper"]  # [R, J]
    if int(retrieved.sum()) >= 2:
        w = (teacher_mask & retrieved.unsqueeze(0)).to(paper.dtype)  # [R, J]
        mean = (paper * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1.0)  # [R, 1]
        out["teacher_centred"] = torch.where(teacher_mask, paper - mean, 0.0)  # [R, J]
    else:
        out["teacher_centred"] = torch.full_like(paper, float("nan"))
    return out


def analyse(
    delta: torch.Tensor,
    baseline: torch.Tensor,
    null_delta: torch.Tensor,
    mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    columns: list[str],
    correct,
    problem,
    length,
    student_mean_logp,
    truncated,
    planted_roles: dict[str, str] | None = None,
    clip: float | None = 3.0,
    eps: float = 1e-8,
    threshold: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The probe's figures from scored rollouts (pure; see the module docstring).

    `delta` [R, J, T] gaps log p_T - log p_S of J teacher columns, `baseline` [R, J, T] their expected
    gaps under the sampler, `null_delta` [R, T] the null teacher's gaps, `mask` [R, T] the token mask,
    `teacher_mask` [R, J]; `columns` [J] names, "retrieved" for a retrieved slot, else a planted name
    (`planted_roles` maps it to its role). Per rollout: `correct`, `problem` (bootstrap group),
    `length`, `student_mean_logp`, `truncated`.
    """
    correct = np.asarray(correct, bool)
    problem = np.asarray(problem)
    planted_roles = planted_roles or {}
    retrieved = torch.tensor([c == "retrieved" for c in columns], dtype=torch.bool)
    tmask = teacher_mask.bool()
    supports = estimator_supports(delta, baseline, null_delta, mask, tmask, retrieved, clip, eps)
    live = mask.bool().unsqueeze(1) & (tmask & retrieved.unsqueeze(0)).unsqueeze(-1)  # [R, J, T]
    n_live = max(1, int(live.sum()))
    row_of = torch.arange(delta.shape[0]).unsqueeze(1).expand_as(tmask)  # [R, J]
    decisions = tmask & retrieved.unsqueeze(0)  # [R, J]
    rows = row_of[decisions].numpy()
    labels = correct[rows]
    groups = problem[rows]
    centred_gap = delta - baseline  # [R, J, T]
    gap_for = {"paper": delta, "expected": centred_gap, "null_relative": delta, "teacher_centred": delta}

    estimators = {}
    for k, name in enumerate(SUPPORT_ESTIMATORS):
        values = supports[name][decisions].numpy()
        if np.isnan(values).any() or len(values) == 0:
            estimators[name] = {"available": False}
            continue
        row = _separation(values, labels, groups, n_boot, seed + k)
        row.update(polarity_mix(values, labels, threshold))
        row["mean_abs_gap"] = float(gap_for[name].abs()[live].sum() / n_live)
        row["spearman_length"] = spearman(values, np.asarray(length, float)[rows])
        row["available"] = True
        estimators[name] = row

    planted = {}
    for j, name in enumerate(columns):
        if name == "retrieved":
            continue
        have = tmask[:, j].numpy()
        entry = {
            "role": planted_roles.get(name, "?"),
            "expected_side": EXPECTED_SIDE.get(planted_roles.get(name)),
        }
        for k, est in enumerate(SUPPORT_ESTIMATORS):
            values = supports[est][:, j].numpy()[have]
            if np.isnan(values).any() or len(values) == 0:
                entry[est] = {"available": False}
                continue
            row = _separation(values, correct[have], problem[have], n_boot, seed + 100 + k)
            row["side"] = _side(row["auc_ci"])
            row["as_expected"] = row["side"] == entry["expected_side"]
            row["available"] = True
            entry[est] = row
        planted[name] = entry

    per_rollout = np.ones(len(correct), bool)
    confounds = {
        "shortness": _separation(-np.asarray(length, float), correct, problem, n_boot, seed + 200),
        "student_mean_logp": _separation(np.asarray(student_mean_logp, float), correct, problem, n_boot,
                                         seed + 201),
    }  # fmt: skip
    kept = mask.bool()
    gaps = delta[live]
    base = baseline[live]
    return {
        "rollouts": int(len(correct)),
        "problems": int(len(np.unique(problem))),
        "accuracy": float(correct[per_rollout].mean()) if len(correct) else float("nan"),
        "truncated_fraction": float(np.asarray(truncated, bool).mean()) if len(correct) else float("nan"),
        "mean_length": float(np.asarray(length, float).mean()) if len(correct) else float("nan"),
        "kept_token_fraction": float(kept.float().mean()),
        "decisions": int(len(rows)),
        "threshold": threshold,
        "clip": clip,
        "gaps": {  # over kept tokens of retrieved teachers
            "mean_delta": float(gaps.mean()) if gaps.numel() else float("nan"),
            "mean_baseline": float(base.mean()) if base.numel() else float("nan"),
            "mean_abs_delta": float(gaps.abs().mean()) if gaps.numel() else float("nan"),
            "delta_quantiles": _quantiles(gaps),
            "centred_quantiles": _quantiles(gaps - base),
        },
        "estimators": estimators,
        "confounds": confounds,
        "planted": planted,
    }


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    if values.numel() == 0:
        return {}
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=values.dtype)
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(qs, torch.quantile(values.float(), qs.float()))}


# ---------------------------------------------------------------------------------------------------
# Rendering


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _fmt_auc(row) -> str:
    lo, hi = row["auc_ci"]
    if math.isnan(row["auc"]):
        return "n/a"
    return f"{row['auc']:.3f} [{lo:.3f}, {hi:.3f}]"


def _cost_lines(cost: dict) -> list[str]:
    if not cost:
        return []
    parts = [
        f"{phase} {c['wall_s'] / 60:.1f} min wall, {c['cpu_s'] / 60:.1f} CPU-min" for phase, c in cost.items()
    ]
    return ["Cost: " + "; ".join(parts) + "."]


def render_markdown(result: dict) -> str:
    """The probe's tables as markdown (also what the terminal shows)."""
    g = result["gaps"]
    lines = [
        f"{result['rollouts']} rollouts of {result['problems']} problems: accuracy "
        f"{result['accuracy']:.1%}, truncated {result['truncated_fraction']:.1%}, mean length "
        f"{result['mean_length']:.0f} tokens; {result['decisions']} (rollout, retrieved teacher) decisions; "
        f"eps_a = {result['threshold']}, c = {result['clip']}.",
        f"Gaps over kept tokens: mean Δ {_fmt(g['mean_delta'], 4)}, mean expected gap b "
        f"{_fmt(g['mean_baseline'], 4)}, mean |Δ| {g['mean_abs_delta']:.4f}.",
        *_cost_lines(result.get("cost", {})),
        "",
        "| estimator | support, correct | support, wrong | AUC [95% CI] | helpful | warning | misleading "
        "| over-suppr. | neutral | mean abs gap | Spearman with length |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["estimators"].items():
        if not row.get("available"):
            lines.append(f"| {name} | n/a | | | | | | | | | |")
            continue
        mix = (
            " | ".join(f"{row[k]:.2f}" for k in POLARITY_FRACTIONS[:4]) + f" | {row['neutral_fraction']:.2f}"
        )
        lines.append(
            f"| {name} | {_fmt(row['mean_correct'])} | {_fmt(row['mean_wrong'])} | {_fmt_auc(row)} | {mix} "
            f"| {row['mean_abs_gap']:.4f} | {_fmt(row['spearman_length'], 2)} |"
        )
    lines += ["", "Confounds (per rollout, no teacher):", "", "| score | correct | wrong | AUC [95% CI] |",
              "|---|---|---|---|"]  # fmt: skip
    for name, row in result["confounds"].items():
        label = {"shortness": "−length", "student_mean_logp": "student mean log p"}[name]
        lines.append(
            f"| {label} | {_fmt(row['mean_correct'], 2)} | {_fmt(row['mean_wrong'], 2)} | {_fmt_auc(row)} |"
        )
    if result["planted"]:
        lines += ["", "Planted pairs (support on correct vs wrong rollouts; side = where the AUC CI puts it):", "",
                  "| pair | role | estimator | correct | wrong | AUC [95% CI] | side | as expected |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, entry in result["planted"].items():
            for est in SUPPORT_ESTIMATORS:
                row = entry.get(est, {})
                if not row.get("available"):
                    continue
                lines.append(
                    f"| {name} | {entry['role']} | {est} | {_fmt(row['mean_correct'])} | {_fmt(row['mean_wrong'])} "
                    f"| {_fmt_auc(row)} | {row['side']} | {'yes' if row['as_expected'] else 'no'} |"
                )
    return "\n".join(lines) + "\n"


def render_png(result: dict, scores: dict, path: Path) -> None:
    """One figure: per estimator the support histograms by outcome, the per-token gaps, the AUCs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sgsd.fileio import atomic_write_bytes

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    correct = scores["correct"]
    for ax, name in zip(axes.flat[:4], SUPPORT_ESTIMATORS):
        values = scores["supports"].get(name)
        if values is None or np.isnan(values).any():
            ax.set_title(f"{name}: n/a")
            continue
        lo, hi = float(np.min(values)), float(np.max(values))
        bins = np.linspace(lo - 1e-9, hi + 1e-9, 30)
        ax.hist(values[correct], bins=bins, alpha=0.6, label="correct", density=True)
        ax.hist(values[~correct], bins=bins, alpha=0.6, label="wrong", density=True)
        for x in (-result["threshold"], result["threshold"]):
            ax.axvline(x, color="k", lw=0.8, ls="--")
        row = result["estimators"][name]
        ax.set_title(f"{name}: AUC {row['auc']:.3f} [{row['auc_ci'][0]:.2f}, {row['auc_ci'][1]:.2f}]")
        ax.set_xlabel("robust support ã (dashed: ±ε_a)")
        ax.legend()
    ax = axes.flat[4]
    bins = np.linspace(-1.0, 1.0, 81)
    ax.hist(np.clip(scores["token_delta"], -1, 1), bins=bins, alpha=0.6, label="Δ_t", density=True)
    ax.hist(np.clip(scores["token_centred"], -1, 1), bins=bins, alpha=0.6, label="Δ_t − b_t", density=True)
    ax.set_yscale("log")
    ax.set_title("per-token gaps, retrieved teachers (clipped to ±1)")
    ax.legend()
    ax = axes.flat[5]
    labels, values, lows, highs = [], [], [], []
    rows = [(n, r) for n, r in result["estimators"].items() if r.get("available")]
    rows += [("−length", result["confounds"]["shortness"]),
             ("student log p", result["confounds"]["student_mean_logp"])]  # fmt: skip
    for pname, entry in result["planted"].items():
        for est in ("paper", "expected"):
            if entry.get(est, {}).get("available"):
                rows.append((f"{pname} ({est})", entry[est]))
    for label, row in rows:
        labels.append(label)
        values.append(row["auc"])
        lows.append(row["auc"] - row["auc_ci"][0])
        highs.append(row["auc_ci"][1] - row["auc"])
    y = np.arange(len(labels))
    ax.errorbar(values, y, xerr=[lows, highs], fmt="o")
    ax.axvline(0.5, color="k", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_title("AUC correct vs wrong, 95% bootstrap CI")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_data(result: dict, scored: dict, clip, eps) -> dict:
    """What `render_png` draws, from the saved scores."""
    columns = scored["columns"]
    retrieved = torch.tensor([c == "retrieved" for c in columns], dtype=torch.bool)
    tmask = scored["teacher_mask"].bool()
    null_delta = scored["delta"][:, columns.index("null")]  # [R, T]
    supports = estimator_supports(
        scored["delta"], scored["baseline"], null_delta, scored["mask"], tmask, retrieved, clip, eps
    )
    decisions = tmask & retrieved.unsqueeze(0)
    rows = torch.arange(tmask.shape[0]).unsqueeze(1).expand_as(tmask)[decisions].numpy()
    live = scored["mask"].bool().unsqueeze(1) & decisions.unsqueeze(-1)
    return {
        "supports": {k: v[decisions].numpy() for k, v in supports.items()},
        "correct": np.asarray(scored["correct"], bool)[rows],
        "token_delta": scored["delta"][live].numpy(),
        "token_centred": (scored["delta"] - scored["baseline"])[live].numpy(),
    }


# ---------------------------------------------------------------------------------------------------
# The driver (over the trainer's own code paths)


def _fingerprint(cfg, planted: list[PlantedPair], round_index: int) -> str:
    """What a saved round depends on (not probe.problems: a longer probe reuses a shorter one's rounds)."""
    r, m, t = cfg.rollout, cfg.model, cfg.teachers
    keys = {
        "model": m.name,
        "dtype": m.dtype,
        "source": cfg.data.train_source,
        "train_size": cfg.data.train_size,
        "seed": cfg.train.seed,
        "chunk_problems": cfg.probe.chunk_problems,
        "rollouts": cfg.probe.rollouts,
        "round": round_index,
        "sampler": [r.temperature, r.top_k, r.top_p, r.max_new_tokens, r.enable_thinking],
        "teachers": [
            t.count,
            t.mode,
            t.enable_thinking,
            t.include_answer,
            cfg.skills.bank,
            cfg.skills.retrieval,
        ],
        "token_mask": cfg.objective.token_mask,
        "planted": [[p.name, p.role, p.skill, p.mistake] for p in planted],
    }
    return json.dumps(keys, sort_keys=True, default=repr)


def _rollout_row(r, index: int) -> dict:
    return {
        "problem_index": index,
        "problem_id": r.problem.id,
        "prompt_ids": r.prompt_ids,
        "completion_ids": r.completion_ids,
        "completion_text": r.completion_text,
        "finish_reason": r.finish_reason,
        "reward": r.reward,
    }


def problem_order(cfg, n_train: int) -> list[int]:
    """Training-set indices in the probe's order: a seeded shuffle, so the first N problems of a longer
    probe are those of a shorter one."""
    order = list(range(n_train))
    random.Random(cfg.train.seed).shuffle(order)
    return order


class PhaseClock:
    """Wall-clock and process CPU seconds of a `with` block (CPU seconds count every thread of the
    process, so on 2 cores they can be up to twice the wall time, and other load does not inflate
    them)."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu

    def seconds(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 1), "cpu_s": round(self.cpu_s, 1)}


def total_cost(rounds: list[dict]) -> dict[str, dict[str, float]]:
    """Per phase (sampling, scoring), the wall and CPU seconds summed over the rounds that recorded
    them (rounds saved before costs were recorded count as zero)."""
    total: dict[str, dict[str, float]] = {}
    for r in rounds:
        for phase, secs in r.get("cost", {}).items():
            for key, value in secs.items():
                total.setdefault(phase, {}).setdefault(key, 0.0)
                total[phase][key] = round(total[phase][key] + value, 1)
    return total


def sample_and_grade(trainer, indices: list[int], round_index: int) -> list:
    """`probe.rollouts` rollouts of each problem (training-set `indices`) with the training sampler
    (`Trainer._rollouts`, seeded as step `round_index`), graded by `Trainer._verify`."""
    problems = [trainer.train_problems[i] for i in indices]
    rollouts = trainer._rollouts(problems, round_index=round_index)
    trainer._verify(rollouts)
    return rollouts


def score_rollouts(trainer, rollouts: list, planted: list[PlantedPair], show=print) -> dict:
    """Per-token gaps of every rollout under the null teacher (column "null"), the planted pairs and its
    retrieved teachers ("retrieved"), with the expected gaps b_t; built with the trainer's teacher texts,
    alignment, teacher weights (`teacher.scoring`) and token mask, as training does (`sgsd.teaching`)."""
    from sgsd.prompts import teacher_prompt
    from sgsd.scoring import score_student, score_teachers_expected, teacher_prompt_ids
    from sgsd.teaching import completion_ids_of, teacher_texts, token_mask

    cfg = trainer.cfg
    r_cfg, t_cfg, o = cfg.rollout, cfg.teachers, cfg.objective
    k_max = t_cfg.count
    extra = [(NULL_SKILL, NULL_MISTAKE)] + [(p.skill, p.mistake) for p in planted]
    columns = ["null"] + [p.name for p in planted] + ["retrieved"] * k_max
    width = max(max(len(r.completion_ids) for r in rollouts), 1)
    rows = len(rollouts)
    delta = torch.zeros(rows, len(columns), width)  # [R, J, T]
    baseline = torch.zeros_like(delta)  # [R, J, T]
    mask = torch.zeros(rows, width, dtype=torch.bool)  # [R, T]
    student = torch.zeros(rows, width)  # [R, T]
    teacher_mask = torch.zeros(rows, len(columns), dtype=torch.bool)  # [R, J]
    mb = cfg.probe.micro_batch
    trainer.model.eval()
    for start in range(0, rows, mb):
        chunk = rollouts[start : start + mb]
        completion_ids = completion_ids_of(chunk, trainer.pad_id)
        texts = []
        for r in chunk:
            retrieved_texts, _scores, _pairs = teacher_texts(trainer.spec, r.problem, r.pairs, t_cfg)
            answer = r.problem.answer if t_cfg.include_answer else None
            texts.append([teacher_prompt(r.problem.question, s, m, answer=answer) for s, m in extra]
                         + list(retrieved_texts)[:k_max])  # fmt: skip
        teacher_ids = [
            teacher_prompt_ids(
                trainer.tokenizer,
                x,
                student_enable_thinking=r_cfg.enable_thinking,
                teacher_enable_thinking=t_cfg.enable_thinking,
                align_think_block=t_cfg.align_think_block,
            )
            for x in texts
        ]
        student_prompts = [r.prompt_ids for r in chunk]
        with torch.no_grad():
            t_logp, t_mask, base = score_teachers_expected(
                trainer.model,
                student_prompts,
                teacher_ids,
                completion_ids,
                trainer.pad_id,
                temperature=r_cfg.temperature,
                top_k=r_cfg.top_k,
                top_p=r_cfg.top_p,
                chunk_rows=t_cfg.chunk_rows,
                chunk_size=o.position_chunk,
                teacher_context=trainer.teacher.scoring,
            )  # fmt: skip  [b, J, T], [b, J], [b, J, T]
            s_logp, valid = score_student(
                trainer.model, student_prompts, completion_ids, trainer.pad_id, chunk_size=o.position_chunk
            )  # [b, T]
        keep = token_mask(trainer.tokenizer, completion_ids, valid, o.token_mask).cpu()  # [b, T]
        t, j = t_logp.shape[-1], t_logp.shape[1]
        sl = slice(start, start + len(chunk))
        delta[sl, :j, :t] = (t_logp - s_logp.unsqueeze(1)).cpu() * t_mask.cpu()[..., None]
        baseline[sl, :j, :t] = base.cpu()
        teacher_mask[sl, :j] = t_mask.cpu()
        mask[sl, :t] = keep
        student[sl, :t] = s_logp.cpu()
        show(f"  scored {min(start + mb, rows)}/{rows} rollouts")
    return {
        "columns": columns,
        "delta": delta,
        "baseline": baseline,
        "mask": mask,
        "teacher_mask": teacher_mask,
        "student_logp": student,
        "correct": [r.reward > 0 for r in rollouts],
        "length": [len(r.completion_ids) for r in rollouts],
        "truncated": [r.finish_reason == "length" for r in rollouts],
    }


def merge_rounds(rounds: list[dict]) -> dict:
    """Concatenate saved rounds along rollouts, padding the token axis (padding is masked out)."""
    width = max(r["delta"].shape[-1] for r in rounds)

    def pad(x):
        return torch.nn.functional.pad(x, (0, width - x.shape[-1]))

    out = {"columns": rounds[0]["columns"]}
    for key in ("delta", "baseline", "mask", "student_logp"):
        out[key] = torch.cat([pad(r[key]) for r in rounds])
    out["teacher_mask"] = torch.cat([r["teacher_mask"] for r in rounds])
    for key in ("correct", "length", "truncated", "problem"):
        out[key] = [v for r in rounds for v in r[key]]
    return out


def analyse_scored(scored: dict, planted_roles: dict, cfg) -> dict:
    """`analyse` over merged rounds: the "null" column is the null teacher, the others as named."""
    m = scored["mask"].float()
    mean_logp = (scored["student_logp"] * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # [R]
    null = scored["columns"].index("null")
    return analyse(
        scored["delta"], scored["baseline"], scored["delta"][:, null], scored["mask"], scored["teacher_mask"],
        scored["columns"], scored["correct"], scored["problem"], scored["length"], mean_logp.numpy(),
        scored["truncated"], planted_roles={"null": "null", **planted_roles}, clip=cfg.objective.clip,
        eps=cfg.objective.eps, threshold=cfg.objective.threshold, n_boot=cfg.probe.bootstrap, seed=cfg.train.seed,
    )  # fmt: skip


def write_outputs(result: dict, scored: dict, cfg, out_dir: Path) -> str:
    from sgsd.fileio import atomic_write_json, atomic_write_text

    text = render_markdown(result)
    atomic_write_json(out_dir / "probe.json", result)
    atomic_write_text(out_dir / "probe.md", "# Teacher-signal probe\n\n" + text)
    render_png(
        result, plot_data(result, scored, cfg.objective.clip, cfg.objective.eps), out_dir / "probe.png"
    )
    return text


def run_probe(cfg, out_dir: str | Path, analyse_only: bool = False, show=print) -> dict:
    """Sample, grade, score and analyse (see the module docstring); returns the result dict.

    Problems go `probe.chunk_problems` per round; each round is saved (`rounds/round-NNN.pt`) before
    the next starts, and saved rounds with the same settings are reused, so an interrupted probe
    resumes and `analyse_only` (no model loaded) reports on the rounds finished so far."""
    from sgsd.errors import UserError
    from sgsd.fileio import atomic_write_bytes, atomic_write_jsonl

    out_dir = Path(out_dir)
    planted = load_planted(cfg.probe.planted) if cfg.probe.planted else []
    if any(p.name in ("null", "retrieved") for p in planted):
        raise DataError("planted pair names 'null' and 'retrieved' are reserved")
    cfg.train.method = "sgsd"  # teachers are built as SGSD builds them
    cfg.rollout.num_generations = cfg.probe.rollouts
    cfg.skills.online_update = False
    # the probe evaluates nothing: no held-out sets are loaded, so problems are drawn from the training
    # set without the contamination guard (which only matters for training)
    cfg.data.eval_sources = []
    size = cfg.probe.chunk_problems
    n_rounds = math.ceil(cfg.probe.problems / size)
    rounds: dict[int, dict] = {}
    for i in range(n_rounds):
        path = out_dir / "rounds" / f"round-{i:03d}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)  # tensors, lists, strings: no pickled code
            if saved.get("fingerprint") == _fingerprint(cfg, planted, i):
                rounds[i] = saved
    if rounds:
        show(f"reusing {len(rounds)} scored round(s) from {out_dir / 'rounds'}")
    missing = [i for i in range(n_rounds) if i not in rounds]
    if missing and not analyse_only:
        from sgsd.trainer import Trainer

        trainer = Trainer(cfg, out_dir)
        order = problem_order(cfg, len(trainer.train_problems))
        if cfg.probe.problems > len(order):
            raise DataError(
                f"probe.problems={cfg.probe.problems} but the training set has {len(order)} problems"
            )
        for i in missing:
            indices = order[i * size : min((i + 1) * size, cfg.probe.problems)]
            show(
                f"round {i + 1}/{n_rounds}: sampling {cfg.probe.rollouts} rollouts for each of {len(indices)} problems"
            )
            with PhaseClock() as sampling:
                rollouts = sample_and_grade(trainer, indices, i)
            with PhaseClock() as scoring:
                scored = score_rollouts(trainer, rollouts, planted, show)
            scored["cost"] = {"sampling": sampling.seconds(), "scoring": scoring.seconds()}
            scored["problem"] = [indices[r.group] for r in rollouts]
            scored["rollouts"] = [_rollout_row(r, indices[r.group]) for r in rollouts]
            scored["fingerprint"] = _fingerprint(cfg, planted, i)
            buffer = io.BytesIO()
            torch.save(scored, buffer)
            atomic_write_bytes(out_dir / "rounds" / f"round-{i:03d}.pt", buffer.getvalue())
            rounds[i] = scored
            done = [r for k in sorted(rounds) for r in rounds[k]["correct"]]
            show(f"round {i + 1} saved: {len(done)} rollouts so far, accuracy {np.mean(done):.1%}")
    if not rounds:
        raise UserError(
            f"no scored rounds in {out_dir / 'rounds'} for these settings; run without --analyse-only"
        )
    kept = [rounds[k] for k in sorted(rounds)]
    atomic_write_jsonl(out_dir / "rollouts.jsonl", [row for r in kept for row in r["rollouts"]])
    scored = merge_rounds(kept)
    result = analyse_scored(scored, {p.name: p.role for p in planted}, cfg)
    result["rounds"] = f"{len(kept)} of {n_rounds}"
    result["cost"] = total_cost(kept)
    text = write_outputs(result, scored, cfg, out_dir)
    show(text)
    show(f"written: {out_dir / 'probe.json'}, probe.md, probe.png, rollouts.jsonl")
    return result


__all__ = [
    "PlantedPair",
    "analyse",
    "auc",
    "bootstrap_auc",
    "load_planted",
    "polarity_mix",
    "render_markdown",
    "run_probe",
]
