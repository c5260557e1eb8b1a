"""Run by tests/test_engines.py, alone or under `accelerate launch` (2 CPU processes): train the tiny
config and write the final trainable tensors to RUN/final.safetensors (main process).

    python engine_worker.py RUN [--stop-after N] [--resume] key=value ...

Rollouts are made independent of how the batch is split over processes, so a 2-process run can be
compared with one process: completions are still generated (under FSDP that is the gathered-weights
path), then replaced by tokens derived from the problem, and graded by a hash of the problem, not by
the verifier. `--stop-after N` ends the loop after step N (the schedule still spans train.steps), to
resume later with `--resume`.

Accelerate selects FSDP only on GPUs; launched with an FSDP config file on CPU (the launcher sets
ACCELERATE_USE_FSDP and the FSDP_* variables), the state is switched to FSDP by hand with the plugin
those variables describe, so the same `accelerator.prepare` path (FSDP2 `fully_shard` over gloo) runs.
"""

import hashlib
import os
import sys
from pathlib import Path

import torch

import sgsd.verifier as verifier
from sgsd.config import load_config
from sgsd.configs import resolve_config_path
from sgsd.engine import make_accelerator
from sgsd.trainer import Trainer


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


class _Verdict:
    def __init__(self, ok):
        self.correct, self.reason, self.extracted = ok, None, None


verifier.grade_many = lambda pairs, **kw: [_Verdict(_digest(answer) % 2 == 0) for _, answer in pairs]


class SplitIndependentTrainer(Trainer):
    def _rollouts(self, problems, round_index=None):
        rollouts = super()._rollouts(problems, round_index)
        for r in rollouts:
            h = _digest(r.problem.question)
            r.completion_ids = [100 + (h >> (8 * i)) % 900 for i in range(3 + h % 5)]
            r.completion_text = self.tokenizer.decode(r.completion_ids)
        return rollouts


def accelerator():
    acc = make_accelerator(cpu=True)
    if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true" and acc.distributed_type != "FSDP":
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = AcceleratorState()
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        state.distributed_type = DistributedType.FSDP
    return acc


def main(argv):
    run_dir, rest = Path(argv[0]), argv[1:]
    stop_after, resume = None, "--resume" in rest
    if "--stop-after" in rest:
        stop_after = int(rest[rest.index("--stop-after") + 1])
        rest = [x for x in rest if x not in ("--stop-after", str(stop_after))]
    rest = [x for x in rest if x != "--resume"]
    torch.set_num_threads(1)
    cfg = load_config(resolve_config_path("tiny"), rest)
    trainer = SplitIndependentTrainer(cfg, run_dir, resume=resume, accelerator=accelerator())
    if stop_after is not None:
        trainer.cfg.train.steps = stop_after  # the loop stops; the schedule was built for the full run
    trainer.train()
    state = trainer.engine.full_trainable_state()  # every rank (gathers under FSDP)
    if trainer.is_main:
        from safetensors.torch import save_file

        save_file(state, str(run_dir / "final.safetensors"))
        (run_dir / "engine.txt").write_text(trainer.engine.kind)


if __name__ == "__main__":
    main(sys.argv[1:])
