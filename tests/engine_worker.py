"""Run by tests/test_engines.py, alone or under `accelerate launch` (2 CPU processes): train the tiny
config and write the final trainable tensors to RUN/final.safetensors (main process).

    python engine_worker.py RUN [--stop-after N] [--resume] [--nan-step S] key=value ...

Rollouts are made independent of how the batch is split over processes, so a 2-process run can be
compared with one process: completions are still generated (under FSDP that is the gathered-weights
path), then replaced by tokens derived from the problem, and graded by a hash of the problem, not by
the verifier. `--stop-after N` ends the loop after step N (the schedule still spans train.steps), to
resume later with `--resume`. `--nan-step S` makes the last process's losses NaN at step S (a step
every engine must skip).

Accelerate selects FSDP and DeepSpeed only on GPUs; launched with an FSDP or DeepSpeed config file on
CPU (the launcher sets ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED and the variables of the plugin),
the state is switched by hand to the plugin those variables describe, so the same
`accelerator.prepare` path runs (FSDP2 `fully_shard`, or DeepSpeed's engine, over gloo).
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


def poison_step(trainer, step: int) -> None:
    """The last process's micro-batch losses at step `step` become NaN."""
    inner = trainer.loss

    def loss(chunk, normalizer):
        value, metrics, seen = inner(chunk, normalizer)
        if trainer.step + 1 == step and trainer.acc.process_index == trainer.acc.num_processes - 1:
            value = value * float("nan")
        return value, metrics, seen

    loss.batch_count = inner.batch_count
    trainer.loss = loss


def accelerator():
    acc = make_accelerator(cpu=True)
    if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true" and acc.distributed_type != "FSDP":
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = AcceleratorState()
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        state.distributed_type = DistributedType.FSDP
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true" and acc.distributed_type != "DEEPSPEED":
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DeepSpeedPlugin, DistributedType

        plugin = DeepSpeedPlugin()  # from the launcher's ACCELERATE_DEEPSPEED_* variables
        plugin.select(_from_accelerator_state=True)
        AcceleratorState().deepspeed_plugins = plugin
        # both states: every AcceleratorState() copies the PartialState's distributed type
        PartialState().distributed_type = AcceleratorState().distributed_type = DistributedType.DEEPSPEED
    return acc


def main(argv):
    run_dir, rest = Path(argv[0]), argv[1:]
    options = {}
    for flag in ("--stop-after", "--nan-step"):
        if flag in rest:
            i = rest.index(flag)
            options[flag] = int(rest[i + 1])
            rest = rest[:i] + rest[i + 2 :]
    stop_after, resume = options.get("--stop-after"), "--resume" in rest
    rest = [x for x in rest if x != "--resume"]
    torch.set_num_threads(1)
    cfg = load_config(resolve_config_path("tiny"), rest)
    trainer = SplitIndependentTrainer(cfg, run_dir, resume=resume, accelerator=accelerator())
    if "--nan-step" in options:
        poison_step(trainer, options["--nan-step"])
    if stop_after is not None:
        trainer.cfg.train.steps = stop_after  # the loop stops; the schedule was built for the full run
    trainer.train()
    state = trainer.engine.full_trainable_state()  # every rank (gathers under FSDP)
    if trainer.is_main:
        from safetensors.torch import save_file

        save_file(state, str(run_dir / "final.safetensors"))
        (run_dir / "engine.txt").write_text(trainer.engine.kind)
    trainer.acc.wait_for_everyone()  # as `sgsd train`: no rank exits while another still uses the group
    trainer.acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
