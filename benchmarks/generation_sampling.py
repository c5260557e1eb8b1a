"""Sampling cost of the hf generator by decoding mode: greedy, plain sampling, top-p, top-k + top-p.

transformers samples over the whole vocabulary: top-k masks the other logits, top-p sorts all V of
them, and the draw is a softmax + multinomial over V. The generator's `CandidateSampler` draws among
a few candidates instead (same distribution): the k of top-k, or for top-p alone the tokens that can
lie in the nucleus. This script times the modes side by side in one process (interleaved repeats,
median; wall and process CPU seconds) on an embedded model: the training sampler (T=1.1, top-k 20,
top-p 0.95) and the evaluation sampler (T=1, top-p 0.95, no top-k) both ways, greedy and plain
sampling. EOS is disabled so every row generates exactly `--tokens` tokens.

    HF_HUB_OFFLINE=1 python benchmarks/generation_sampling.py --model embedded:qwen2.5-coder-0.5b \
        --batch 16 --tokens 64 --repeats 3 [--json]
"""

from __future__ import annotations

import argparse
import json
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

# name: (sampling parameters, draw top-k among the candidates)
MODES = {
    "greedy": (dict(temperature=0.0), True),
    "sample (top_p=1, top_k=0)": (dict(temperature=1.0, top_p=1.0, top_k=0), True),
    "eval sampler (T=1, top_p=0.95), transformers": (dict(temperature=1.0, top_p=0.95, top_k=0), False),
    "eval sampler (T=1, top_p=0.95), candidates": (dict(temperature=1.0, top_p=0.95, top_k=0), True),
    "training sampler, transformers (whole vocabulary)": (dict(temperature=1.1, top_p=0.95, top_k=20), False),
    "training sampler, candidates": (dict(temperature=1.1, top_p=0.95, top_k=20), True),
}
REFERENCE = "training sampler, transformers (whole vocabulary)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_policy(args.model, device="cpu")
    never = model.config.vocab_size + 7  # an id the model cannot sample: rows run to --tokens
    generation.eos_token_ids = lambda model, tokenizer: [never]
    generator = HFGenerator(model, tokenizer, batch_size=args.batch)
    prompts = [f"Compute {i} + {2 * i + 3} step by step." for i in range(args.batch)]
    generator.generate(prompts[:4], SamplingParams(max_new_tokens=4, seed=0))  # warm-up

    times: dict[str, list[float]] = {name: [] for name in MODES}
    cpu: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(args.repeats):
        for name, (kwargs, candidates) in MODES.items():
            generator.candidate_sampling = candidates
            params = SamplingParams(max_new_tokens=args.tokens, seed=0, **kwargs)
            start, start_cpu = time.perf_counter(), time.process_time()
            out = generator.generate(prompts, params)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            assert all(len(c.token_ids) == args.tokens for s in out for c in s)

    print(
        f"model {args.model}, dtype {model.dtype}, batch {args.batch}, {args.tokens} tokens, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}"
    )
    base = statistics.median(times[REFERENCE])
    print(f"| mode | median s | CPU s | tok/s | ms/step | speed vs {REFERENCE} |\n|---|---|---|---|---|---|")
    figures = {}
    for name, values in times.items():
        median = statistics.median(values)
        rate = args.batch * args.tokens / median
        figures[name] = {"median_s": round(median, 3), "cpu_s": round(statistics.median(cpu[name]), 3),
                         "tok_s": round(rate, 2), "speedup": round(base / median, 3)}  # fmt: skip
        print(
            f"| {name} | {median:.2f} | {figures[name]['cpu_s']:.2f} | {rate:.0f} | "
            f"{1000 * median / args.tokens:.0f} | {base / median:.2f}x |"
        )
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "tokens": args.tokens, "modes": figures}))


if __name__ == "__main__":
    main()
