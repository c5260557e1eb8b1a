"""A synthetic run folder, as the trainer and `sgsd eval --run` leave it, for tests that read run folders
(tests/test_summary.py, tests/test_tracking.py). The numbers are chosen so results can be worked out by
hand; the tests state them."""

from __future__ import annotations

from pathlib import Path

from sgsd.config import dump_config, load_config
from sgsd.evaluate import step_dir_name
from sgsd.fileio import append_jsonl, atomic_write_json, atomic_write_text
from sgsd.objectives import POLARITY_FRACTIONS

# per step: helpful, warning, misleading, over-suppressive, neutral
POLARITY_ROWS = {
    1: (0.5, 0.25, 0.125, 0.125, 0.0),
    2: (0.25, 0.25, 0.25, 0.25, 0.0),
    3: (0.75, 0.0, 0.25, 0.0, 0.0),
    4: (0.5, 0.5, 0.0, 0.0, 0.0),
}
# step -> {source slug: avg@k}
AVG_AT_K = {
    0: {"reasoning_gym-chain_sum": 0.25, "gsm8k": 0.5},
    2: {"reasoning_gym-chain_sum": 0.75, "gsm8k": 0.5},
    4: {"reasoning_gym-chain_sum": 0.5, "gsm8k": 0.625},
}


def metrics_row(step: int) -> dict:
    """A metrics.jsonl row like the trainer's: scalars, a boolean, lists, and the polarity mix."""
    row = {
        "loss": 0.5 / step,
        "reward_mean": -1.0 + 0.375 * step,
        "mean_support": 0.1 * step,
        "skipped_step": 0.0,
        "bank_updated": step % 2 == 0,
        "decisions": [[0.01, 1.0, 1.0], [-0.2, -1.0, -1.0]],
        "delta_hist": [0, 3, 5, 1],
        **dict(zip(POLARITY_FRACTIONS, POLARITY_ROWS[step], strict=True)),
        "rollout_s": 1.5,
        "step": step,
        "time_s": 31.25,
        "train_time_s": 31.25 * step,
        "lr": 1e-3,
    }
    return row


def eval_summary(step: int, results: dict[str, float], k: int = 4) -> dict:
    return {
        "step": step,
        "checkpoint": "base" if step == 0 else "live",
        "results": {
            src: {"avg@k": v, "pass@k": min(1.0, 2 * v), "maj@k": v, "k": k, "n_problems": 8,
                  "boxed_rate": 0.875, "mean_tokens": 100.0 + step}
            for src, v in results.items()
        },
    }  # fmt: skip


def make_run(run: Path, steps: int = 4, evals: dict | None = None, checkpoints=(2, 4)) -> Path:
    """config.yaml (sgsd, train.steps=4, two eval sources), metrics rows 1..steps, eval summaries
    (default `AVG_AT_K`) and checkpoint folders."""
    cfg = load_config(None, ["train.steps=4", "data.eval_sources=[reasoning_gym:chain_sum, hf:gsm8k]"])
    atomic_write_text(run / "config.yaml", dump_config(cfg))
    for step in range(1, steps + 1):
        append_jsonl(run / "metrics.jsonl", metrics_row(step))
    for step, results in (AVG_AT_K if evals is None else evals).items():
        atomic_write_json(run / "eval" / step_dir_name(step) / "summary.json", eval_summary(step, results))
    for step in checkpoints:
        adapter = run / "checkpoints" / step_dir_name(step) / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
    return run
