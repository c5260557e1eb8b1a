"""One SGSD training step at Qwen3-1.7B size on a GPU: `sgsd.scoring` against the reference way of scoring.

`--size qwen2.5-0.5b` (the embedded default's architecture) and `--size smollm2-135m` take the
shape of benchmarks/scoring.py's CPU runs (B=2, K=8, P=120, S=200, T=512) instead.

The model is built from a config with random weights (no download); by default Qwen3: hidden 2048, 28 layers, 16
heads, 8 KV heads, head_dim 128, intermediate 6144, vocabulary 151,936, tied embeddings, bf16; LoRA
r=64 / alpha=128 on all seven projections (lora_B drawn nonzero so every adapter matrix gets a
gradient), gradient checkpointing on. Inputs (benchmarks/scoring.py `make_inputs`): B=2 problems,
K=8 teachers, student prompt P=300 tokens, teacher skill block S=200 tokens (teacher prompt S+P),
T=1024 completion tokens; random token ids.

One step = score the B completions under the student (grad) and the K teachers (no grad), SGSD loss
(`sgsd.objectives.sgsd_loss`), backward. Two ways, both taken from benchmarks/scoring.py:

- ours: `sgsd.scoring.score_student` (one forward per problem) + `score_teachers` (chunk_rows rows
  per forward); completion positions only, chunked full-vocabulary logsumexp in fp32.
- reference: the student forward repeated K times with grad over B*K rows, whole-sequence logits,
  full-vocabulary log_softmax in bf16, token entropy for logging, gather; the teacher the same under
  no_grad.

Reported per way: median step time over `--repeats` steps after one warm-up, peak GPU memory
(`torch.cuda.max_memory_allocated`, and above the loaded model) and the loss; CUDA out-of-memory is
caught and reported as {"error": "OOM"}. The JSON result is printed and written to $OUT/gpu_step-SIZE-tT-rROWS-cCHUNK.json
when $OUT is set (or to --json PATH).

    python benchmarks/gpu/step_benchmark.py                         # the device machine
    python benchmarks/gpu/step_benchmark.py --tiny                  # tiny sizes, CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sgsd.config import ALL_PROJECTIONS  # noqa: E402  (after the path set-up)

GIB = 1024**3
MODEL_SIZES = {  # model_type + config fields; weights are random
    "qwen3-1.7b": dict(
        model_type="qwen3",
        hidden_size=2048,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=6144,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    ),
    # the embedded default's architecture (Qwen2.5-Coder-0.5B-Instruct as `sgsd.models` converts it
    # from the GGUF: untied output layer)
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=512,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        initializer_range=0.2,  # peaked logits, so teachers and student differ and the loss is not 0
    ),
}
# the small models take benchmarks/scoring.py's CPU shape, so GPU and CPU figures line up
SHAPES = {
    "qwen3-1.7b": dict(b=2, k=8, p=300, s=200, t=1024),
    "qwen2.5-0.5b": dict(b=2, k=8, p=120, s=200, t=512),
    "smollm2-135m": dict(b=2, k=8, p=120, s=200, t=512),
    "tiny": dict(b=2, k=3, p=16, s=24, t=32),
}


def _scoring_bench():
    """benchmarks/scoring.py as a module (the reference way and `ours_step` live there)."""
    spec = importlib.util.spec_from_file_location("benchmarks_scoring", ROOT / "benchmarks" / "scoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(size: str, dtype, device, lora_rank: int, lora_alpha: int, checkpointing: bool):
    """A random-weight causal LM of `size` on `device` with a LoRA adapter (lora_B nonzero)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sgsd.models import apply_lora

    torch.manual_seed(0)
    fields = dict(MODEL_SIZES[size])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = apply_lora(
        model,
        rank=lora_rank,
        alpha=lora_alpha,
        target_modules=ALL_PROJECTIONS,
        gradient_checkpointing=checkpointing,
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    model.train()  # checkpointing is active in training mode only
    return model


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def measure(step, model, inputs, pad_id: int, repeats: int, device) -> dict:
    """Median time of `repeats` steps after one warm-up; peak memory over all of them; the last loss."""
    import torch

    model.zero_grad(set_to_none=True)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    times, loss = [], None
    try:
        for i in range(repeats + 1):
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            loss = float(step(model, inputs, pad_id).detach())
            _sync(device)
            if i > 0 or repeats == 0:
                times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        result = {"error": "OOM", "message": str(exc).splitlines()[0][:300]}
    else:
        grads = [p.grad.float().norm() ** 2 for p in model.parameters() if p.grad is not None]
        result = {
            "median_s": statistics.median(times),
            "times_s": [round(t, 4) for t in times],
            "loss": loss,
            "grad_norm": float(torch.stack(grads).sum().sqrt()) if grads else 0.0,
        }
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        result.update(
            peak_gib=round(peak / GIB, 3),
            peak_above_model_gib=round((peak - before) / GIB, 3),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 3),
        )
        torch.cuda.empty_cache()
    else:  # CPU: the process's peak resident set so far (monotonic, so only the first way is its own)
        result["peak_rss_gib_process"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3
        )
    return result


def _environment(device) -> dict:
    import peft
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1))
    return env


def run(cli) -> dict:
    import torch

    size = "tiny" if cli.tiny else cli.size
    device = torch.device(cli.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cli.dtype or ("float32" if cli.tiny else "bfloat16"))
    torch.set_num_threads(min(torch.get_num_threads(), cli.threads))
    shape = {key: getattr(cli, key) or default for key, default in SHAPES[size].items()}
    bench = _scoring_bench()
    ways = {
        "ours": lambda model, inputs, pad: bench.ours_step(
            model, inputs, pad, cli.chunk_rows, cli.chunk_size
        ),
        "reference": bench.reference_step,
    }
    result = {
        "benchmark": "gpu_step",
        "model": size,
        "model_config": MODEL_SIZES[size],
        "dtype": str(dtype).removeprefix("torch."),
        "lora": {"rank": cli.lora_rank, "alpha": cli.lora_alpha, "targets": ALL_PROJECTIONS},
        "gradient_checkpointing": not cli.no_gradient_checkpointing,
        "shape": shape,
        "chunk_rows": cli.chunk_rows,
        "chunk_size": cli.chunk_size,
        "repeats": cli.repeats,
        "environment": _environment(device),
        "results": {},
    }
    started = time.perf_counter()
    model = build_model(size, dtype, device, cli.lora_rank, cli.lora_alpha, not cli.no_gradient_checkpointing)
    result["build_s"] = round(time.perf_counter() - started, 2)
    if device.type == "cuda":
        result["model_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 3)
    prompts, teachers, completions, mask, reward, retrieval = bench.make_inputs(
        MODEL_SIZES[size]["vocab_size"], shape["b"], shape["k"], shape["p"], shape["s"], shape["t"]
    )
    inputs = (prompts, teachers, completions, mask.to(device), reward.to(device), retrieval.to(device))
    for way in cli.ways:
        result["results"][way] = measure(ways[way], model, inputs, 0, cli.repeats, device)
        print(json.dumps({way: result["results"][way]}), flush=True)
    ours, ref = result["results"].get("ours", {}), result["results"].get("reference", {})
    if "median_s" in ours and "median_s" in ref:
        result["time_ratio_reference_over_ours"] = round(ref["median_s"] / ours["median_s"], 3)
        result["loss_abs_diff"] = abs(ref["loss"] - ours["loss"])
        result["grad_norm_rel_diff"] = abs(ref["grad_norm"] - ours["grad_norm"]) / max(
            ref["grad_norm"], 1e-30
        )
        if "peak_above_model_gib" in ours and ours["peak_above_model_gib"] > 0:
            result["peak_above_model_ratio_reference_over_ours"] = round(
                ref["peak_above_model_gib"] / ours["peak_above_model_gib"], 3
            )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model and shape (CPU test, seconds)")
    parser.add_argument(
        "--size", default="qwen3-1.7b", choices=[s for s in MODEL_SIZES if s != "tiny"], help="architecture"
    )
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", help="bfloat16 (default) / float32 (default with --tiny) / float16")
    parser.add_argument("--ways", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--chunk-rows", type=int, default=4, help="teacher rows per forward (ours)")
    parser.add_argument(
        "--chunk-size", type=int, default=128, help="completion positions per head chunk (ours)"
    )
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=128)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads at most")
    for key in ("b", "k", "p", "s", "t"):
        parser.add_argument(f"--{key}", type=int, help=f"override the shape's {key.upper()}")
    parser.add_argument(
        "--json",
        type=Path,
        help="also write the result here (default: $OUT/gpu_step-SIZE-tT-rROWS-cCHUNK.json)",
    )
    cli = parser.parse_args(argv)
    result = run(cli)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    targets = [cli.json] if cli.json else []
    if os.environ.get("OUT"):
        targets.append(
            Path(os.environ["OUT"])
            / f"gpu_step-{result['model']}-t{result['shape']['t']}-r{cli.chunk_rows}-c{cli.chunk_size}.json"
        )
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
