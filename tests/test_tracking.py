"""Experiment trackers (sgsd/tracking.py), offline: a synthetic run folder is fed through RunTrackers
with every tracker whose package is installed (tests/tracking_driver.py, in a subprocess: W&B in offline
mode, MLflow to a local SQLite store, Trackio to a local folder, TensorBoard event files), then each
tracker's own files are read back and compared with metrics.jsonl and the eval summaries."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_helpers import AVG_AT_K, make_run

from sgsd.config import load_config
from sgsd.errors import UserError
from sgsd.fileio import read_jsonl
from sgsd.tracking import RunTrackers, check_installed, eval_scalars, flat_config, metric_name, scalars

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = [n for n in ("tensorboard", "wandb", "mlflow", "trackio") if importlib.util.find_spec(n)]
PLOT_NAMES = {"plots/accuracy", "plots/polarity", "plots/signals"}


# ---------------------------------------------------------------------------- names and values


def test_scalars_keep_numbers_and_booleans_only():
    row = {"step": 3, "loss": 0.5, "n": 2, "ok": True, "decisions": [[0.1, 1.0, 1.0]], "note": "x", "v": None}
    assert scalars(row, "train/") == {"train/loss": 0.5, "train/n": 2.0, "train/ok": 1.0}


def test_metric_names_are_safe_for_every_tracker():
    assert metric_name("eval/aime24/avg@k") == "eval/aime24/avg_at_k"
    assert metric_name("train/pol(h/w)") == "train/pol_h/w_"


def test_eval_scalars_with_the_mean_over_sources():
    summary = {"results": {"a": {"avg@k": 0.25, "pass@k": 0.5, "maj@k": 0.0, "k": 4}, "b": {"avg@k": 0.75}}}
    assert eval_scalars(summary) == {
        "eval/a/avg_at_k": 0.25,
        "eval/a/pass_at_k": 0.5,
        "eval/a/maj_at_k": 0.0,
        "eval/b/avg_at_k": 0.75,
        "eval/mean/avg_at_k": 0.5,  # (0.25 + 0.75) / 2
    }


def test_flat_config():
    flat = flat_config(
        {"train": {"lr": 1e-5, "report_to": ["wandb"], "output_dir": None}, "data": {"columns": {}}}
    )
    assert flat == {
        "train.lr": 1e-5,
        "train.report_to": '["wandb"]',
        "train.output_dir": None,
        "data.columns": "{}",
    }


# ---------------------------------------------------------------------------- the config key


def test_report_to_default_and_the_deprecated_tensorboard_flag():
    assert load_config().train.report_to == ["tensorboard"]
    assert load_config(None, ["train.report_to=[wandb, mlflow, wandb]"]).train.report_to == [
        "wandb",
        "mlflow",
    ]
    off = load_config(None, ["train.tensorboard=false"]).train
    assert off.report_to == [] and off.tensorboard is None
    on = load_config(None, ["train.report_to=[trackio]", "train.tensorboard=true"]).train
    assert on.report_to == ["tensorboard", "trackio"]
    from sgsd.configs import resolve_config_path

    assert load_config(resolve_config_path("tiny")).train.report_to == []


def test_unknown_tracker_names_the_choices():
    with pytest.raises(UserError, match="report_to.*'tensorboard' \\| 'wandb' \\| 'mlflow' \\| 'trackio'"):
        load_config(None, ["train.report_to=[neptune]"])


def test_missing_tracker_package_is_a_one_line_install_hint(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install wandb \(or pip install 'sgsd\[trackers\]'"):
        check_installed(["tensorboard", "wandb"])
    from sgsd.cli import main

    # the train command checks before it loads a model (model.name is not even a model here)
    assert (
        main(["train", "-c", "tiny", "-o", str(tmp_path / "r"), "model.name=x", "train.report_to=[wandb]"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install wandb" in err


def test_a_tracker_that_cannot_start_is_a_one_line_error_and_the_others_are_closed(tmp_path, monkeypatch):
    closed = []

    class Tracker:
        def __init__(self, name):
            self.name = name

        def start(self):
            if self.name == "wandb":
                raise RuntimeError("api_key not configured (no-tty)\nmore detail")

        def finish(self):
            closed.append(self.name)

    monkeypatch.setattr(RunTrackers, "_build", lambda self, name, run_id=None: Tracker(name))
    monkeypatch.setattr("sgsd.tracking.check_installed", lambda names: None)
    cfg = load_config(None, ["train.report_to=[tensorboard, wandb]"])
    with pytest.raises(UserError) as err:
        RunTrackers(cfg, tmp_path)
    assert str(err.value) == (
        "cannot start the wandb tracker: api_key not configured (no-tty)"
        " (offline: set WANDB_MODE=offline; or run `wandb login`)"
    )
    assert closed == ["tensorboard"]


def test_a_malformed_tracker_state_file_is_named(tmp_path):
    cfg = load_config(None, ["train.report_to=[tensorboard]"])
    (tmp_path / "trackers.json").write_text("{not json")
    with pytest.raises(
        UserError, match=r"trackers.json: not valid JSON .*delete it to start new tracker runs"
    ):
        RunTrackers(cfg, tmp_path, resume=True)
    with RunTrackers(cfg, tmp_path) as trackers:  # a new run does not read it, and replaces it
        trackers.log({"loss": 1.0}, step=1)
    assert json.loads((tmp_path / "trackers.json").read_text()) == {
        "ids": {},
        "logged": {"train": 1, "eval": -1},
    }


def test_other_ranks_start_nothing(tmp_path):
    cfg = load_config(None, ["train.report_to=[tensorboard]"])
    trackers = RunTrackers(cfg, tmp_path, is_main=False)
    trackers.log({"step": 1, "loss": 1.0}, step=1)
    trackers.close()
    assert trackers.names == [] and not (tmp_path / "tensorboard").exists()


# ---------------------------------------------------------------------------- logged = metrics.jsonl


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run folder fed through every installed tracker; returns (run folder, store folder)."""
    from sgsd.summary import write_run_plots

    base = tmp_path_factory.mktemp("tracking")
    run = make_run(base / "run")
    assert len(write_run_plots(run)) == 3
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", WANDB_MODE="offline",
               WANDB_SILENT="true", WANDB_CONFIG_DIR=str(base / "wandb-config"),
               WANDB_CACHE_DIR=str(base / "wandb-cache"), WANDB_DATA_DIR=str(base / "wandb-data"),
               MLFLOW_TRACKING_URI=f"sqlite:///{base / 'mlflow.db'}", TRACKIO_DIR=str(base / "trackio"))  # fmt: skip
    for var in (
        "WANDB_PROJECT",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_RUN_ID",
        "TRACKIO_SPACE_ID",
        "TRACKIO_SERVER_URL",
    ):
        env.pop(var, None)
    cmd = [sys.executable, str(ROOT / "tests" / "tracking_driver.py"), str(run), ",".join(INSTALLED)]
    # stopped after logging step 3, resumed from the step-2 checkpoint with another save_every: one tracker
    # run, no step logged twice
    for part in (["--through", "3"], ["--resume-from", "2", "--set", "train.save_every=3"]):
        done = subprocess.run([*cmd, *part], env=env, cwd=base, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    if "mlflow" in INSTALLED:  # MLflow parameters are immutable: the first value stays, with a warning
        assert "warning: mlflow keeps the first values of train.save_every" in done.stdout
    return run, base


def _expected(run: Path) -> dict[tuple[str, int], float]:
    """(metric name, step) -> value, from metrics.jsonl and the eval summaries."""
    want = {}
    for row in read_jsonl(run / "metrics.jsonl"):
        want.update({(k, row["step"]): v for k, v in scalars(row, "train/").items()})
    for step, results in AVG_AT_K.items():
        for source, value in results.items():
            want[f"eval/{source}/avg_at_k", step] = value
        want["eval/mean/avg_at_k", step] = sum(results.values()) / len(results)
    return want


def _check(pairs: list[tuple[tuple[str, int], float]], run: Path, exact: bool = True) -> None:
    """The ((name, step), value) pairs a tracker holds are the run's metrics, each logged once (the run
    was stopped after step 3 and resumed from step 2, which logs step 3 again: the tracker skips it)."""
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), sorted(k for k in set(keys) if keys.count(k) > 1)[:5]
    got = dict(pairs)
    want = _expected(run)
    assert ("train/loss", 4) in want and ("train/bank_updated", 2) in want  # the comparison covers both
    missing = sorted(set(want) - set(got))
    assert not missing, missing[:5]
    for key, value in want.items():
        assert got[key] == (value if exact else np.float32(value)), key
    assert not any(k.startswith("train/decisions") or k.startswith("train/delta_hist") for k, _ in got)


def test_tensorboard_holds_the_metrics_config_and_plots(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = logged
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    got = [((tag, e.step), e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
    _check(got, run, exact=False)  # TensorBoard stores float32
    assert PLOT_NAMES <= set(acc.Tags()["images"])
    hparams = list((run / "tensorboard").glob("*/hparams.yml"))
    assert hparams and "train.steps: 4" in hparams[0].read_text()


def _wandb_records(path: Path):
    """Protobuf records of a W&B .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB-log
    framing in 32 KiB blocks (each chunk: CRC32C, little-endian length, type 1 full / 2 first / 3 middle /
    4 last; block tails shorter than a chunk header are padding)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_metrics_config_and_plots(logged):
    pytest.importorskip("wandb")
    run, _ = logged
    # offline, the resume writes a second folder under the same run id (`wandb sync` joins them)
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1
    got, config, images, run_ids = [], {}, set(), set()
    for record in (r for f in files for r in _wandb_records(f)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_ids.add(record.run.run_id)
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            step = json.loads(items["_step"])
            for key, value in items.items():
                parsed = json.loads(value)
                if key.startswith("plots/"):  # an image is a nested value: plots/NAME/{_type, path, ...}
                    images.add("/".join(key.split("/")[:2]))
                elif not key.startswith("_"):
                    got.append(((key, step), parsed))
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    _check(got, run)
    assert run_ids == {files[0].stem.removeprefix("run-")}
    assert images == PLOT_NAMES
    assert config["train.steps"] == 4 and config["train.method"] == "sgsd"


def test_mlflow_store_holds_the_metrics_config_and_plots(logged):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run, base = logged
    client = MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("sgsd").experiment_id])
    assert found.info.run_name == "run"
    got = []
    for key in found.data.metrics:
        got += [((key, m.step), m.value) for m in client.get_metric_history(found.info.run_id, key)]
    _check(got, run)
    assert found.data.params["train.steps"] == "4" and found.data.params["train.save_every"] == "25"
    plots = {Path(a.path).stem for a in client.list_artifacts(found.info.run_id, "plots")}
    assert {f"plots/{p}" for p in plots} == PLOT_NAMES


def test_trackio_project_holds_the_metrics_config_and_plots(logged):
    pytest.importorskip("trackio")
    run, base = logged
    db = sqlite3.connect(base / "trackio" / "sgsd.db")
    got, images = [], set()
    for step, text in db.execute("SELECT step, metrics FROM metrics WHERE run_name = 'run'"):
        for key, value in json.loads(text).items():
            if key.startswith("plots/"):
                images.add(key)
            else:
                got.append(((key, step), value))
    _check(got, run)
    assert images == PLOT_NAMES
    (config,) = [json.loads(c) for (c,) in db.execute("SELECT config FROM configs WHERE run_name = 'run'")]
    assert config["train.steps"] == 4 and "allow_val_change" not in config
