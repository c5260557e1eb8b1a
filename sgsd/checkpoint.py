"""Checkpoints: everything needed to continue a run exactly, written atomically.

    RUN/checkpoints/step-000025/
        trainable.safetensors   every trainable parameter by name (LoRA or full fine-tuning)
        adapter/                PEFT adapter (for `sgsd eval --adapter`), when the model has one
        trainer_state.pt        optimizer, scheduler, teacher (EMA / periodic) and RNG states
        optimizer/              under an engine that shards it: the optimizer state, one shard per rank
                                (FSDP: torch.distributed.checkpoint; DeepSpeed ZeRO-2: rank-NNNNN.pt),
                                instead of trainer_state's
        bank.json, ledger.json  the skill bank and ledger at this step (skill methods)
        evolver.json            the online-evolution window of recent rollouts
        state.json              {"step": 25, "complete": true}  -- written last
    RUN/checkpoints/latest      the name of the newest complete checkpoint

A checkpoint is assembled in a hidden temporary folder and renamed into place, so a kill at any moment
leaves either the previous checkpoints or a complete new one, never a torn one. `load_latest` only
considers folders whose state.json says complete.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path

import torch

from sgsd.errors import UserError
from sgsd.faults import maybe_fault
from sgsd.fileio import atomic_write_json, atomic_write_text

STEP_PREFIX = "step-"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:06d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain types and a tensor, so trainer_state.pt loads with torch.load(weights_only=True)
        state["numpy"] = (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        )
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def shard_staging_dir(run_dir, step: int) -> Path:
    """Where every rank writes its optimizer shard before the main process's `save` moves it into
    the checkpoint (a fixed name, known to all ranks)."""
    return Path(run_dir) / "checkpoints" / f".shards-{STEP_PREFIX}{step:06d}"


def save(
    run_dir, step: int, *, model, optimizer, scheduler, teacher=None, bank=None, ledger=None, evolver=None,
    trainable: dict | None = None, teacher_state: dict | None = None, optimizer_shards: Path | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint `step`. `trainable` and `teacher_state`, when given, are the whole tensors an
    engine gathered on every rank (FSDP), used instead of reading `model` and `teacher` here;
    `optimizer_shards` is a folder of sharded optimizer state, moved in as `optimizer/` (and the
    optimizer is then not in trainer_state.pt)."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir, keep=optimizer_shards)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file(
            trainable if trainable is not None else trainable_state(model), str(tmp / "trainable.safetensors")
        )
        maybe_fault("checkpoint", step)  # test-only kill point (sgsd/faults.py)
        if hasattr(model, "peft_config"):
            # state_dict: the gathered tensors when an engine shards the model (None: PEFT reads them)
            model.save_pretrained(str(tmp / "adapter"), selected_adapters=["default"], state_dict=trainable)
        if teacher_state is None and teacher is not None:
            teacher_state = teacher.state_dict()
        blob = {"scheduler": scheduler.state_dict(), "teacher": teacher_state, "rng": _rng_state()}
        if optimizer_shards is None:
            blob["optimizer"] = optimizer.state_dict()
        else:
            os.replace(optimizer_shards, tmp / "optimizer")
        torch.save(blob, tmp / "trainer_state.pt")
        if bank is not None:
            bank.save(tmp / "bank.json")
        if ledger is not None:
            ledger.save(tmp / "ledger.json")
        if evolver is not None:
            atomic_write_json(tmp / "evolver.json", evolver.state_dict())
        atomic_write_json(tmp / "state.json", {"step": step, "complete": True, "time": time.time()})
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step after a resume: replace it
            trash = final.parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"cannot write checkpoint {final}: {exc.strerror or exc}; earlier checkpoints are intact"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(final.parent / "latest", final.name + "\n")
    return final


def remove_stale_temporaries(run_dir, keep: Path | None = None) -> None:
    """Delete the hidden `.tmp-*` / `.old-*` / `.shards-*` folders that a killed save leaves behind
    (each can hold a full copy of the weights), except `keep` (the shards of the save in progress).
    Only the main process saves, so no other save is in flight."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for d in root.iterdir():
            if keep is not None and d == Path(keep):
                continue
            if d.is_dir() and d.name.startswith((".tmp-", ".old-", ".shards-")):
                shutil.rmtree(d, ignore_errors=True)


def complete_checkpoints(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if not d.name.startswith(STEP_PREFIX) or not d.is_dir():
            continue
        try:
            state = json.loads((d / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("complete"):
            found.append(d)
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def load_latest(
    run_dir, *, model, optimizer, scheduler, teacher=None, evolver=None, load_sharded_optimizer=None
) -> dict | None:
    """Restore the newest complete checkpoint into the given objects; returns its state or None.
    `load_sharded_optimizer(folder)` restores an `optimizer/` folder of shards (FSDP, DeepSpeed)."""
    from safetensors.torch import load_file

    from sgsd.engine import copy_into

    found = complete_checkpoints(run_dir)
    if not found:
        return None
    d = found[-1]
    tensors = load_file(str(d / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UserError(f"checkpoint {d} does not match the model: unknown parameter {missing[0]}")
    with torch.no_grad():
        for name, value in tensors.items():
            copy_into(params[name], value)  # sharded parameters (FSDP) take their shard
    try:  # weights_only: a checkpoint from elsewhere cannot run code when it is unpickled
        blob = torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{d / 'trainer_state.pt'} holds objects other than tensors and plain values; "
            "refusing to unpickle it (written by an older sgsd, or not by sgsd)"
        ) from exc
    if "optimizer" in blob:
        if load_sharded_optimizer is not None:
            raise UserError(
                f"checkpoint {d} holds a whole optimizer state; resume it under the engine that wrote it"
            )
        optimizer.load_state_dict(blob["optimizer"])
    elif load_sharded_optimizer is None:
        raise UserError(
            f"checkpoint {d} holds a sharded optimizer state (written under FSDP or DeepSpeed); "
            "resume it under the engine that wrote it"
        )
    else:
        load_sharded_optimizer(d / "optimizer")
    scheduler.load_state_dict(blob["scheduler"])
    if teacher is not None and blob.get("teacher") is not None:
        teacher.load_state_dict(blob["teacher"])
    _set_rng_state(blob["rng"])
    state = json.loads((d / "state.json").read_text())
    state["path"] = d
    state["bank"] = state["ledger"] = None
    if (d / "bank.json").exists():
        from sgsd.skills.bank import load_bank

        state["bank"] = load_bank(d / "bank.json")
    if (d / "ledger.json").exists():
        from sgsd.skills.ledger import SkillLedger

        state["ledger"] = SkillLedger.load(d / "ledger.json")
    if evolver is not None and (d / "evolver.json").exists():
        evolver.load_state_dict(json.loads((d / "evolver.json").read_text()))
    return state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """On resume, drop the metric rows logged after the checkpoint's step (they will be produced again);
    returns the rows kept."""
    if not path.exists():
        return []
    from sgsd.fileio import atomic_write_jsonl, read_jsonl

    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    atomic_write_jsonl(path, rows)
    return rows
