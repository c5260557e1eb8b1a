"""Feeds a run folder through `sgsd.tracking.RunTrackers` as the trainer does: step 0's evaluation,
then each metrics.jsonl row followed by that step's evaluation if there is one, then the report's
plots. Run in a subprocess by tests/test_tracking.py so that each tracker's process-wide state
(trackio's data folder, read at import; the W&B service; MLflow's active run) stays out of the
test process.

    python tests/tracking_driver.py RUN_DIR tensorboard,wandb,mlflow,trackio
"""

import sys
from pathlib import Path

from sgsd.config import load_config
from sgsd.evaluate import read_summaries
from sgsd.fileio import read_jsonl
from sgsd.tracking import RunTrackers

run, names = Path(sys.argv[1]), sys.argv[2]
cfg = load_config(run / "config.yaml", [f"train.report_to=[{names}]"])
rows = read_jsonl(run / "metrics.jsonl")
evals = read_summaries(run / "eval")
with RunTrackers(cfg, run, is_main=True) as trackers:
    if 0 in evals:
        trackers.log_eval(evals[0], step=0)
    for row in rows:
        trackers.log(row, step=row["step"])
        if row["step"] in evals:
            trackers.log_eval(evals[row["step"]], step=row["step"])
    trackers.log_images(sorted((run / "report").glob("*.png")), step=rows[-1]["step"])
