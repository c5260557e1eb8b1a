"""Experiment trackers: `train.report_to` through Accelerate's own tracker classes.

    trackers = RunTrackers(cfg, run_dir, is_main)   # starts each tracker, logs the resolved config
    trackers.log(metrics_row, step)                 # one metrics.jsonl row: scalars as train/KEY
    trackers.log_eval(summary, step)                # an eval summary: eval/SOURCE/avg_at_k, ...
    trackers.log_images(paths)                      # the report's PNG plots
    trackers.close()

Each name in `train.report_to` maps to an `accelerate.tracking` class (TensorBoardTracker,
WandBTracker, MLflowTracker, TrackioTracker); the classes are built directly rather than through
`Accelerator(log_with=...)` because the trainer may be handed an Accelerator built elsewhere, and
because Accelerate skips a tracker whose package is missing with only a debug message, where a user
who asked for it should be told. Where each tracker stores its data is that tracker's own setting:

    tensorboard  RUN/tensorboard (event files)
    wandb        RUN/wandb; project $WANDB_PROJECT or "sgsd"; offline with WANDB_MODE=offline
    mlflow       $MLFLOW_TRACKING_URI (MLflow's default: sqlite:///mlflow.db in the working folder);
                 experiment $MLFLOW_EXPERIMENT_NAME or "sgsd"
    trackio      $TRACKIO_DIR (default ~/.cache/huggingface/trackio); project "sgsd"

Every tracker gets the same names and values: metrics.jsonl's scalar columns (booleans as 0/1, lists
such as `decisions` and `delta_hist` left out) under `train/`, and per evaluated source its avg@k,
pass@k, maj@k, boxed rate and mean tokens under `eval/SOURCE/` plus their mean over sources. Names
are kept to the characters every tracker accepts (MLflow refuses `@`): `avg@k` becomes `avg_at_k`.
Runs are named after the run folder. On other ranks than the main process every call does nothing.

A resumed training run (`sgsd train --resume`) continues the same tracker runs: RUN/trackers.json keeps
each tracker's run id (W&B's run id, MLflow's run_id; TensorBoard and trackio find theirs by folder and
name) and the last step logged, so the steps between the checkpoint and the stop, which the resumed run
repeats exactly, are not logged twice. MLflow parameters cannot change: a resume with other settings
keeps their first values there (a warning names them; config.yaml has the current ones).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from sgsd.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PROJECT = "sgsd"
# tracker -> (importable module, pip package)
_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
EVAL_METRICS = ("avg@k", "pass@k", "maj@k", "boxed_rate", "mean_tokens")
STATE_FILE = "trackers.json"  # RUN/trackers.json: the tracker run ids and the last steps logged
_UNSAFE = re.compile(r"[^A-Za-z0-9_./ -]")


def metric_name(name: str) -> str:
    """A metric name every tracker accepts: `@` -> `_at_`, any other odd character -> `_`."""
    return _UNSAFE.sub("_", name.replace("@", "_at_"))


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The loggable scalars of a metrics row: numbers and booleans (as 0/1), not `step`, not lists,
    strings or None."""
    out = {}
    for key, value in row.items():
        if key == "step" or value is None or isinstance(value, (str, list, dict)):
            continue
        if isinstance(value, (bool, int, float)):
            out[metric_name(prefix + key)] = float(value)
    return out


def eval_scalars(summary: dict) -> dict[str, float]:
    """`eval/SOURCE/METRIC` for every source of an eval summary (`summary["results"]`), plus
    `eval/mean/avg_at_k` over the sources; the same as `val/...` for its validation split
    (`summary["validation"]`)."""
    out = {}
    results = summary.get("results", {})
    for source, res in results.items():
        for key in EVAL_METRICS:
            if isinstance(res.get(key), (int, float)):
                out[metric_name(f"eval/{source}/{key}")] = float(res[key])
    if results:
        out[metric_name("eval/mean/avg@k")] = sum(r["avg@k"] for r in results.values()) / len(results)
    validation = summary.get("validation") or {}
    for source, res in validation.items():
        for key in EVAL_METRICS:
            if isinstance(res.get(key), (int, float)):
                out[metric_name(f"val/{source}/{key}")] = float(res[key])
    if validation:
        out[metric_name("val/mean/avg@k")] = sum(r["avg@k"] for r in validation.values()) / len(validation)
    return out


def flat_config(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"section.key": value}; lists and mappings become compact JSON text,
    None stays None (trackers that cannot store None get the text "null")."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (list, dict)):
            out[name] = json.dumps(value, separators=(",", ":"))
        else:
            out[name] = value
    return out


def check_installed(names) -> None:
    """UserError with the install command when a requested tracker's package is missing."""
    for name in names:
        if name not in _PACKAGES:
            raise UserError(f"train.report_to: unknown tracker '{name}'; choose from {', '.join(TRACKERS)}")
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"train.report_to includes {name} but the {package} package is not installed: "
                f"pip install {package} (or pip install 'sgsd[trackers]' for every tracker)"
            )


class RunTrackers:
    """The trackers of one run (see the module docstring). Built on every rank; only the main
    process starts trackers and logs."""

    def __init__(self, cfg, run_dir: str | Path, is_main: bool = True, resume: bool = False):
        from sgsd.config import config_to_dict

        self.run_dir = Path(run_dir)
        self.names = list(cfg.train.report_to) if is_main else []
        self.trackers: dict[str, Any] = {}
        self.resume = resume
        check_installed(self.names)
        state = self._read_state() if resume and self.names else {}
        self.ids: dict[str, str] = dict(state.get("ids", {}))  # tracker -> its run id (wandb, mlflow)
        self.logged: dict[str, int] = {"train": -1, "eval": -1, **state.get("logged", {})}  # last step logged
        for name in self.names:
            tracker = self._build(name, self.ids.get(name))
            try:
                tracker.start()
            except Exception as exc:  # a login, network or permission problem of that tracker
                self.close()
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                hint = " (offline: set WANDB_MODE=offline; or run `wandb login`)" if name == "wandb" else ""
                raise UserError(f"cannot start the {name} tracker: {first}{hint}") from exc
            self.trackers[name] = tracker
            if name == "wandb":
                self.ids[name] = tracker.run.id
            elif name == "mlflow":
                self.ids[name] = tracker.active_run.info.run_id
        self._write_state()
        self.log_config(config_to_dict(cfg))

    def _build(self, name: str, run_id: str | None = None):
        """The tracker `name`, continuing the tracker run `run_id` (wandb, mlflow) or, on resume, the run of
        this name (trackio; TensorBoard appends to RUN/tensorboard either way)."""
        from accelerate import tracking

        run_name = self.run_dir.resolve().name
        if name == "tensorboard":
            # logs to RUN/tensorboard itself (Accelerate joins logging_dir and run_name)
            return tracking.TensorBoardTracker("", str(self.run_dir / "tensorboard"))
        if name == "wandb":
            self.run_dir.mkdir(parents=True, exist_ok=True)
            project = os.environ.get("WANDB_PROJECT", PROJECT)
            again = {"id": run_id, "resume": "allow"} if run_id else {}
            return tracking.WandBTracker(project, name=run_name, dir=str(self.run_dir), **again)
        if name == "mlflow":
            return tracking.MLflowTracker(experiment_name=PROJECT, run_name=run_name, run_id=run_id)
        return tracking.TrackioTracker(PROJECT, name=run_name, resume="allow" if self.resume else "never")

    def _read_state(self) -> dict:
        path = self.run_dir / STATE_FILE
        if not path.is_file():
            return {}
        try:
            state = json.loads(path.read_text("utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}: not valid JSON ({exc.msg}); delete it to start new tracker runs"
            ) from exc
        if not isinstance(state, dict):
            raise UserError(f"{path}: expected a JSON object; delete it to start new tracker runs")
        return state

    def _write_state(self) -> None:
        if self.names:
            from sgsd.fileio import atomic_write_json

            atomic_write_json(self.run_dir / STATE_FILE, {"ids": self.ids, "logged": self.logged})

    def log_config(self, values: dict) -> None:
        """Store `values` (a nested config dict) as the run's config / hyperparameters."""
        if not self.trackers:
            return
        flat = flat_config(values)
        for name, tracker in self.trackers.items():
            if name == "mlflow" and self.resume:  # parameters are immutable: log the new ones only
                kept = tracker.active_run.data.params
                changed = sorted(k for k, v in flat.items() if k in kept and kept[k] != str(v))
                if changed:
                    print(
                        f"warning: mlflow keeps the first values of {', '.join(changed)} (resumed with others)"
                    )
                tracker.store_init_configuration({k: v for k, v in flat.items() if k not in kept})
                continue
            if name == "tensorboard":  # hparams take numbers, text and booleans only
                tracker.store_init_configuration({k: "null" if v is None else v for k, v in flat.items()})
            else:
                tracker.store_init_configuration(flat)
            if name == "trackio":  # Accelerate passes wandb's allow_val_change to trackio's plain dict
                if "allow_val_change" not in flat:
                    tracker.run.config.pop("allow_val_change", None)

    def log(self, metrics: dict, step: int) -> None:
        """Log one metrics.jsonl row (its scalars, as `train/KEY`) at `step`."""
        self._log("train", scalars(metrics, "train/"), step)

    def log_eval(self, summary: dict, step: int) -> None:
        """Log an evaluation summary (`evaluate_sources`' return value) at `step`."""
        self._log("eval", eval_scalars(summary), step)

    def _log(self, kind: str, values: dict[str, float], step: int) -> None:
        if not values or not self.trackers or step <= self.logged[kind]:  # logged before the resume
            return
        for tracker in self.trackers.values():
            tracker.log(values, step=step)
        self.logged[kind] = step
        self._write_state()

    def log_images(self, paths, step: int | None = None) -> None:
        """Log PNG files (the report's plots) as `plots/NAME` to every tracker (MLflow: as artifacts
        under plots/)."""
        paths = [Path(p) for p in paths]
        if not self.trackers or not paths:
            return
        for name, tracker in self.trackers.items():
            if name == "tensorboard":
                for p in paths:
                    image = _read_rgb(p)  # [H, W, 3] uint8
                    tracker.log_images({f"plots/{p.stem}": image[None]}, step=step, dataformats="NHWC")
                tracker.writer.flush()
            elif name == "wandb":
                tracker.log_images({f"plots/{p.stem}": [str(p)] for p in paths}, step=step)
            elif name == "mlflow":
                for p in paths:
                    tracker.log_artifact(str(p), artifact_path="plots")
            elif name == "trackio":
                import trackio

                tracker.log({f"plots/{p.stem}": trackio.Image(str(p)) for p in paths}, step=step)

    def close(self) -> None:
        """Finish every tracker (flushes W&B, ends the MLflow run); safe to call twice."""
        trackers, self.trackers = self.trackers, {}
        for tracker in trackers.values():
            tracker.finish()

    def __enter__(self) -> RunTrackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_rgb(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
