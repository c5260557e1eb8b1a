"""Dropping finished rows: sgsd's decoding loop against transformers' `generate`, side by side.

`generate` keeps every row of a batch in every forward until the longest row ends; `sgsd.decoding`
drops a row from the batch and its KV cache once it has emitted an end-of-sequence token. This script
samples the same prompts both ways in one process (alternating order, `--repeats` times) on an
embedded model with the evaluation sampler (T=1, top_p=0.95) and reports per way: wall and process
CPU seconds, tokens generated, the row-steps computed (the rows of every decoding forward, counted
by a hook on the model), and the completions' mean length and truncated fraction (the
two ways draw other samples from the same distribution). `--no-eos` makes every row run to
`--tokens`, which measures the loop's own overhead where there is nothing to drop; `--compile` adds
the loop over `torch.compile(model, dynamic=True)` (its compilation is timed in the warm-up).

    HF_HUB_OFFLINE=1 python benchmarks/decoding.py --problems 8 --k 4 --tokens 320 --repeats 1 --json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import sgsd.generation as generation  # noqa: E402
from sgsd.data import load_problems  # noqa: E402
from sgsd.generation import HFGenerator, SamplingParams  # noqa: E402
from sgsd.models import load_policy  # noqa: E402
from sgsd.prompts import student_prompt  # noqa: E402

WAYS = {"transformers generate": False, "sgsd decode (drops finished rows)": True}
REFERENCE = "transformers generate"
COMPILED = "sgsd decode, torch.compile(dynamic=True)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:qwen2.5-coder-0.5b")
    parser.add_argument("--source", default="reasoning_gym:chain_sum?min_terms=2&max_terms=4&max_digits=3")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="samples per problem")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-eos", action="store_true", help="rows run to --tokens (loop overhead)")
    parser.add_argument("--compile", action="store_true", help="also time the loop over a compiled model")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_policy(args.model, device="cpu")
    if args.no_eos:
        never = model.config.vocab_size + 7  # an id the model cannot sample
        generation.eos_token_ids = lambda model, tokenizer: [never]
    problems = load_problems(args.source, size=args.problems, seed=1)
    prompts = [student_prompt(p.question) for p in problems]
    ways = dict(WAYS)
    generators = {name: HFGenerator(model, tokenizer, batch_size=args.batch, prune_finished=prune)
                  for name, prune in ways.items()}  # fmt: skip
    if args.compile:  # the pruning loop over a compiled copy (dynamic shapes: batch and length vary)
        ways[COMPILED] = True
        compiled = torch.compile(copy.deepcopy(model), dynamic=True)
        generators[COMPILED] = HFGenerator(compiled, tokenizer, batch_size=args.batch)
    step_rows: list[int] = []  # the rows of each decoding forward (one new token per row)

    def count_rows(module, args, kwargs):
        ids = kwargs["input_ids"]  # [rows, 1] for a decoding step, [rows, P] for a prefill
        if ids.shape[1] == 1:
            step_rows.append(ids.shape[0])

    warm_up_s = {}
    for name, generator in generators.items():
        start = time.perf_counter()
        generator.generate(prompts[:2], SamplingParams(max_new_tokens=8, n=3, seed=0))  # shrinking batch
        warm_up_s[name] = round(time.perf_counter() - start, 1)
    for module in {id(g.model): g.model for g in generators.values()}.values():  # the modules called
        module.register_forward_pre_hook(count_rows, with_kwargs=True)
    print(f"  warm-up (compilation included) s: {warm_up_s}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in ways}
    for repeat in range(args.repeats):
        order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
        for name in order:
            generator = generators[name]
            params = SamplingParams(
                temperature=1.0, top_p=0.95, max_new_tokens=args.tokens, n=args.k, seed=repeat
            )
            step_rows.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = generator.generate(prompts, params)
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            lengths = [len(c.token_ids) for samples in out for c in samples]
            row_steps = sum(step_rows)
            runs[name].append(
                {
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "tokens": sum(lengths),
                    "row_steps": row_steps,
                    "truncated": sum(c.finish_reason == "length" for s in out for c in s) / len(lengths),
                }  # fmt: skip
            )
            print(f"  {name}: {wall:.1f} s, {cpu:.1f} CPU-s, {sum(lengths)} tokens", flush=True)

    print(
        f"model {args.model}, {args.problems} problems x {args.k}, batch {args.batch}, <= {args.tokens} tokens, "
        f"{args.threads} threads, eos {'off' if args.no_eos else 'on'}, load average {os.getloadavg()[0]:.1f}"
    )
    totals = {name: {key: sum(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    reference = totals[REFERENCE]
    print(
        "| way | wall s | CPU s | tokens (mean) | row-steps | CPU-ms per token | truncated | CPU-s vs generate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    figures = {}
    for name, t in totals.items():
        figures[name] = {
            "wall_s": round(t["wall_s"], 1),
            "cpu_s": round(t["cpu_s"], 1),
            "tokens": t["tokens"],
            "row_steps": t["row_steps"],
            "mean_tokens": round(t["tokens"] / (args.problems * args.k * args.repeats), 1),
            "cpu_ms_per_token": round(1000 * t["cpu_s"] / t["tokens"], 1),
            "truncated": round(t["truncated"] / args.repeats, 3),
            "cpu_speedup": round(reference["cpu_s"] / t["cpu_s"], 3),
            "wall_speedup": round(reference["wall_s"] / t["wall_s"], 3),
        }
        f = figures[name]
        print(
            f"| {name} | {f['wall_s']} | {f['cpu_s']} | {f['tokens']} ({f['mean_tokens']}) | {f['row_steps']} | "
            f"{f['cpu_ms_per_token']} | {f['truncated']:.0%} | {f['cpu_speedup']:.2f}x |"
        )
    if args.json:
        print(json.dumps({"model": args.model, "source": args.source, "problems": args.problems, "k": args.k,
                          "batch": args.batch, "tokens": args.tokens, "eos": not args.no_eos,
                          "repeats": args.repeats, "warm_up_s": warm_up_s, "ways": figures}))  # fmt: skip


if __name__ == "__main__":
    main()
