"""Feeds a run folder through `sgsd.tracking.RunTrackers` as the trainer does: step 0's evaluation,
then each metrics.jsonl row followed by that step's evaluation if there is one, then the report's
plots. Run in a subprocess by tests/test_tracking.py so that each tracker's process-wide state
(trackio's data folder, read at import; the W&B service; MLflow's active run) stays out of the
test process.

    python tests/tracking_driver.py RUN_DIR tensorboard,wandb,mlflow,trackio
    python tests/tracking_driver.py RUN_DIR NAMES --through 3       # a run stopped after logging step 3
    python tests/tracking_driver.py RUN_DIR NAMES --resume-from 2 --set train.save_every=3
                                                    # its resume from the step-2 checkpoint, other settings

A resumed run logs again every step after its checkpoint (here: step 3 again) and the plots at the end.
"""

import argparse
from pathlib import Path

from sgsd.config import load_config
from sgsd.evaluate import read_summaries
from sgsd.fileio import read_jsonl
from sgsd.tracking import RunTrackers

p = argparse.ArgumentParser()
p.add_argument("run", type=Path)
p.add_argument("names")
p.add_argument("--through", type=int, help="log the steps up to this one, no plots (a stopped run)")
p.add_argument("--resume-from", type=int, help="resume: log the steps after this checkpoint, then the plots")
p.add_argument("--set", nargs="*", default=[], help="config overrides (a resume with other settings)")
args = p.parse_args()
run = args.run
cfg = load_config(run / "config.yaml", [f"train.report_to=[{args.names}]", *args.set])
first = 0 if args.resume_from is None else args.resume_from + 1
last = args.through
rows = [
    r for r in read_jsonl(run / "metrics.jsonl") if r["step"] >= first and (last is None or r["step"] <= last)
]
evals = read_summaries(run / "eval")
with RunTrackers(cfg, run, is_main=True, resume=args.resume_from is not None) as trackers:
    if first == 0 and 0 in evals:
        trackers.log_eval(evals[0], step=0)
    for row in rows:
        trackers.log(row, step=row["step"])
        if row["step"] in evals:
            trackers.log_eval(evals[row["step"]], step=row["step"])
    if last is None:
        trackers.log_images(sorted((run / "report").glob("*.png")), step=rows[-1]["step"])
