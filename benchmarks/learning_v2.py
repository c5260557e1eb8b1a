"""Learning benchmark, second round (issue 18): does SGSD learn where we can run it, at equal compute?

Phases, each resumable and skipped where its outputs exist; results under --out (default
benchmarks/results/learning-v2/; the run folders inside are git-ignored):

  task    For each candidate task (--task, a data source) x completion budget (--max-new-tokens), sample
          --task-problems training problems x --task-rollouts rollouts with the training sampler and
          grade them: success rate, truncation, problems with mixed outcomes. Chooses the candidate with
          success in [30%, 70%] and <= 10% truncated, nearest 50% (ties: fewer tokens) -> task/choice.json.
  skills  For the passing tasks (at most --skills-tasks) x banks (--bank): Base and Base+Skill avg@k on
          the validation split (`sgsd eval --split validation [--with-skills]`) and the signal probe
          (`sgsd probe`); chooses the (task, bank) where skills in context help and the probe's
          estimator (--estimator) separates outcomes (`choose_skills`) -> skills/choice.json.
  lr      Per method (GRPO, OPSD, SGSD; SGSD's ablations take SGSD's choice, `lr_owner`): a short
          calibration run (CPU-seconds per step, for the linear schedule's horizon), then one run per
          learning rate (--lrs) at --lr-budget-cpu-min, seed --lr-seed, evaluated on the
          validation split only (eval.test_in_loop=false); `choose_lr` -> lr/choice.json.
  grid    Variants x seeds at the chosen settings, --budget-cpu-min of training CPU time each, test and
          validation avg@k every --eval-every-cpu-min -> runs/VARIANT/seed-S/ (git-ignored, checkpoints
          included); a finished run's record (config, metrics, evaluation summaries) -> grid/VARIANT/seed-S/,
          committed, so the grid can span sessions on fresh machines. --stop-by HH:MM starts no run that
          would not finish by then.
  report  From the records: table.md / table.json, learning.png (test avg@k against training CPU-minutes),
          diagnostics.md / diagnostics.png / evidence.png, and the minimum detectable difference.

Budgets are process CPU-seconds of training (`train.cpu_budget_s`: every thread of the training process,
evaluation excluded), so other load on the machine does not change how far a run gets. The schedule is
the paper's linear decay to 0 over `train.steps`, set to --steps-margin x the budget's steps at the
calibrated CPU-seconds per step, so the CPU budget (not the step count) ends a run.

    python benchmarks/learning_v2.py task                                  # then: skills, lr, grid, report
    python benchmarks/learning_v2.py all --seeds 0,1,2                     # every phase in turn
    python benchmarks/learning_v2.py grid --dry-run                        # print the train commands
    python benchmarks/learning_v2.py report                                # tables and plots from the runs
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from statistics import NormalDist

# torch's worker threads wait passively (before torch loads here and in every run this script starts): with the
# default spin-waiting, a run that shares the 2 cores with another busy process burns 3-4x the CPU-seconds for
# the same work, so CPU budgets would buy less (benchmarks/README.md, "Learning, second round")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the first round's helpers (learning.py)
import learning as r1  # noqa: E402

ROOT = r1.ROOT
DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "learning_v2.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "learning-v2"
HAND_BANK = ROOT / "benchmarks" / "configs" / "banks" / "chain_sum_hand.json"
PHASES = ("task", "skills", "lr", "grid", "report")
DEFAULT_TASKS = (
    "reasoning_gym:chain_sum",
    "reasoning_gym:chain_sum?min_terms=2&max_terms=4&max_digits=3",
    "reasoning_gym:chain_sum?min_terms=2&max_terms=3&max_digits=2",
)
PAPER_LR = 5e-6
# OPSD as the official code runs it (sgsd/configs/paper/*/opsd.yaml, docs/FIDELITY.md); 8 problems a step
# in micro-batches of 4 (official: 32 in 4s) against SGSD's 4 (official 16): the paper's 2:1 ratio
OPSD = [
    "train.method=opsd",
    "teachers.count=1",
    "teachers.mode=frozen",
    "teachers.answer_template=official",
    "objective.loss=forward_kl",
    "objective.opsd_temperature=1.1",
    "objective.opsd_clip=0.05",
    "objective.opsd_clip_scope=entry",
    "objective.opsd_mask=completion",
    "objective.opsd_aggregation=token_mean",
    "train.batch_size=8",
    "train.micro_batch_size=4",
]
SIGNALS_V2 = [
    *r1.SIGNALS,
    ("support_correct", "mean support, correct rollouts"),
    ("support_wrong", "mean support, wrong rollouts"),
    ("mixed_group_fraction", "GRPO: groups with mixed rewards"),
]


def variants(group_size: int = 8, estimator: str = "null_relative") -> dict[str, tuple[str, list[str]]]:
    """variant -> (label, overrides). GRPO as the paper's GRPO configs (sampler T 1.2 without top-p/k,
    mu = 2 passes, sequence mean over every sampled token, LoRA dropout 0.05, clipping 1.0) with
    `group_size` completions for each of 2 prompts a step."""
    grpo = [
        "train.method=grpo",
        f"rollout.num_generations={group_size}",
        "train.batch_size=2",
        "train.micro_batch_size=1",
        "rollout.temperature=1.2",
        "rollout.top_p=1.0",
        "rollout.top_k=0",
        "objective.grpo_iterations=2",
        "objective.grpo_aggregation=sequence_mean",
        "objective.grpo_mask=completion",
        "model.lora_dropout=0.05",
        "train.max_grad_norm=1.0",
    ]
    out = {
        "grpo": (f"GRPO (G={group_size})", grpo),
        "opsd": ("OPSD", list(OPSD)),
        "sgsd": ("SGSD", ["train.method=sgsd"]),
        f"sgsd_{estimator}": (
            f"SGSD ({estimator} support)",
            ["train.method=sgsd", f"objective.support_estimator={estimator}"],
        ),
        "sgsd_no_polarity": ("SGSD w/o polarity", ["train.method=sgsd", "objective.use_polarity=false"]),
    }
    if estimator == "paper":  # the same run as sgsd
        del out["sgsd_paper"]
    return out


# ---------------------------------------------------------------------------------------------------
# Pure rules


def minimum_detectable_difference(
    p: float, samples: int, seeds: int, seed_sd: float = 0.0, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true difference (in points) between two variants' means over `seeds` seeds that a
    two-sided z-test at level `alpha` detects with probability `power`:

        MDD = (z_{1-alpha/2} + z_{power}) * sqrt(2 * (p (1 - p) / samples + seed_sd^2) / seeds)

    with `samples` = held-out problems x k graded samples per evaluation, p the accuracy (binomial
    variance of one run's avg@k; an upper bound for a fixed problem set, whose per-problem variances
    p_i (1 - p_i) average to at most p (1 - p)) and `seed_sd` the between-seed standard deviation of a
    run's score (a fraction; 0 when not measured)."""
    if not 0 <= p <= 1 or samples < 1 or seeds < 1:
        raise ValueError(f"need 0 <= p <= 1, samples >= 1, seeds >= 1; got {p}, {samples}, {seeds}")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return 100 * z * math.sqrt(2 * (p * (1 - p) / samples + seed_sd**2) / seeds)


def passing_tasks(results: Sequence[dict], success=(0.3, 0.7), max_truncated: float = 0.1) -> list[dict]:
    """The candidates whose success rate is in [success] and truncated fraction <= max_truncated, nearest
    50% success first; ties go to the smaller completion budget."""
    lo, hi = success
    ok = [r for r in results if lo <= r["success"] <= hi and r["truncated_fraction"] <= max_truncated]
    return sorted(ok, key=lambda r: (round(abs(r["success"] - 0.5), 9), r["max_new_tokens"]))


def choose_task(results: Sequence[dict], success=(0.3, 0.7), max_truncated: float = 0.1) -> dict | None:
    """The first of `passing_tasks`; None when no candidate passes."""
    return next(iter(passing_tasks(results, success, max_truncated)), None)


def choose_skills(rows: Sequence[dict]) -> dict | None:
    """The (task, bank) row to train with. Rows carry `gain` (Base+Skill - Base validation avg@k, points)
    and `auc_lo` (lower end of the probe estimator's AUC interval). Preference: both skills help
    (gain > 0) and the estimator separates outcomes (auc_lo > 0.5); then either; then the higher AUC,
    then the larger gain. None without rows."""

    def key(r):
        helps, separates = _num(r.get("gain")) > 0, _num(r.get("auc_lo")) > 0.5
        return (helps and separates, helps or separates, _num(r.get("auc")), _num(r.get("gain")))

    return max(rows, key=key) if rows else None


def choose_lr(scores: dict[float, float], paper_lr: float = PAPER_LR, tie: float = 0.0) -> float:
    """The learning rate with the best validation score; scores within `tie` points of the best count as
    tied, and a tie goes to the paper's learning rate if it is among them, else to the smallest."""
    valid = {lr: s for lr, s in scores.items() if not math.isnan(s)}
    if not valid:
        raise ValueError("no learning rate has a validation score")
    best = max(valid.values())
    tied = sorted(lr for lr, s in valid.items() if s >= best - tie)
    return paper_lr if paper_lr in tied else tied[0]


def lr_owner(variant: str) -> str:
    """The variant whose learning-rate search `variant` uses: SGSD's ablations (another support estimator,
    no polarity) share SGSD's, as the paper's ablations share the full method's hyperparameters; GRPO,
    OPSD and SGSD are searched each."""
    return "sgsd" if variant.startswith("sgsd_") else variant


def _num(x) -> float:
    return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# ---------------------------------------------------------------------------------------------------
# Shared pieces


def slug(text: str) -> str:
    from sgsd.evaluate import source_slug

    return source_slug(text)


def task_overrides(task: str, max_new_tokens: int) -> list[str]:
    """The data source for training and evaluation (quoted: sources hold ? & =) and the token budgets."""
    return [
        f"data.train_source={json.dumps(task)}",
        f"data.eval_sources=[{json.dumps(task)}]",
        f"rollout.max_new_tokens={max_new_tokens}",
        f"eval.max_new_tokens={max_new_tokens}",
    ]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def need(path: Path, phase: str) -> dict:
    data = read_json(path)
    if data is None:
        raise SystemExit(f"{path} not found: run the {phase} phase first (or pass its choice as a flag)")
    return data


def chosen(cli) -> dict:
    """The task, completion budget and bank the later phases use: the flags, else the phases' choices."""
    task = cli.use_task or need(cli.out / "task" / "choice.json", "task")["task"]
    tokens = cli.use_max_new_tokens or need(cli.out / "task" / "choice.json", "task")["max_new_tokens"]
    bank = cli.use_bank or need(cli.out / "skills" / "choice.json", "skills")["bank"]
    return {"task": task, "max_new_tokens": int(tokens), "bank": bank}


def setting_overrides(cli) -> list[str]:
    c = chosen(cli)
    return [*task_overrides(c["task"], c["max_new_tokens"]), f"skills.bank={c['bank']}"]


def run_cli(cmd: list[str], log_path: Path, name: str) -> bool:
    """Run an `sgsd` subcommand with its output in `log_path`; False (and a message) on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    print(f"[run] {name}", flush=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        print(f"[failed] {name}: exit {rc}; see {log_path}", flush=True)
    return rc == 0


def sgsd_cmd(sub: str, config: Path, overrides: Sequence[str], *args: str) -> list[str]:
    return [sys.executable, "-m", "sgsd", sub, "-c", str(config), *args, *overrides]


def ignore_runs(folder: Path) -> None:
    from sgsd.fileio import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / ".gitignore", "*\n")


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        "",
    ]


# ---------------------------------------------------------------------------------------------------
# task


def sample_task(config: Path, overrides: Sequence[str], out_dir: Path, problems: int, rollouts: int) -> dict:
    """Success, truncation and mixed-outcome problems of `rollouts` rollouts for each of the first
    `problems` training problems (the probe's seeded order), with the training sampler (in-process)."""
    from sgsd.config import load_config
    from sgsd.probe import problem_order, sample_and_grade
    from sgsd.trainer import Trainer

    cfg = load_config(
        config,
        [
            *overrides,
            "train.method=sgsd",
            f"rollout.num_generations={rollouts}",
            "train.report_to=[]",
            "train.progress=false",
        ],
    )
    cpu, wall = time.process_time(), time.time()
    trainer = Trainer(cfg, out_dir)
    indices = problem_order(cfg, len(trainer.train_problems))[:problems]
    sampled = sample_and_grade(trainer, indices, 0)
    outcomes: dict[int, set] = {}
    for r in sampled:
        outcomes.setdefault(r.group, set()).add(r.reward > 0)
    n = len(sampled)
    result = {
        "task": cfg.data.train_source,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "problems": len(indices),
        "rollouts": n,
        "success": sum(r.reward > 0 for r in sampled) / n,
        "truncated_fraction": sum(r.finish_reason == "length" for r in sampled) / n,
        "mixed_problem_fraction": sum(len(o) > 1 for o in outcomes.values()) / len(outcomes),
        "mean_completion_tokens": sum(len(r.completion_ids) for r in sampled) / n,
        "cpu_s": round(time.process_time() - cpu, 1),
        "wall_s": round(time.time() - wall, 1),
    }
    del trainer, sampled
    gc.collect()
    return result


def phase_task(cli) -> int:
    from sgsd.fileio import atomic_write_json, atomic_write_text

    root = cli.out / "task"
    ignore_runs(root / "candidates")
    results = []
    for task in cli.task:
        for tokens in cli.max_new_tokens:
            folder = root / "candidates" / f"{slug(task)}-t{tokens}"
            result = read_json(folder / "result.json")
            if result is None:
                print(
                    f"[task] {task}, {tokens} tokens: {cli.task_problems} x {cli.task_rollouts} rollouts",
                    flush=True,
                )
                overrides = [*cli.set, *task_overrides(task, tokens)]
                result = sample_task(cli.config, overrides, folder, cli.task_problems, cli.task_rollouts)
                atomic_write_json(folder / "result.json", result)
            else:
                print(f"[skip] {task}, {tokens} tokens: {folder / 'result.json'}", flush=True)
            results.append(result)
    choice = choose_task(results, cli.success, cli.max_truncated)
    rows = [
        [
            r["task"],
            r["max_new_tokens"],
            f"{100 * r['success']:.1f}",
            f"{100 * r['truncated_fraction']:.1f}",
            f"{100 * r['mixed_problem_fraction']:.0f}",
            f"{r['mean_completion_tokens']:.0f}",
            f"{r['cpu_s'] / 60:.1f}",
            "**chosen**" if r is choice else "",
        ]
        for r in results
    ]
    lines = [
        "# Task and completion budget (training sampler, base model)",
        "",
        f"{cli.task_problems} training problems x {cli.task_rollouts} rollouts per candidate. Rule: success "
        f"in [{cli.success[0]:.0%}, {cli.success[1]:.0%}] and truncated <= {cli.max_truncated:.0%}, nearest "
        "50% success (ties: fewer tokens). Mixed: problems whose rollouts were both right and wrong.",
        "",
        *_md_table(
            ["Task", "Tokens", "Success %", "Truncated %", "Mixed %", "Mean tokens", "CPU-min", ""], rows
        ),
    ]
    passing = passing_tasks(results, cli.success, cli.max_truncated)
    atomic_write_json(root / "results.json", {"results": results, "passing": passing, "choice": choice})
    atomic_write_text(root / "results.md", "\n".join(lines))
    print("\n".join(lines), flush=True)
    if choice is None:
        print("no candidate passes the rule: add tasks or budgets (--task, --max-new-tokens)", flush=True)
        return 1
    atomic_write_json(
        root / "choice.json", {"task": choice["task"], "max_new_tokens": choice["max_new_tokens"]}
    )
    return 0


# ---------------------------------------------------------------------------------------------------
# skills


def skills_tasks(cli) -> list[dict]:
    """The tasks the skills phase compares: --use-task, else the passing candidates of the task phase,
    nearest 50% success first (at most --skills-tasks)."""
    if cli.use_task:
        tokens = cli.use_max_new_tokens or need(cli.out / "task" / "choice.json", "task")["max_new_tokens"]
        return [{"task": cli.use_task, "max_new_tokens": int(tokens)}]
    passing = need(cli.out / "task" / "results.json", "task")["passing"][: cli.skills_tasks]
    if not passing:
        raise SystemExit("no task passed the task phase's rule; pass --use-task")
    return [{"task": r["task"], "max_new_tokens": r["max_new_tokens"]} for r in passing]


def phase_skills(cli) -> int:
    from sgsd.fileio import atomic_write_json

    root = cli.out / "skills"
    ignore_runs(root / "runs")
    rows, failed = [], False
    for t in skills_tasks(cli):
        tdir = root / "runs" / f"{slug(t['task'])}-t{t['max_new_tokens']}"
        common = [*cli.set, *task_overrides(t["task"], t["max_new_tokens"])]
        base = tdir / "base"
        if read_json(base / "summary.json") is None:
            failed |= not run_cli(
                sgsd_cmd("eval", cli.config, common, "--split", "validation", "--out", str(base)),
                base / "eval.log",
                f"Base, {t['task']}",
            )
        for bank in cli.bank:
            bdir = tdir / slug(bank)
            with_bank = [*common, f"skills.bank={bank}"]
            if read_json(bdir / "base_skill" / "summary.json") is None:
                cmd = sgsd_cmd(
                    "eval",
                    cli.config,
                    with_bank,
                    "--split",
                    "validation",
                    "--with-skills",
                    "--out",
                    str(bdir / "base_skill"),
                )
                failed |= not run_cli(
                    cmd, bdir / "base_skill" / "eval.log", f"Base+Skill, {t['task']}, {bank}"
                )
            if read_json(bdir / "probe" / "probe.json") is None:
                probe = [
                    *with_bank,
                    f"probe.problems={cli.probe_problems}",
                    f"probe.rollouts={cli.probe_rollouts}",
                ]
                cmd = sgsd_cmd("probe", cli.config, probe, "-o", str(bdir / "probe"))
                failed |= not run_cli(cmd, bdir / "probe" / "probe.log", f"probe, {t['task']}, {bank}")
            rows.append(skills_row(t, bank, base, bdir, cli.estimator))
    choice = choose_skills([r for r in rows if not math.isnan(r["gain"])])
    write_skills(root, rows, choice, cli.estimator)
    if choice is not None and not failed:
        atomic_write_json(root / "choice.json", {k: choice[k] for k in ("task", "max_new_tokens", "bank")})
    return 1 if failed or choice is None else 0


def skills_row(t: dict, bank: str, base: Path, bdir: Path, estimator: str) -> dict:
    """Validation avg@k of Base and Base+Skill (points) and the probe's AUC of `estimator` and of paper."""
    plain, skill = read_json(base / "summary.json"), read_json(bdir / "base_skill" / "summary.json")
    probe = read_json(bdir / "probe" / "probe.json") or {}
    base_acc = r1.mean_avg_at_k(plain) if plain else math.nan
    skill_acc = r1.mean_avg_at_k(skill) if skill else math.nan
    est = probe.get("estimators", {})
    row = {
        **t,
        "bank": bank,
        "base": base_acc,
        "base_skill": skill_acc,
        "gain": skill_acc - base_acc,
        "probe_accuracy": probe.get("accuracy", math.nan),
    }
    for name, prefix in ((estimator, ""), ("paper", "paper_")):
        e = est.get(name, {})
        row[f"{prefix}auc"] = e.get("auc", math.nan) if e.get("available") else math.nan
        row[f"{prefix}auc_lo"], row[f"{prefix}auc_hi"] = (
            e.get("auc_ci", [math.nan, math.nan]) if e.get("available") else (math.nan, math.nan)
        )
    return row


def write_skills(root: Path, rows: list[dict], choice: dict | None, estimator: str) -> None:
    from sgsd.fileio import atomic_write_json, atomic_write_text

    def f(x, d=1):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"

    table = [
        [
            r["task"],
            r["max_new_tokens"],
            r["bank"],
            f(r["base"]),
            f(r["base_skill"]),
            f(r["gain"]),
            f"{f(r['auc'], 3)} [{f(r['auc_lo'], 3)}, {f(r['auc_hi'], 3)}]",
            f"{f(r['paper_auc'], 3)} [{f(r['paper_auc_lo'], 3)}, {f(r['paper_auc_hi'], 3)}]",
            "**chosen**" if r is choice else "",
        ]
        for r in rows
    ]
    lines = [
        "# Skills in context and the teacher signal",
        "",
        "Base and Base+Skill: validation avg@k (%), the retrieved pairs in the prompt for Base+Skill. AUC: "
        f"the signal probe's P(support of a correct rollout > support of a wrong one) for the {estimator} "
        "and the paper estimator, with 95% bootstrap intervals over problems. Rule (`choose_skills`): skills "
        "help (gain > 0) and the estimator separates (interval above 0.5); then either; then AUC, then gain.",
        "",
        *_md_table(
            ["Task", "Tokens", "Bank", "Base", "Base+Skill", "Gain", f"AUC {estimator}", "AUC paper", ""],
            table,
        ),
    ]
    atomic_write_json(root / "results.json", {"rows": rows, "choice": choice})
    atomic_write_text(root / "results.md", "\n".join(lines))
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------------
# lr


def calibrate(cli, variant: str, overrides: list[str]) -> float:
    """CPU-seconds per optimizer step of `variant`: the median over steps 2.. of a --calibration-steps run
    without evaluation (the first step pays for warm-up). Kept in lr/measured/VARIANT.calibration.cpu_per_step.json
    (committed: a later session's checkout has no run folders, and the same calibration gives the same
    schedule horizon); the run itself goes to the git-ignored lr/calibration/VARIANT/."""
    from sgsd.fileio import atomic_write_json, read_jsonl

    folder = cli.out / "lr" / "calibration" / variant
    kept = cli.out / "lr" / "measured" / f"{variant}.calibration.cpu_per_step.json"
    cached = read_json(kept) or read_json(folder / "cpu_per_step.json")
    if cached:
        if not kept.is_file() and not cli.dry_run:
            atomic_write_json(kept, cached)
        return cached["cpu_s_per_step"]
    run = folder / "run"
    cmd = [
        sys.executable,
        "-m",
        "sgsd",
        "train",
        "-c",
        str(cli.config),
        "-o",
        str(run),
        "--overwrite",
        *overrides,
        f"train.steps={cli.calibration_steps}",
        "data.eval_sources=[]",
        "train.save_every=1000",
        "train.write_report=false",
    ]
    if cli.dry_run:
        print(" ".join(cmd), flush=True)
        return math.nan
    ignore_runs(folder.parent)  # the grid calibrates variants the lr phase did not
    if not run_cli(cmd, folder / "train.log", f"calibrate {variant}"):
        raise SystemExit(f"calibration of {variant} failed")
    cpu = [row["train_cpu_s"] for row in read_jsonl(run / "metrics.jsonl")]
    per_step = statistics.median(b - a for a, b in zip(cpu, cpu[1:])) if len(cpu) > 1 else cpu[0]
    measured = {"cpu_s_per_step": per_step, "steps": len(cpu), "train_cpu_s": cpu}
    atomic_write_json(folder / "cpu_per_step.json", measured)
    atomic_write_json(kept, measured)
    return per_step


def horizon(cpu_budget_s: float, cpu_per_step: float, margin: float) -> int:
    """train.steps for a CPU budget: margin x the steps the budget buys (the linear schedule's length)."""
    return max(1, math.ceil(margin * cpu_budget_s / cpu_per_step)) if cpu_per_step > 0 else 100_000


def budgeted_run(lr: float, seed: int, cpu_budget_s: float, steps: int) -> list[str]:
    """The overrides of a CPU-budgeted run: learning rate, seed, budget and the schedule's horizon."""
    return [
        f"train.lr={yaml_float(lr)}",
        f"train.seed={seed}",
        f"train.cpu_budget_s={yaml_float(cpu_budget_s)}",
        f"train.steps={steps}",
    ]


def yaml_float(x: float) -> str:
    """A float as an override value YAML reads back as a float (YAML reads 5e-06 as text)."""
    return f"{x:.6e}"


def lr_tag(lr: float) -> str:
    return f"lr-{lr:g}"


def phase_lr(cli) -> int:
    root = cli.out / "lr"
    if not cli.dry_run:
        ignore_runs(root / "runs")
        ignore_runs(root / "calibration")
    base = [*cli.set, *setting_overrides(cli)]
    budget = cli.lr_budget_cpu_min * 60
    choice, scores, failed = {}, {}, []
    for variant in dict.fromkeys(lr_owner(v) for v in cli.methods):  # SGSD's ablations: SGSD's search
        overrides = [*base, *VARIANTS[variant][1]]
        per_step = calibrate(cli, variant, overrides)
        scores[variant] = {}
        for lr in cli.lrs:
            run = root / "runs" / variant / lr_tag(lr)
            extra = [
                *budgeted_run(lr, cli.lr_seed, budget, horizon(budget, per_step, cli.steps_margin)),
                "eval.test_in_loop=false",
                "train.eval_at_start=false",
                "train.write_report=false",
            ]
            status = r1.train_once(
                run,
                f"{variant} lr {lr:g}",
                partial(_train_cmd, cli, run, [*overrides, *extra]),
                {"variant": variant, "lr": lr},
                dry_run=cli.dry_run,
                keep_checkpoints=False,
            )
            failed += [f"{variant} lr {lr:g}"] if status == "failed" else []
            scores[variant][lr] = final_validation(run)
        if not cli.dry_run and any(not math.isnan(s) for s in scores[variant].values()):
            choice[variant] = choose_lr(scores[variant], PAPER_LR, cli.lr_tie_points)
    if cli.dry_run:
        return 0
    write_lr(root, scores, choice, cli)
    return 1 if failed else 0


def _train_cmd(cli, run: Path, overrides: list[str], resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "sgsd", "train", "-c", str(cli.config), "-o", str(run)]
    return [*cmd, *(["--resume"] if resume else []), *overrides]


def final_validation(run: Path) -> float:
    """Validation avg@k (%) of a run's last evaluation; nan if it has none."""
    from sgsd.evaluate import read_summaries

    evals = read_summaries(run / "eval")
    return validation_score(evals[max(evals)]) if evals else math.nan


def validation_score(summary: dict) -> float:
    results = summary.get("validation") or {}
    return 100 * statistics.fmean(r["avg@k"] for r in results.values()) if results else math.nan


def write_lr(root: Path, scores: dict, choice: dict, cli) -> None:
    from sgsd.fileio import atomic_write_json, atomic_write_text

    lrs = cli.lrs
    rows = [
        [
            VARIANTS[v][0],
            *("–" if math.isnan(s.get(lr, math.nan)) else f"{s[lr]:.1f}" for lr in lrs),
            f"{choice[v]:g}" if v in choice else "–",
        ]
        for v, s in scores.items()
    ]
    lines = [
        "# Learning rates (validation avg@k %, short budget)",
        "",
        f"One run per variant and learning rate, seed {cli.lr_seed}, {cli.lr_budget_cpu_min:g} training CPU-min, "
        f"validation split only. Rule (`choose_lr`): the best final validation avg@k; within {cli.lr_tie_points:g} "
        f"points of it counts as a tie, won by the paper's {PAPER_LR:g} if tied, else by the smallest rate.",
        "",
        *_md_table(["Variant", *(f"{lr:g}" for lr in lrs), "Chosen"], rows),
    ]
    atomic_write_json(
        root / "results.json",
        {"scores": {v: {f"{lr:g}": s for lr, s in d.items()} for v, d in scores.items()}},
    )
    atomic_write_json(root / "choice.json", {v: lr for v, lr in choice.items()})
    atomic_write_text(root / "results.md", "\n".join(lines))
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------------
# grid


def chosen_lr(cli, variant: str) -> float:
    """--use-lr for the variant, else for its `lr_owner`, else the lr phase's choice for the owner."""
    owner = lr_owner(variant)
    for name in (variant, owner):
        if name in cli.use_lr:
            return cli.use_lr[name]
    choice = need(cli.out / "lr" / "choice.json", "lr")
    if owner not in choice:
        raise SystemExit(
            f"no learning rate chosen for {owner}: run the lr phase for it or pass --use-lr {variant}=LR"
        )
    return float(choice[owner])


def record_dir(out: Path, variant: str, seed: int) -> Path:
    """The committed record of a finished grid run (its run folder under runs/ is git-ignored and, with its
    checkpoints, does not outlive the machine it ran on)."""
    return out / "grid" / variant / f"seed-{seed}"


def keep_record(run: Path, record: Path) -> None:
    """Copy a finished run's small files into `record`: config.yaml, metrics.jsonl, done.json and every
    evaluation's summary.json (eval/step-N/summary.json), a few tens of KB. Written to a temporary sibling
    and renamed, so a record is whole or absent."""
    import shutil

    tmp = record.with_name(f".{record.name}.tmp")  # not a seed-* name: readers skip it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "done.json"):
        shutil.copy2(run / name, tmp / name)
    for summary in sorted((run / "eval").glob("step-*/summary.json")):
        (tmp / "eval" / summary.parent.name).mkdir(parents=True)
        shutil.copy2(summary, tmp / "eval" / summary.parent.name / "summary.json")
    shutil.rmtree(record, ignore_errors=True)
    tmp.rename(record)


def has_base_eval(out: Path, seed: int, variant: str) -> bool:
    """Whether another variant of this seed already has its step-0 evaluation, in a run folder or a record."""
    folders = (f(out, v, seed) for v in VARIANTS if v != variant for f in (r1.run_dir_of, record_dir))
    return any(r1.base_eval_path(folder).is_file() for folder in folders)


def expected_wall_min(out: Path, variant: str, default: float, base_eval_min: float) -> float:
    """A run's expected wall-minutes without a step-0 evaluation: the longest finished record of the
    variant (evaluations included; less `base_eval_min` where the record made its seed's step-0
    evaluation), else `default`."""
    walls = []
    for record in (out / "grid" / variant).glob("seed-*"):
        wall_s = (read_json(record / "done.json") or {}).get("wall_s_last_invocation")
        if wall_s:
            made_base_eval = r1.base_eval_path(record).is_file()
            walls.append(max(0.0, wall_s / 60 - (base_eval_min if made_base_eval else 0)))
    return max(walls, default=default)


def parse_stop_by(text: str | None, now: float | None = None) -> float | None:
    """--stop-by HH:MM (local time, the next such moment) as a Unix time; None without one."""
    if not text:
        return None
    try:
        hours, minutes = (int(x) for x in text.split(":"))
        if not (0 <= hours < 24 and 0 <= minutes < 60):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--stop-by takes HH:MM (local time), got {text!r}") from None
    now = time.time() if now is None else now
    local = time.localtime(now)
    moment = time.mktime((*local[:3], hours, minutes, 0, 0, 0, local.tm_isdst))
    return moment if moment > now else moment + 86400


def phase_grid(cli) -> int:
    base = [*cli.set, *setting_overrides(cli)]
    budget, every = cli.budget_cpu_min * 60, cli.eval_every_cpu_min * 60
    if not cli.dry_run:
        ignore_runs(cli.out / "runs")
    failed = []
    for seed in cli.seeds:  # every variant of a seed before the next seed
        for variant in cli.methods:
            name = f"{variant} seed {seed}"
            run, record = r1.run_dir_of(cli.out, variant, seed), record_dir(cli.out, variant, seed)
            if (record / "done.json").is_file():
                print(f"[skip] {name}: finished ({record})", flush=True)
                continue
            shared = has_base_eval(cli.out, seed, variant)
            needs = expected_wall_min(cli.out, variant, cli.run_wall_min, cli.base_eval_wall_min)
            needs += 0 if shared else cli.base_eval_wall_min
            if cli.stop_by and not (run / "done.json").is_file() and time.time() + 60 * needs > cli.stop_by:
                left = max(0.0, (cli.stop_by - time.time()) / 60)
                print(f"[stop] {name} needs ~{needs:.0f} wall-min, {left:.0f} left", flush=True)
                return 1 if failed else 0
            overrides = [*base, *VARIANTS[variant][1]]
            per_step = calibrate(cli, variant, overrides)
            extra = [
                *budgeted_run(
                    chosen_lr(cli, variant), seed, budget, horizon(budget, per_step, cli.steps_margin)
                ),
                f"train.eval_every_cpu_s={yaml_float(every)}",
                *(["train.eval_at_start=false"] if shared else []),
            ]
            status = r1.train_once(
                run,
                name,
                partial(_train_cmd, cli, run, [*overrides, *extra]),
                {"variant": variant, "seed": seed},
                dry_run=cli.dry_run,
                keep_checkpoints=cli.keep_checkpoints,
            )
            failed += [name] if status == "failed" else []
            if status in ("done", "skipped"):
                keep_record(run, record)
                print(f"[kept] {name} -> {record} (commit it: the run folder is git-ignored)", flush=True)
    if failed:
        print(f"failed runs (rerun to resume): {', '.join(failed)}", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------
# report


def run_summary(run) -> dict:
    """One run's scores (test avg@k %): base (step 0), final, best-on-validation step and its test score,
    and its compute: steps, rollouts, completion tokens, training CPU-min."""
    evals = run.evals
    test = {s: r1.mean_avg_at_k(v) for s, v in evals.items()}
    val = {s: validation_score(v) for s, v in evals.items() if s > 0 and not math.isnan(validation_score(v))}
    best = max(val, key=lambda s: (val[s], -s)) if val else None  # ties: the earliest step
    last = run.metrics[-1] if run.metrics else {}
    base, final = test.get(0, math.nan), test[max(test)] if test else math.nan
    return {
        "seed": run.seed,
        "finished": getattr(run, "done", False),
        "base": base,
        "final": final,
        "gain": final - base,  # the same seed's base
        "best_val_step": best,
        "best_val": val.get(best, math.nan),
        "best_val_test": test.get(best, math.nan) if best is not None else math.nan,
        "steps": int(last.get("step", 0)),
        "rollouts": int(last.get("rollouts_total", 0)),
        "completion_tokens": int(last.get("completion_tokens_total", 0)),
        "cpu_min": float(last.get("train_cpu_s", 0.0)) / 60,
        "wall_min": float(last.get("train_time_s", 0.0)) / 60,
    }


def eval_samples(groups: dict) -> tuple[int, int]:
    """(problems, samples) of the test evaluation: n_problems and n_problems x k of a step-0 summary."""
    for runs in groups.values():
        for run in runs:
            for summary in run.evals.values():
                for res in summary.get("results", {}).values():
                    return int(res["n_problems"]), int(res["n_problems"] * res["k"])
    return 0, 0


def pooled_seed_sd(per_variant: dict[str, list[float]]) -> float:
    """Pooled within-variant sample standard deviation (fraction) of the final test scores (points in)."""
    num = sum((len(v) - 1) * statistics.variance(v) for v in per_variant.values() if len(v) > 1)
    dof = sum(len(v) - 1 for v in per_variant.values() if len(v) > 1)
    return math.sqrt(num / dof) / 100 if dof else math.nan


def mdd_lines(groups: dict, summaries: dict, seeds: int) -> tuple[list[str], dict]:
    problems, samples = eval_samples(groups)
    bases = [s["base"] for rows in summaries.values() for s in rows if not math.isnan(s["base"])]
    if not samples or not bases:
        return ["## Minimum detectable difference", "", "No test evaluation yet.", ""], {}
    p = statistics.fmean(bases) / 100
    sd = pooled_seed_sd(
        {v: [s["final"] for s in rows if not math.isnan(s["final"])] for v, rows in summaries.items()}
    )
    binomial = minimum_detectable_difference(p, samples, seeds)
    with_seeds = minimum_detectable_difference(p, samples, seeds, sd) if not math.isnan(sd) else math.nan
    data = {
        "p_base": p,
        "problems": problems,
        "samples": samples,
        "seeds": seeds,
        "seed_sd": sd,
        "mdd_binomial": binomial,
        "mdd_with_seed_variance": with_seeds,
    }
    lines = [
        "## Minimum detectable difference",
        "",
        "Two variants' means over S seeds, two-sided z-test at α = 0.05 with 80% power:",
        "",
        "    MDD = (z_0.975 + z_0.8) · sqrt(2 · (p(1−p)/(n·k) + σ_seed²) / S),   z_0.975 + z_0.8 = 2.80",
        "",
        f"p = {p:.3f} (mean base test avg@k), n·k = {problems} problems × {samples // max(problems, 1)} samples "
        f"= {samples}, S = {seeds}: **{binomial:.1f} points** from the binomial term alone (an upper bound of "
        "the sampling noise on a fixed problem set); "
        + (
            f"**{with_seeds:.1f} points** with the measured between-seed σ_seed = {100 * sd:.1f} points (pooled "
            "within-variant std of the final test scores)."
            if not math.isnan(sd)
            else "σ_seed not measured yet."
        ),
        "",
    ]
    return lines, data


def gain_interval(gains: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean of per-seed gains (points) and the half-width of its two-sided Student-t interval over seeds
    (df = seeds − 1; nan with fewer than two seeds): the seed is the unit, since the variants of a seed
    share its step-0 evaluation."""
    values = [float(g) for g in gains if not math.isnan(float(g))]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(half)


def gain_lines(summaries: dict, labels: dict[str, str]) -> tuple[list[str], dict]:
    """Markdown and data: does training move the test score? Per variant the mean gain over its seeds with
    a 95% t-interval; over all variants, each seed's mean gain across the variants, then the same
    interval over seeds."""
    rows: list[list] = []

    def summarise(label: str, gains: list[float]) -> dict:
        mean, half = gain_interval(gains)
        rows.append([label, len(gains), _signed(mean), _interval(mean, half)])
        return {"mean": mean, "ci95_half": half}

    per_seed: dict[int, list[float]] = {}
    data = {}
    for v, runs in summaries.items():
        scored = [s for s in runs if not math.isnan(s["gain"])]
        for s in scored:
            per_seed.setdefault(s["seed"], []).append(s["gain"])
        gains = [s["gain"] for s in scored]
        data[v] = {"gains": gains, **summarise(labels.get(v, v), gains)}
    seed_means = [statistics.fmean(g) for _, g in sorted(per_seed.items())]
    data["all_variants"] = {"seed_means": seed_means, **summarise("all variants (seed means)", seed_means)}
    lines = [
        "## Does training move the test score?",
        "",
        "Gain = final − base of the same seed (points). 95% Student-t interval over seeds (df = seeds − 1); "
        "for all variants together the unit is the seed (its variants share one step-0 evaluation): each "
        "seed's mean gain across the variants, then the interval over seeds. An interval that contains 0 "
        "does not show learning; one that excludes it rests on seeds − 1 degrees of freedom, so two or three "
        "close gains can make it narrow by luck.",
        "",
        *_md_table(["Variant", "Seeds", "Mean gain", "95% interval"], rows),
    ]
    return lines, data


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.1f}"


def _interval(mean: float, half: float) -> str:
    return "–" if math.isnan(half) else f"[{mean - half:+.1f}, {mean + half:+.1f}]"


def write_table_v2(groups: dict, out: Path) -> Path:
    from sgsd.fileio import atomic_write_json, atomic_write_text

    summaries = {v: [run_summary(r) for r in runs] for v, runs in groups.items()}

    def ms(values, d=1):
        values = [v for v in map(float, values) if not math.isnan(v)]
        if not values:
            return "–"
        m, s = r1.mean_std(values)
        return f"{m:.{d}f} ± {s:.{d}f}" if len(values) > 1 else f"{m:.{d}f}"  # one seed: no spread

    cols = ["base", "final", "gain", "best_val_test", "cpu_min", "steps", "rollouts", "completion_tokens"]
    rows = [
        [
            groups[v][0].label,
            len(rows_),
            *(
                ms([s[c] for s in rows_], 0 if c in ("steps", "rollouts", "completion_tokens") else 1)
                for c in cols
            ),
        ]
        for v, rows_ in summaries.items()
    ]
    seeds = max((len(r) for r in summaries.values()), default=0)
    mdd, mdd_data = mdd_lines(groups, summaries, max(seeds, 1))
    gains, gain_data = gain_lines(summaries, {v: runs[0].label for v, runs in groups.items()})
    lines = [
        "# Learning benchmark, second round: test avg@k at equal training CPU time",
        "",
        "Test avg@k (%) mean ± std over seeds (ddof=1). Base = step 0; final = last evaluation; gain = final − "
        "base of the same seed (points); best-val → test = "
        "the test score at the evaluation with the best validation avg@k (after step 0, earliest on ties). "
        "Compute per run: training CPU-minutes (process CPU time of the training steps, every thread; "
        "evaluation excluded), optimizer steps, rollouts and completion tokens generated.",
        "",
        *_md_table(
            [
                "Variant",
                "Seeds",
                "Base",
                "Final",
                "Gain",
                "Best-val → test",
                "CPU-min",
                "Steps",
                "Rollouts",
                "Completion tokens",
            ],
            rows,
        ),
        *mdd,
        *gains,
        "## Runs",
        "",
    ]
    run_rows = [
        [
            groups[v][0].label,
            s["seed"],
            "yes" if s["finished"] else "no",
            f"{s['base']:.1f}",
            f"{s['final']:.1f}",
            s["best_val_step"],
            f"{s['best_val']:.1f}",
            f"{s['best_val_test']:.1f}",
            f"{s['cpu_min']:.1f}",
            f"{s['wall_min']:.1f}",
            s["steps"],
            s["rollouts"],
            s["completion_tokens"],
        ]
        for v, rows_ in summaries.items()
        for s in rows_
    ]
    lines += _md_table(
        [
            "Variant",
            "Seed",
            "Finished",
            "Base",
            "Final",
            "Best-val step",
            "Val",
            "Test there",
            "CPU-min",
            "Wall-min",
            "Steps",
            "Rollouts",
            "Tokens",
        ],
        run_rows,
    )
    atomic_write_json(
        out / "table.json",
        {
            "variants": {v: {"label": groups[v][0].label, "runs": s} for v, s in summaries.items()},
            "mdd": mdd_data,
            "gain": gain_data,
        },
    )
    path = out / "table.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def outcome_lines(groups: dict, quarters: int = 4) -> list[str]:
    """Markdown: support on correct / wrong rollouts and GRPO's mixed-group fraction per quarter of each
    variant's training CPU time (means over seeds and steps)."""
    lines = [
        "## Support by outcome and mixed groups over training CPU time",
        "",
        "Per quarter of training CPU time: mean robust support on correct / wrong rollouts (support_correct / "
        "support_wrong) and, for GRPO, the fraction of prompt groups with mixed rewards (the groups that carry "
        "a gradient).",
        "",
    ]
    rows = []
    for runs in groups.values():
        edges = r1._time_edges({"v": runs}, quarters, r1.CPU.key)
        cells = [runs[0].label]
        for key in ("support_correct", "support_wrong", "mixed_group_fraction"):
            means = r1.binned_means(r1._points(runs, key, r1.CPU.key), edges)
            cells.append(" / ".join(r1._fmt(m, 3) for m in means))
        rows.append(cells)
    return [
        *lines,
        *_md_table(["Variant", "support_correct (Q1/…/Q4)", "support_wrong", "mixed groups"], rows),
    ]


def phase_report(cli) -> int:
    groups = r1.load_groups(cli.out, VARIANTS, folder="grid")  # the finished runs' records
    if not groups:
        print(f"no finished run records under {cli.out / 'grid'}: nothing to report", flush=True)
        return 1
    written = [
        write_table_v2(groups, cli.out),
        r1.plot_learning(groups, cli.out, r1.CPU),
        r1.plot_diagnostics(groups, cli.out, axis=r1.CPU, signals=SIGNALS_V2),
        r1.plot_evidence(groups, cli.out),
        r1.write_diagnostics(groups, cli.out, outcome_lines(groups)),
    ]
    for p in written:
        if p is not None:
            print(f"wrote {p}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------


VARIANTS: dict[str, tuple[str, list[str]]] = variants()  # set again from --group-size / --estimator


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=[*PHASES, "all"])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="shared config of every run")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra override for every run (repeatable; wins over the phases' choices)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--dry-run", action="store_true", help="lr, grid: print the train commands only")
    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        action="append",
        help=f"candidate data source (repeatable; default {', '.join(DEFAULT_TASKS)})",
    )
    g.add_argument("--max-new-tokens", default="224,320", help="candidate completion budgets, comma list")
    g.add_argument("--task-problems", type=int, default=16)
    g.add_argument("--task-rollouts", type=int, default=4)
    g.add_argument("--success", default="0.3,0.7", help="accepted base success range")
    g.add_argument("--max-truncated", type=float, default=0.1)
    g = p.add_argument_group("skills")
    g.add_argument(
        "--bank",
        action="append",
        help=f"candidate bank (repeatable; default builtin:starter, {HAND_BANK.relative_to(ROOT)})",
    )
    g.add_argument("--skills-tasks", type=int, default=2, help="passing tasks compared (nearest 50%% first)")
    g.add_argument("--probe-problems", type=int, default=16)
    g.add_argument("--probe-rollouts", type=int, default=4)
    g.add_argument(
        "--estimator",
        default="null_relative",
        choices=["paper", "expected", "null_relative", "teacher_centred"],
        help="the support estimator of the SGSD variant sgsd_ESTIMATOR and the probe column (default: the "
        "signal probe's choice, benchmarks/README.md 'Signal')",
    )
    g = p.add_argument_group("lr and grid")
    g.add_argument("--methods", help="comma list of variants (default: all)")
    g.add_argument("--group-size", type=int, default=8, help="GRPO completions per prompt")
    g.add_argument("--lrs", default="5e-6,2e-5,1e-4", help="learning-rate grid (includes the paper's 5e-6)")
    g.add_argument("--lr-budget-cpu-min", type=float, default=8.0)
    g.add_argument("--lr-seed", type=int, default=0)
    g.add_argument("--lr-tie-points", type=float, default=0.0, help="validation points within which lrs tie")
    g.add_argument("--calibration-steps", type=int, default=4)
    g.add_argument(
        "--steps-margin", type=float, default=1.25, help="train.steps = margin x the budget's steps"
    )
    g.add_argument("--seeds", default="0,1,2")
    g.add_argument("--budget-cpu-min", type=float, default=30.0, help="training CPU-minutes per grid run")
    g.add_argument(
        "--eval-every-cpu-min",
        type=float,
        default=15.0,
        help="test + validation evaluation interval (each costs ~14 wall-minutes on 2 cores: 800 samples)",
    )
    g.add_argument("--keep-checkpoints", action="store_true")
    g.add_argument(
        "--stop-by",
        metavar="HH:MM",
        help="grid: start no run that would not finish by then (local time): a session's unfinished run is "
        "lost with its machine, only the committed records under grid/ carry over",
    )
    g.add_argument(
        "--run-wall-min",
        type=float,
        default=55.0,
        help="grid: expected wall-minutes of a run before a record of its variant gives one",
    )
    g.add_argument(
        "--base-eval-wall-min", type=float, default=16.0, help="grid: wall-minutes of a step-0 evaluation"
    )
    g = p.add_argument_group("choices (instead of an earlier phase's)")
    g.add_argument("--use-task")
    g.add_argument("--use-max-new-tokens", type=int)
    g.add_argument("--use-bank")
    g.add_argument("--use-lr", action="append", default=[], metavar="VARIANT=LR")
    cli = p.parse_args(argv)
    global VARIANTS
    VARIANTS = variants(cli.group_size, cli.estimator)
    cli.task = cli.task or list(DEFAULT_TASKS)
    cli.bank = cli.bank or ["builtin:starter", str(HAND_BANK)]
    cli.max_new_tokens = [int(x) for x in _floats(cli.max_new_tokens)]
    cli.success = tuple(_floats(cli.success))
    cli.lrs = _floats(cli.lrs)
    cli.methods = [m.strip() for m in (cli.methods or ",".join(VARIANTS)).split(",") if m.strip()]
    unknown = [m for m in cli.methods if m not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    cli.seeds = [int(s) for s in cli.seeds.split(",") if s.strip()]
    try:
        cli.use_lr = {k: float(v) for k, v in (x.split("=", 1) for x in cli.use_lr)}
    except ValueError:
        p.error("--use-lr takes VARIANT=LR, e.g. --use-lr sgsd=2e-5")
    if len(cli.success) != 2 or min(cli.lr_budget_cpu_min, cli.budget_cpu_min, cli.eval_every_cpu_min) <= 0:
        p.error("--success takes LO,HI; the CPU budgets must be > 0")
    cli.config, cli.out = cli.config.resolve(), cli.out.resolve()
    cli.stop_by = parse_stop_by(cli.stop_by)
    return cli


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli = parse_args(argv)
    phases = {
        "task": phase_task,
        "skills": phase_skills,
        "lr": phase_lr,
        "grid": phase_grid,
        "report": phase_report,
    }
    for name in PHASES if cli.phase == "all" else [cli.phase]:
        if cli.dry_run and name in ("task", "skills", "report"):
            continue
        print(f"== {name}", flush=True)
        rc = phases[name](cli)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
