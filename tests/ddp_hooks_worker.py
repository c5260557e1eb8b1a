"""Run by tests/test_engines.py under `accelerate launch` (2 CPU processes, DDP): teacher forwards
(no grad; a different number on each rank, EMA teacher adapter) before a student backward must not
touch DDP's reducer or run a collective, and the student's gradient must be the ranks' average.

Writes RUN/hooks-rank-N.json: the max difference between the DDP gradient and the average of the
ranks' local gradients (each computed first through the unwrapped module, which reduces nothing)."""

import json
import sys
from pathlib import Path

import torch

from sgsd.engine import Engine, make_accelerator
from sgsd.models import TeacherPolicy, apply_lora, load_policy


def student_loss(forward, head, ids):
    ones = torch.ones_like(ids)
    hidden = forward(input_ids=ids, attention_mask=ones, position_ids=ones.cumsum(-1) - 1)
    return head(hidden).float().logsumexp(-1).mean()


def main(run_dir: Path, model_dir: str):
    torch.set_num_threads(1)
    acc = make_accelerator(cpu=True)
    rank = acc.process_index
    policy, _ = load_policy(model_dir, dtype="float32")
    policy = apply_lora(policy, rank=4, alpha=8)
    teacher = TeacherPolicy(policy, mode="ema", ema_decay=0.5)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    engine = Engine(acc, policy, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert engine.kind == "ddp", engine.kind
    head = policy.get_base_model().get_output_embeddings()
    torch.manual_seed(100 + rank)
    ids = torch.randint(0, 500, (2, 7))  # [2, 7] this rank's student rows

    # this rank's own gradient, through the unwrapped module (no reducer involved)
    student_loss(engine.plain, head, ids).backward()
    local = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    opt.zero_grad(set_to_none=True)
    gathered = [None] * acc.num_processes
    torch.distributed.all_gather_object(gathered, local)
    expected = {n: sum(g[n] for g in gathered) / acc.num_processes for n in local}

    # teacher forwards, unequal across ranks, then the student step through the engine
    for _ in range(1 + 2 * rank):
        with teacher.scoring():
            engine.scoring_model.decoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         position_ids=torch.arange(7).expand(2, 7))  # fmt: skip
    engine.start_step(1)
    with engine.accumulate():
        acc.backward(student_loss(engine.scoring_model.decoder, head, ids))
    diff = max(
        (p.grad - expected[n]).abs().max().item() for n, p in policy.named_parameters() if n in expected
    )
    (run_dir / f"hooks-rank-{rank}.json").write_text(json.dumps({"max_diff": diff, "params": len(expected)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
