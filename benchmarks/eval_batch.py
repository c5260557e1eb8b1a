"""Evaluation batch size under `sgsd.decoding` (finished rows dropped): the same rows generated with
several `HFGenerator` batch sizes, one after another in one process, on the embedded model with the
learning benchmark's evaluation sampler (benchmarks/configs/learning_v2.yaml: T 1.0, top-p 0.95) and
completion budget. Prints one JSON line per batch size: wall and process CPU seconds, rows, mean and
longest completion. Larger batches share each decoding step's weight reads among more rows; with
finished rows dropped, the long tail of a batch runs at a few rows, where a step costs nearly the same
as at many (benchmarks/README.md, "Evaluation batch size under the decoding loop").

    HF_HUB_OFFLINE=1 python benchmarks/eval_batch.py --batches 128 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from sgsd.config import load_config
    from sgsd.data import load_problems
    from sgsd.generation import HFGenerator, sampling_params
    from sgsd.models import load_policy
    from sgsd.prompts import student_prompt

    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "benchmarks" / "configs" / "learning_v2.yaml"))
    p.add_argument("--source", default="reasoning_gym:chain_sum?min_terms=2&max_terms=4&max_digits=3")
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=320)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 32])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    model, tokenizer = load_policy(cfg.model.name, device="cpu")
    conversations = [
        student_prompt(x.question) for x in load_problems(args.source, size=args.problems, seed=11)
    ]
    params = dataclasses.replace(sampling_params(cfg.eval, n=args.k), max_new_tokens=args.tokens, seed=3)
    for batch in args.batches:
        generator = HFGenerator(model, tokenizer, batch_size=batch, prune_finished=True)
        cpu, wall = time.process_time(), time.perf_counter()
        out = generator.generate(conversations, params)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        tokens = [len(c.token_ids) for completions in out for c in completions]
        print(json.dumps({"batch": batch, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rows": len(tokens),
                          "mean_tokens": round(sum(tokens) / len(tokens), 1), "max_tokens": max(tokens),
                          "date": time.strftime("%Y-%m-%d %H:%M")}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
