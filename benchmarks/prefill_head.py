"""Prefill cost of a LoRA policy with and without `sgsd.models.contiguous_head_inputs`.

transformers computes prefill logits for the last position only; that `[rows, 1, H]` strided view
reaches the frozen bf16 head, and torch's matmul then copies the head weight once per row. One
child process per variant (fresh heap), the embedded model in bf16 with LoRA r=16 on all
projections, a no-grad forward of `--rows` prompts of `--prompt` tokens with `logits_to_keep=1`
(what `model.generate` runs first), after one warm-up forward of two rows. Reports the median time
over `--repeats` and the process's peak RSS; the logits of the two variants must agree.

    HF_HUB_OFFLINE=1 python benchmarks/prefill_head.py --rows 32 --prompt 65 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def child(args) -> dict:
    import torch

    from sgsd.config import ALL_PROJECTIONS
    from sgsd.models import apply_lora, load_policy

    torch.set_num_threads(args.threads)
    model, _ = load_policy(args.model, dtype="bfloat16", device="cpu")  # hooks the head
    if args.variant == "unhooked":
        model.get_output_embeddings()._forward_pre_hooks.clear()
    model = apply_lora(model, rank=16, alpha=32, target_modules=ALL_PROJECTIONS)
    ids = torch.randint(100, 20_000, (args.rows, args.prompt), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(input_ids=ids[:2], logits_to_keep=1)
        for _ in range(args.repeats):
            start = time.perf_counter()
            logits = model(input_ids=ids, logits_to_keep=1).logits  # [rows, 1, V]
            times.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "logits_sum": float(logits.float().sum()),
        "logits_head": logits[0, 0, :4].float().tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:qwen2.5-coder-0.5b")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=["hooked", "unhooked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)), flush=True)
        return
    results = {}
    for variant in ("unhooked", "hooked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--rows", str(args.rows),
               "--prompt", str(args.prompt), "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]), flush=True)
    slow, fast = results["unhooked"], results["hooked"]
    print(
        f"rows={args.rows} prompt={args.prompt}: unhooked {slow['median_s']:.2f} s, {slow['peak_gib']:.2f} GiB; "
        f"hooked {fast['median_s']:.2f} s, {fast['peak_gib']:.2f} GiB; "
        f"{slow['median_s'] / fast['median_s']:.2f}x time, {slow['peak_gib'] / fast['peak_gib']:.2f}x peak RSS; "
        f"logits equal: {slow['logits_head'] == fast['logits_head']}"
    )


if __name__ == "__main__":
    main()
