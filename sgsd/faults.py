"""A test-only fault hook: kill this process at a named moment, to prove that a kill loses nothing.

Training code calls `maybe_fault(point, step)` at a few places where a crash would hurt most:

    "checkpoint"   inside `sgsd.checkpoint.save`, after the trainable weights are written into the
                   hidden temporary folder and before it is renamed into place
    "bank_update"  inside the trainer's online bank update, after extraction and merging, before
                   the new bank snapshot is saved
    "after_step"   in the trainer loop, after the optimizer step and before the metrics row of that
                   step is written

The environment variable `SGSD_FAULT=POINT:STEP` (e.g. `SGSD_FAULT=checkpoint:2`) makes the process
send SIGKILL to itself the first time `POINT` is reached at `STEP` -- no cleanup, no `finally`,
exactly what an out-of-memory killer or a pre-empted cluster job does. Without the variable (every
real run) `maybe_fault` does nothing. A malformed value is ignored rather than allowed to break
training.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "SGSD_FAULT"
POINTS = ("checkpoint", "bank_update", "after_step")


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV_VAR, "")
    point, _, step = spec.partition(":")
    if point not in POINTS or not step.strip().isdigit():
        return None
    return point, int(step)


def maybe_fault(point: str, step: int) -> None:
    """SIGKILL this process when `SGSD_FAULT` names `point` at `step`; otherwise return at once."""
    if _target() == (point, step):
        os.kill(os.getpid(), signal.SIGKILL)
