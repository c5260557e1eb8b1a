"""Sampling cost of the hf generator by decoding mode: greedy, plain sampling, top-p, top-k + top-p.

HF's top-p warper sorts the whole vocabulary every step; with top_k > 0, transformers applies the
top-k warper first, so top-p then sorts only the surviving candidates' masked logits. This script
measures that side by side in one process (interleaved repeats, median) on the embedded
SmolLM2-135M. EOS is disabled so every row generates exactly `--tokens` tokens.

    HF_HUB_OFFLINE=1 python benchmarks/generation_sampling.py --batch 64 --tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sgsd.generation as generation  # noqa: E402
from sgsd.generation import HFGenerator, SamplingParams  # noqa: E402
from sgsd.models import load_policy  # noqa: E402

MODES = {
    "greedy": dict(temperature=0.0),
    "sample (top_p=1, top_k=0)": dict(temperature=1.0, top_p=1.0, top_k=0),
    "top_p=0.95": dict(temperature=1.0, top_p=0.95, top_k=0),
    "top_k=20 + top_p=0.95": dict(temperature=1.0, top_p=0.95, top_k=20),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_policy(args.model, device="cpu")
    never = model.config.vocab_size + 7  # an id the model cannot sample: rows run to --tokens
    generation.eos_token_ids = lambda model, tokenizer: [never]
    generator = HFGenerator(model, tokenizer, batch_size=args.batch)
    prompts = [f"Compute {i} + {2 * i + 3} step by step." for i in range(args.batch)]
    generator.generate(prompts[:4], SamplingParams(max_new_tokens=4, seed=0))  # warm-up

    times: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(args.repeats):
        for name, kwargs in MODES.items():
            params = SamplingParams(max_new_tokens=args.tokens, seed=0, **kwargs)
            start = time.perf_counter()
            out = generator.generate(prompts, params)
            times[name].append(time.perf_counter() - start)
            assert all(len(c.token_ids) == args.tokens for s in out for c in s)

    print(
        f"model {args.model}, dtype {model.dtype}, batch {args.batch}, {args.tokens} tokens, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}"
    )
    base = statistics.median(times["top_p=0.95"])
    print("| mode | median s | tok/s | ms/step | vs top_p=0.95 |\n|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        rate = args.batch * args.tokens / median
        print(
            f"| {name} | {median:.2f} | {rate:.0f} | {1000 * median / args.tokens:.0f} | {base / median:.2f}x |"
        )


if __name__ == "__main__":
    main()
