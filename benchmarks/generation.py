"""Generation speed on the hf backend: base model, LoRA policy as sampled today, merged generation copy.

The embedded Qwen2.5-Coder-0.5B in bf16, loaded twice: plain (the base model) and with LoRA r=16,
alpha=32 on all projections (lora_B drawn from N(0, 0.02^2), so the adapter changes the outputs),
which is sampled two ways: unmerged, as the trainer does today (`HFGenerator(policy)`; adapters in
the base precision), and through `HFGenerator(policy, merged=True)` (a `MergedGenerationCopy`). A
fourth variant is the merged copy with the progress bar on, drawn to a stand-in terminal, for the
bar's cost. Greedy decoding with EOS disabled, so every row generates exactly `--tokens` tokens;
the same set of chain-sum prompts (one per row) in the student prompt (left-padded to the longest)
for every variant; the variants run interleaved within each of `--repeats` rounds (median), after
one short warm-up call each. Time includes the prefill. Also printed: the copy's extra memory, its
build and refresh times, and how far the merged copy's and the unmerged policy's greedy rows agree
(rows equal, mean common prefix): bf16 rounds the two differently, so near-ties flip now and then
and a row differs from there on; both are about equally close to the same weights computed in fp32.
`--attention` also times the base model with eager attention against SDPA (the default). First of
all, the progress bar's own work per decoding step is timed alone (`progress_cost_us`), which
contention on a shared machine distorts far less than whole generate calls.

    HF_HUB_OFFLINE=1 python benchmarks/generation.py                   # table
    HF_HUB_OFFLINE=1 python benchmarks/generation.py --json            # ... then one JSON line
    HF_HUB_OFFLINE=1 python benchmarks/generation.py --batches 4 16 32 --tokens 32 --repeats 2 --attention

With `--json` the last line is one JSON object: `base_tok_s`, `lora_tok_s`, `merged_tok_s` and
`merged_progress_tok_s` at the first batch size (4 by default), `by_batch` with every batch size's
figures, and the copy's `merged_extra_gib`, `build_s` and `refresh_s`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sgsd.generation as generation  # noqa: E402
from sgsd.config import ALL_PROJECTIONS  # noqa: E402
from sgsd.generation import HFGenerator, MergedGenerationCopy, SamplingParams  # noqa: E402
from sgsd.models import apply_lora, load_policy  # noqa: E402
from sgsd.prompts import student_prompt  # noqa: E402

VARIANTS = ("base", "lora", "merged", "merged+progress")


class _Terminal(io.StringIO):
    """A stand-in terminal: the progress bar draws into memory as it would on a real one."""

    def isatty(self) -> bool:
        return True


def prompts(count: int) -> list[str]:
    """Chain-sum questions of 3 to 6 terms in the student prompt (different lengths, so rows are padded)."""
    rng = random.Random(0)
    out = []
    for i in range(count):
        terms = [str(rng.randint(10, 99)) for _ in range(3 + i % 4)]
        expression = terms[0] + "".join(f" {rng.choice('+-')} {t}" for t in terms[1:])
        out.append(
            student_prompt(f"State the final answer to the following arithmetic problem: {expression} =")
        )
    return out


def timed(generator: HFGenerator, conversations: list[str], params: SamplingParams, progress: bool):
    """(seconds, completions) of one generate call; with `progress`, stderr is a stand-in terminal."""
    saved = sys.stderr
    if progress:
        sys.stderr = _Terminal()
    try:
        start = time.perf_counter()
        out = generator.generate(conversations, params)
        return time.perf_counter() - start, out
    finally:
        sys.stderr = saved


def progress_cost_us(rows: int, steps: int = 2000) -> float:
    """Microseconds one decoding step spends in `GenerationProgress.put` with a live tqdm bar drawn to
    a stand-in terminal: `rows` new token ids per step, none of them EOS (the common case)."""
    from tqdm.auto import tqdm

    saved = sys.stderr
    sys.stderr = _Terminal()
    try:
        bar = tqdm(total=rows * steps, desc="generate", unit="tok", leave=False, disable=None)
        progress = generation.GenerationProgress(bar, steps, eos_ids=[0])
        progress.start_batch(rows)
        tokens = torch.randint(1, 1000, (rows,))  # [R]
        start = time.perf_counter()
        for _ in range(steps):
            progress.put(tokens)
        elapsed = time.perf_counter() - start
        bar.close()
    finally:
        sys.stderr = saved
    return elapsed / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:qwen2.5-coder-0.5b")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", action="store_true", help="also time eager attention against SDPA")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument(
        "--progress-only", action="store_true", help="only time the progress bar's per-step work"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    progress_us = {batch: progress_cost_us(batch) for batch in args.batches}
    for batch, us in progress_us.items():
        print(f"progress bar: {us:.0f} us per decoding step at batch {batch}", flush=True)
    if args.progress_only:
        return

    base, tokenizer = load_policy(args.model, dtype="bfloat16", device="cpu")
    policy, _ = load_policy(args.model, dtype="bfloat16", device="cpu")
    torch.manual_seed(0)
    policy = apply_lora(policy, rank=16, alpha=32, target_modules=ALL_PROJECTIONS)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    never = base.config.vocab_size + 7  # an id no model can emit: every row runs to --tokens
    generation.eos_token_ids = lambda model, tokenizer: [never]

    start = time.perf_counter()
    copy = MergedGenerationCopy(policy)
    build_s = time.perf_counter() - start
    refresh_times = []
    for _ in range(3):
        start = time.perf_counter()
        copy.refresh()
        refresh_times.append(time.perf_counter() - start)
    extra_gib = copy.extra_bytes / 2**30
    del copy

    generators = {
        "base": HFGenerator(base, tokenizer),
        "lora": HFGenerator(policy, tokenizer),
        "merged": HFGenerator(policy, tokenizer, merged=True),
        "merged+progress": HFGenerator(policy, tokenizer, merged=True, progress=True),
    }
    warm = SamplingParams(temperature=0.0, max_new_tokens=2)
    for name, generator in generators.items():
        timed(generator, prompts(2), warm, progress=name.endswith("progress"))
    if args.attention:
        generators["base, eager attention"] = generators["base"]

    params = SamplingParams(temperature=0.0, max_new_tokens=args.tokens)
    by_batch = {}
    for batch in args.batches:
        conversations = prompts(batch)
        times: dict[str, list[float]] = {name: [] for name in generators}
        tokens: dict[str, list] = {}
        for _ in range(args.repeats):
            for name, generator in generators.items():
                generator.batch_size = batch
                eager = name.endswith("eager attention")
                base.set_attn_implementation("eager" if eager else "sdpa")
                seconds, out = timed(generator, conversations, params, progress=name.endswith("progress"))
                base.set_attn_implementation("sdpa")
                assert all(len(c.token_ids) == args.tokens for s in out for c in s)
                times[name].append(seconds)
                tokens[name] = [c.token_ids for s in out for c in s]
        pairs = list(zip(tokens["merged"], tokens["lora"], strict=True))
        agree = sum(a == b for a, b in pairs) / batch
        prefix = statistics.mean(
            next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in pairs
        )
        rates = {name: batch * args.tokens / statistics.median(ts) for name, ts in times.items()}
        by_batch[batch] = {
            "tok_s": rates,
            "times_s": times,
            "merged_lora_rows_agree": agree,
            "merged_lora_common_prefix": prefix,
        }
        print(f"batch {batch}, {args.tokens} new tokens per row, median of {args.repeats}:", flush=True)
        for name, rate in rates.items():
            print(f"  {name:24s} {rate:7.1f} tok/s  {rate / rates['base']:5.2f}x base", flush=True)
        print(
            f"  merged / lora {rates['merged'] / rates['lora']:.2f}x; progress bar costs "
            f"{1 - rates['merged+progress'] / rates['merged']:+.1%}; greedy rows equal merged vs lora: {agree:.0%} "
            f"(mean common prefix {prefix:.1f} of {args.tokens} tokens)",
            flush=True,
        )
    print(
        f"merged copy: +{extra_gib:.3f} GiB, built in {build_s:.2f} s, "
        f"refresh {statistics.median(refresh_times):.2f} s (median of 3)"
    )
    if args.json:
        first = by_batch[args.batches[0]]["tok_s"]
        print(
            json.dumps(
                {
                    "model": args.model,
                    "batch": args.batches[0],
                    "tokens": args.tokens,
                    "repeats": args.repeats,
                    "base_tok_s": round(first["base"], 2),
                    "lora_tok_s": round(first["lora"], 2),
                    "merged_tok_s": round(first["merged"], 2),
                    "merged_progress_tok_s": round(first["merged+progress"], 2),
                    "progress_us_per_step": {str(b): round(us, 1) for b, us in progress_us.items()},
                    "merged_extra_gib": round(extra_gib, 3),
                    "build_s": round(build_s, 3),
                    "refresh_s": round(statistics.median(refresh_times), 3),
                    "by_batch": {str(b): r for b, r in by_batch.items()},
                    "load_average": os.getloadavg(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        )


if __name__ == "__main__":
    main()
