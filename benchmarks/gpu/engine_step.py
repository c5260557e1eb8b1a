"""Training steps through the engine (`sgsd.engine`) against the plain path, on a random-weight model.

Each step: teacher rows scored without grad, the student with grad (`sgsd.scoring`), a loss, the
backward, clipping and an AdamW step. `--path plain` runs the policy as before this engine existed
(no `accelerator.prepare`); `--path engine` runs it through whatever engine the launcher selects:

    python benchmarks/gpu/engine_step.py --path plain                                  # today's path
    accelerate launch --config_file benchmarks/gpu/accelerate-1gpu-ddp.yaml benchmarks/gpu/engine_step.py
    accelerate launch --config_file benchmarks/gpu/accelerate-1gpu-fsdp.yaml benchmarks/gpu/engine_step.py
    python benchmarks/gpu/engine_step.py --tiny --path engine                          # CPU, seconds

Reports the engine kind, median step time after one warm-up, peak GPU memory and the last loss, as
JSON on stdout and in $OUT/engine_step-SIZE-KIND.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from step_benchmark import build_model  # noqa: E402  (after the path set-up)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model and shape (CPU, seconds)")
    p.add_argument("--size", default="qwen3-1.7b")
    p.add_argument("--path", choices=["plain", "engine"], default="engine")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--lora-rank", type=int, default=64)
    a = p.parse_args(argv)

    import torch

    from sgsd.engine import Engine, make_accelerator
    from sgsd.scoring import score_student, score_teachers

    size = "tiny" if a.tiny else a.size
    cuda = torch.cuda.is_available() and not a.tiny
    acc = make_accelerator(cpu=not cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(size, dtype, acc.device, a.lora_rank, 2 * a.lora_rank, checkpointing=not a.tiny)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    b, k, prompt, t = (2, 2, 16, 16) if a.tiny else (2, 8, 300, 1024)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_base_model().config.vocab_size
    rand = lambda n: torch.randint(10, vocab - 10, (n,), generator=g).tolist()  # noqa: E731
    prompts, completions = [rand(prompt) for _ in range(b)], [rand(t) for _ in range(b)]
    teachers = [[rand(prompt + 200 * (not a.tiny)) for _ in range(k)] for _ in range(b)]

    if a.path == "engine":
        engine = Engine(acc, model, opt, sched)
        scoring, kind = engine.scoring_model, engine.kind
        params, opt, sched = engine.trainable(), engine.optimizer, engine.scheduler
    else:
        engine, scoring, kind, params = (
            None,
            model,
            "plain",
            [q for q in model.parameters() if q.requires_grad],
        )

    def step() -> float:
        model.train()
        with torch.no_grad():
            teacher, _ = score_teachers(scoring, teachers, completions, 0, chunk_rows=4)  # [B, K, T]
        logp, valid = score_student(scoring, prompts, completions, 0)  # [B, T]
        loss = ((teacher.mean(1) - logp) * valid).sum() / valid.sum()
        if engine is not None:
            engine.start_step(1)
            with engine.accumulate():
                engine.backward(loss)
            engine.clip_grad_norm(1.0)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], step()
    for _ in range(a.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = dict(size=size, kind=kind, processes=acc.num_processes, step_s=statistics.median(times), loss=loss,
                  peak_gib=torch.cuda.max_memory_allocated() / 1024**3 if cuda else None)  # fmt: skip
    if acc.is_main_process:
        print(json.dumps(result))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"engine_step-{size}-{kind}.json").write_text(
                json.dumps(result, indent=1)
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
