"""Multi-teacher scoring cost: the reference implementation's way against `sgsd.scoring`.

One SGSD step = score B rollouts under the student (grad) and K teachers (no grad), SGSD loss
(`sgsd.objectives.sgsd_loss`), backward. Two ways, on the same inputs and the same loss:

- reference: B*K rows; the student forward is repeated K times with grad; logits for the whole
  sequence; full-vocabulary log_softmax in the model dtype; token entropies for logging; gather. The
  teacher the same under no_grad (all B*K rows at once). Benchmark prompts all have one length, so
  the reference's right padding does not matter here.
- ours: `score_student` (one forward per problem, chunked fp32 head under checkpoint) and
  `score_teachers` (chunk_rows rows per forward, chunked head), as the trainer calls them: LoRA in
  the base precision (`sgsd.models.adapters_in_base_precision`, inside scoring) and freed heap
  returned to the OS after the teachers and after backward (`sgsd.hostmem`). Both ways get the
  same trims. `ours-before` (`--with-before`) is ours without those two measures.

Every measurement runs in a child process with RLIMIT_AS capped (default 10 GiB) and reports peak
RSS (ru_maxrss) and RSS after loading; a child that runs out of memory is reported as OOM.

    HF_HUB_OFFLINE=1 python benchmarks/scoring.py --models smollm2 qwen05b qwen3toy   # all measurements
    HF_HUB_OFFLINE=1 python benchmarks/scoring.py --compare --models smollm2 qwen3toy # fp32 equality
    HF_HUB_OFFLINE=1 python benchmarks/scoring.py --expected --models qwen05b --full-t 256 --k 4
        # the extra cost of the `expected` support estimator (score_teachers_expected)

Embedded models are the folders `sgsd.models` converts from the GGUF packages (once, into `--cache`,
default ~/.cache/sgsd).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 1024**3

from sgsd.hostmem import release_freed_memory  # noqa: E402
from sgsd.models import resolve_model_path  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# Models


EMBEDDED = {"smollm2": "embedded:smollm2-135m", "qwen05b": "embedded:qwen2.5-coder-0.5b"}


def load_model(name: str, dtype, cache: str | None = None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    if name == "qwen3toy":  # random Qwen3 architecture with the 151,936-token vocabulary
        config = Qwen3Config(
            vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
            initializer_range=0.2,
        )  # fmt: skip
        model = Qwen3ForCausalLM(config).to(dtype)
    else:  # the folder sgsd.models converts the embedded GGUF into (once)
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(EMBEDDED[name], cache), dtype=dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    for n, p in model.named_parameters():  # lora_B nonzero so lora_A gets gradient too
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    return model


# ---------------------------------------------------------------------------------------------------
# Inputs and the two ways of computing one step


def make_inputs(vocab: int, b: int, k: int, p: int, s: int, t: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(100, vocab - 100, (n,), generator=g).tolist()

    prompts = [ids(p) for _ in range(b)]
    teachers = [[ids(s) + prompts[i] for _ in range(k)] for i in range(b)]
    completions = [ids(t) for _ in range(b)]
    mask = torch.rand(b, t, generator=g) > 0.05  # [B, T] stand-in for m_t
    reward = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(b)])  # [B]
    retrieval = torch.rand(b, k, generator=g)  # [B, K]
    return prompts, teachers, completions, mask, reward, retrieval


def _loss(student_logp, teacher_logp, mask, reward, retrieval, baseline=None):
    import torch

    from sgsd.objectives import sgsd_loss

    teacher_mask = torch.ones(retrieval.shape, dtype=torch.bool, device=retrieval.device)
    estimator = "paper" if baseline is None else "expected"
    loss, _ = sgsd_loss(student_logp, teacher_logp, mask, reward, retrieval, teacher_mask,
                        support_baseline=baseline, support_estimator=estimator)  # fmt: skip
    return loss


def _reference_logp(model, rows, completions, grad: bool):
    """Whole-sequence logits, model-dtype log_softmax over V, entropy for logging, gather. [R, T]"""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([r + c for r, c in zip(rows, completions, strict=True)], device=device)  # [R, P + T]
    p, t = len(rows[0]), len(completions[0])
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # [R, P + T, V]
        logp_all = torch.log_softmax(logits[:, p - 1 : p - 1 + t], dim=-1)  # [R, T, V] model dtype
        with torch.no_grad():
            _entropy = -(logp_all.exp() * logp_all).sum(-1)  # [R, T] (logged by the reference)
        targets = torch.tensor(completions, device=device)[..., None]  # [R, T, 1]
        return logp_all.gather(-1, targets).squeeze(-1)  # [R, T]


def reference_step(model, inputs, pad_id: int):
    prompts, teachers, completions, mask, reward, retrieval = inputs
    b, k = len(teachers), len(teachers[0])
    rows_c = [completions[i] for i in range(b) for _ in range(k)]
    student = _reference_logp(model, [prompts[i] for i in range(b) for _ in range(k)], rows_c, grad=True)
    teacher = _reference_logp(model, [teachers[i][j] for i in range(b) for j in range(k)], rows_c, grad=False)
    release_freed_memory()  # the same allocator treatment as ours, so only the scoring differs
    t = len(completions[0])
    loss = _loss(student.float().view(b, k, t), teacher.float().view(b, k, t), mask, reward, retrieval)
    loss.backward()
    release_freed_memory()
    return loss


def ours_step(
    model, inputs, pad_id: int, chunk_rows: int = 4, chunk_size: int = 128, release=release_freed_memory
):
    """As the trainer does it: teachers, `release()` (a heap trim), the student, loss, backward, `release()`."""
    from sgsd.scoring import score_student, score_teachers

    prompts, teachers, completions, mask, reward, retrieval = inputs
    teacher, _ = score_teachers(
        model, teachers, completions, pad_id, chunk_rows=chunk_rows, chunk_size=chunk_size
    )
    release()
    student, _ = score_student(model, prompts, completions, pad_id, chunk_size=chunk_size)
    loss = _loss(student, teacher, mask, reward, retrieval)
    loss.backward()
    release()
    return loss


# the training sampler of the paper configs (temperature, top-k, top-p) for the expected baseline
SAMPLER = dict(temperature=1.1, top_k=20, top_p=0.95)


def ours_expected_step(model, inputs, pad_id: int, chunk_rows: int = 4, chunk_size: int = 128):
    """`ours_step` with the `expected` support estimator: the teachers are scored by
    `score_teachers_expected` (one extra no-grad student forward, both heads over the full vocabulary
    per position chunk, the sampler's top-k/top-p) and the baseline enters `sgsd_loss`."""
    from sgsd.scoring import score_student, score_teachers_expected

    prompts, teachers, completions, mask, reward, retrieval = inputs
    teacher, _, baseline = score_teachers_expected(
        model, prompts, teachers, completions, pad_id, chunk_rows=chunk_rows, chunk_size=chunk_size, **SAMPLER
    )
    release_freed_memory()
    student, _ = score_student(model, prompts, completions, pad_id, chunk_size=chunk_size)
    loss = _loss(student, teacher, mask, reward, retrieval, baseline=baseline)
    loss.backward()
    release_freed_memory()
    return loss


def ours_before_step(model, inputs, pad_id: int):
    """Ours as it was before sgsd.hostmem and adapters_in_base_precision: no trims, peft's fp32
    adapter casts (the ablation of those two memory measures, same process layout). Each variant runs
    in its own child, so switching the adapter context off for the whole process is safe."""
    import contextlib

    from sgsd import scoring

    scoring.adapters_in_base_precision = lambda module: contextlib.nullcontext()
    return ours_step(model, inputs, pad_id, release=lambda: None)


def student_piece(model, inputs, pad_id: int):
    from sgsd.scoring import score_student

    prompts, _, completions, *_ = inputs
    logp, _ = score_student(model, prompts, completions, pad_id)
    logp.sum().backward()


def teacher_piece(model, inputs, pad_id: int):
    from sgsd.scoring import score_teachers

    _, teachers, completions, *_ = inputs
    score_teachers(model, teachers, completions, pad_id)


def teacher_expected_piece(model, inputs, pad_id: int):
    from sgsd.scoring import score_teachers_expected

    prompts, teachers, completions, *_ = inputs
    score_teachers_expected(model, prompts, teachers, completions, pad_id, **SAMPLER)


STEPS = {
    "reference": reference_step,
    "ours": ours_step,
    "ours-before": ours_before_step,
    "ours-expected": ours_expected_step,
    "student": student_piece,
    "teachers": teacher_piece,
    "teachers-expected": teacher_expected_piece,
}


# ---------------------------------------------------------------------------------------------------
# Child process: one variant, one shape


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = load_model(args.model, getattr(torch, args.dtype), args.cache)
    vocab = model.get_output_embeddings().weight.shape[0]
    inputs = make_inputs(vocab, args.b, args.k, args.p, args.s, args.t)
    pad_id = 0
    after_load = _rss_gib()
    step = STEPS[args.variant]
    times = []
    for i in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step(model, inputs, pad_id)
        if i > 0 or args.repeats == 0:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_gib": peak,
        "after_load_gib": after_load,
    }


def run_child(model: str, variant: str, shape: dict, cli) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--variant", variant,
           "--dtype", cli.dtype, "--repeats", str(cli.repeats), "--threads", str(cli.threads)]  # fmt: skip
    cmd += ["--cache", cli.cache] if cli.cache else []
    cmd += [f"--{key}={value}" for key, value in shape.items()]
    limit = int(cli.mem_gib * GIB)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap)
    result = {"model": model, "variant": variant, **shape, "wall_s": round(time.perf_counter() - start, 1)}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        result.update(json.loads(lines[-1]))
    else:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        oom = "MemoryError" in proc.stderr or "alloc" in proc.stderr.lower() or proc.returncode < 0
        result["error"] = ("OOM: " if oom else "") + tail[0][:200]
    print(json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------------------------------
# fp32 equality of loss and gradients (one process, small shape)


def compare(model_name: str, cli) -> dict:
    import torch

    torch.set_num_threads(cli.threads)
    model = load_model(model_name, torch.float32, cli.cache)
    vocab = model.get_output_embeddings().weight.shape[0]
    inputs = make_inputs(vocab, b=2, k=3, p=24, s=40, t=64, seed=1)
    grads = {}
    losses = {}
    for name in ("reference", "ours"):
        model.zero_grad(set_to_none=True)
        losses[name] = float(STEPS[name](model, inputs, 0))
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    rel = float((grads["ours"] - grads["reference"]).norm() / grads["reference"].norm())
    out = {"model": model_name, "loss_reference": losses["reference"], "loss_ours": losses["ours"],
           "grad_norm_reference": float(grads["reference"].norm()), "grad_norm_ours": float(grads["ours"].norm()),
           "grad_rel_l2_diff": rel}  # fmt: skip
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen05b", "qwen3toy"])
    parser.add_argument("--compare", action="store_true", help="fp32 loss/gradient equality only")
    parser.add_argument("--cache", default=None, help="sgsd model cache (default ~/.cache/sgsd)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-gib", type=float, default=10.0, help="RLIMIT_AS per child")
    parser.add_argument("--t-list", type=int, nargs="+", default=[512, 256, 128],
                        help="completion lengths tried for the reference, largest first")  # fmt: skip
    parser.add_argument("--full-t", type=int, nargs="+", default=[512, 1024], help="shapes for ours")
    parser.add_argument("--skip-pieces", action="store_true")
    parser.add_argument("--expected", action="store_true",
                        help="only the expected-baseline cost: ours against ours-expected and teachers against "
                        "teachers-expected at the --full-t shapes (no reference)")  # fmt: skip
    parser.add_argument("--expected-variants", nargs="+",
                        default=["teachers", "teachers-expected", "ours", "ours-expected"],
                        help="with --expected: the variants run, in this order")  # fmt: skip
    parser.add_argument("--with-before", action="store_true",
                        help="also run ours without the two host-memory measures (ours-before)")  # fmt: skip
    # child-only
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model")
    parser.add_argument("--variant", choices=sorted(STEPS))
    for key, default in (("b", 2), ("k", 8), ("p", 120), ("s", 200), ("t", 512)):
        parser.add_argument(f"--{key}", type=int, default=default)
    cli = parser.parse_args()
    if cli.child:
        print(json.dumps(child(cli)), flush=True)
        return
    if cli.compare:
        for model in cli.models:
            compare(model, cli)
        return
    base = {"b": cli.b, "k": cli.k, "p": cli.p, "s": cli.s}
    if cli.expected:
        for model in cli.models:
            if model != "qwen3toy":
                resolve_model_path(EMBEDDED[model], cli.cache)
            for t in cli.full_t:
                for variant in cli.expected_variants:
                    run_child(model, variant, {**base, "t": t}, cli)
        return
    for model in cli.models:
        if model != "qwen3toy":  # convert before timing anything
            resolve_model_path(EMBEDDED[model], cli.cache)
        fitted = None
        for t in cli.t_list:  # the reference at the largest shape that fits under the cap
            ref = run_child(model, "reference", {**base, "t": t}, cli)
            if "error" not in ref:
                fitted = t
                break
        ours_variants = ["ours", "ours-before"] if cli.with_before else ["ours"]
        for t in ([fitted] if fitted is not None and fitted not in cli.full_t else []) + list(cli.full_t):
            for variant in ours_variants:
                run_child(model, variant, {**base, "t": t}, cli)
        if not cli.skip_pieces:
            run_child(model, "student", {**base, "t": cli.full_t[0]}, cli)
            run_child(model, "teachers", {**base, "t": cli.full_t[0]}, cli)


if __name__ == "__main__":
    main()
