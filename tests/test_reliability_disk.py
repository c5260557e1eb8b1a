"""A full disk or a permission error while writing: the previous file survives, the error is clear.

CI runs as root (chmod stops nothing), so failures are injected by monkeypatching `os.replace`,
`os.fsync` and the writers to raise `OSError(ENOSPC)` / `PermissionError`.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from sgsd import checkpoint as ckpt
from sgsd import fileio
from sgsd.errors import UserError
from sgsd.fileio import append_jsonl, atomic_write_json, read_jsonl
from sgsd.skills.bank import SkillBank, load_bank, make_mistake, make_skill

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
DENIED = PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _bank(title: str) -> SkillBank:
    skill = make_skill("gen_001", {"title": title, "principle": "p", "when_to_apply": "w"})
    mistake = make_mistake("err_001", {"description": "d", "why_it_happens": "y", "how_to_avoid": "h"})
    return SkillBank([skill], [mistake], {})


def _no_temporaries(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.startswith(".")]


@pytest.mark.parametrize("target", ["replace", "fsync"])
@pytest.mark.parametrize("error", [FULL, DENIED], ids=["enospc", "eacces"])
def test_bank_write_failure_keeps_the_previous_bank(tmp_path, monkeypatch, target, error):
    path = tmp_path / "bank.json"
    _bank("old").save(path)
    monkeypatch.setattr(fileio.os, target, _raise(error))
    with pytest.raises(UserError) as exc:
        _bank("new").save(path)
    message = str(exc.value)
    assert str(path) in message and error.strerror in message and "previous file is unchanged" in message
    monkeypatch.undo()
    assert load_bank(path).general_skills[0].title == "old"
    assert _no_temporaries(tmp_path)


def test_snapshot_failure_keeps_latest(tmp_path, monkeypatch):
    _bank("old").save_snapshot(tmp_path / "bank", 1)
    monkeypatch.setattr(fileio.os, "replace", _raise(FULL))
    with pytest.raises(UserError, match="No space left on device"):
        _bank("new").save_snapshot(tmp_path / "bank", 2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "bank")) == ["bank-latest.json", "bank-step000001.json"]
    assert load_bank(tmp_path / "bank" / "bank-latest.json").general_skills[0].title == "old"


def test_result_write_failure_keeps_the_previous_summary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"avg@k": 0.25})
    real_open = os.fdopen

    class FullFile:
        """A file whose every write fails like a full disk (after the temporary file exists)."""

        def __init__(self, fd, *args, **kwargs):
            self._fh = real_open(fd, *args, **kwargs)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    monkeypatch.setattr(fileio.os, "fdopen", FullFile)
    with pytest.raises(UserError, match="No space left on device"):
        atomic_write_json(path, {"avg@k": 0.75})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"avg@k": 0.25}
    assert _no_temporaries(tmp_path)


def test_metrics_append_failure_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    monkeypatch.setattr(fileio.os, "fsync", _raise(FULL))
    with pytest.raises(UserError, match=f"cannot append to {path}: No space left on device"):
        append_jsonl(path, {"step": 2})
    monkeypatch.undo()
    assert read_jsonl(path)[0] == {"step": 1}


def _trainable():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


@pytest.mark.parametrize(
    "where",
    ["safetensors", "torch.save", "final rename", "fsync"],
)
def test_checkpoint_write_failure_keeps_earlier_checkpoints(tmp_path, monkeypatch, where):
    model, optimizer, scheduler = _trainable()
    first = ckpt.save(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, bank=_bank("b1"))
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    if where == "safetensors":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _raise(FULL))
    elif where == "torch.save":
        monkeypatch.setattr(ckpt.torch, "save", _raise(DENIED))
    elif where == "final rename":
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith("step-000002"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_replace(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", replace)
    else:
        monkeypatch.setattr(fileio.os, "fsync", _raise(FULL))
    with pytest.raises(UserError) as exc:
        ckpt.save(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler, bank=_bank("b2"))
    assert "checkpoint" in str(exc.value) or "cannot write" in str(exc.value)
    monkeypatch.undo()
    assert ckpt.complete_checkpoints(tmp_path) == [first]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000001"
    assert _no_temporaries(tmp_path / "checkpoints")
    state = ckpt.load_latest(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert state["step"] == 1 and state["bank"].general_skills[0].title == "b1"
    torch.testing.assert_close(model.weight.detach(), saved_weight)


def test_checkpoint_state_refuses_arbitrary_pickles(tmp_path):
    """trainer_state.pt is read with weights_only=True: a pickle that would run code is refused."""
    model, optimizer, scheduler = _trainable()
    ckpt.save(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler)
    torch.save({"payload": _Evil()}, tmp_path / "checkpoints" / "step-000001" / "trainer_state.pt")
    with pytest.raises(UserError, match="refusing to unpickle"):
        ckpt.load_latest(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))
