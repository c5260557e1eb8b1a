"""Configuration: typed dataclasses are the source of truth.

Defaults are the paper's SGSD settings (Tables 11-12, Appendix E). YAML files
only set values; dotted overrides from the command line (`objective.tau=0.5`)
are applied after the file. Every value is validated: an unknown key names
itself and the nearest valid key, a wrong type names the expected type, an
out-of-range value names its range.

    cfg = load_config("configs/demo.yaml", ["objective.tau=0.5"])
    print(dump_config(cfg))
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from sgsd.errors import ConfigError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    # policy: a hub id (Qwen/Qwen3-1.7B), a local folder, or an embedded model (embedded:qwen2.5-coder-0.5b)
    name: str = "embedded:qwen2.5-coder-0.5b"
    # weights dtype: auto (bf16 where supported, else fp32), float32, bfloat16, float16
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # LoRA rank (paper: 64); 0 trains the full model
    lora_rank: int = 64
    # LoRA alpha (paper: 128)
    lora_alpha: int = 128
    # LoRA dropout (paper: not stated; official GRPO: TRL's 0.05; official OPSD/SGSD: 0, since their trainer
    # zeroes every nn.Dropout of the PEFT model, LoRA's included)
    lora_dropout: float = 0.0
    # modules that get LoRA adapters (paper: all attention and MLP projections)
    lora_target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    # gradient checkpointing on the decoder (paper: on)
    gradient_checkpointing: bool = False
    # attention implementation passed to transformers (None = library default, e.g. sdpa)
    attn_implementation: str | None = None
    # where converted embedded models are cached (None = ~/.cache/sgsd)
    cache_dir: str | None = None


@dataclass
class DataConfig:
    # training problems: reasoning_gym:TASK, champ, hf:PRESET (dapo_math, gsm8k, ...), or a local file
    train_source: str = "hf:dapo_math"
    # number of training problems drawn (generators) or kept (files); None = all
    train_size: int | None = None
    # held-out problems used for evaluation during/after training
    eval_sources: list[str] = field(default_factory=lambda: ["hf:aime24", "hf:aime25", "hf:hmmt25"])
    # problems per evaluation source; None = all
    eval_size: int | None = None
    # validation problems per evaluation source, a split apart from the held-out (test) problems for
    # choosing settings and checkpoints: drawn with generator seed data.seed + 2 (files: a seeded sample of
    # the problems not in the test split), evaluated in the loop next to the test sources (summary
    # "validation", trackers val/...), and kept out of training by the contamination guard; None = none
    validation_size: int | None = None
    # column mapping for local files, e.g. {question: problem, answer: final}
    columns: dict[str, str] = field(default_factory=dict)
    # seed for generators and problem sampling
    seed: int = 0
    # drop training/bank problems whose normalised text matches an evaluation problem
    contamination_guard: bool = True


@dataclass
class RolloutConfig:
    # generator backend for student rollouts (and evaluation during training): hf (transformers); vllm (GPU
    # extra; a colocated engine in this process that samples with the LoRA adapter saved after every
    # step); vllm_server (a separately started `vllm serve MODEL --enable-lora` at rollout.vllm_server_url:
    # after every step the adapter is saved to RUN/rollout-adapter and loaded into the server, which must
    # see that folder at the same absolute path, i.e. a shared filesystem; README "vLLM: colocated or as
    # a server")
    backend: Literal["hf", "vllm", "vllm_server"] = "hf"
    # sampling temperature (paper, SGSD/OPSD: 1.1; GRPO: 1.2)
    temperature: float = 1.1
    # nucleus sampling (1.0 disables)
    top_p: float = 0.95
    # top-k sampling (0 disables)
    top_k: int = 20
    # completion token budget (paper, SGSD: 1024)
    max_new_tokens: int = 1024
    # rollouts per prompt (SGSD/OPSD: 1; GRPO: G = 8)
    num_generations: int = 1
    # student chat template thinking mode (paper: off for the student)
    enable_thinking: bool = False
    # sequences generated at once by the hf backend
    batch_size: int = 32
    # hf backend: sample from a generation copy whose LoRA layers hold W + (alpha/r)BA, rebuilt from the
    # base weights after each update (same outputs to bf16 rounding; 1.2-2x faster decoding on a CPU,
    # about 0.67 GiB more for the embedded model; benchmarks/README.md "Generation"); false = unmerged
    merged_generation: bool = True
    # hf backend: drop each sequence from the batch and its KV cache as soon as it ends (sgsd.decoding;
    # same distribution, 2.6x less CPU time for an evaluation batch of the learning task on a CPU;
    # benchmarks/README.md "Dropping finished rows"); false = transformers' generate, which runs every
    # row until the longest ends. Also used by `sgsd eval`
    prune_finished: bool = True
    # fraction of GPU memory for a colocated vLLM engine
    vllm_gpu_memory_utilization: float = 0.4
    # vllm_server: the server's base URL, e.g. http://gpu-host:8000 (a trailing /v1 is accepted); also
    # used by `sgsd eval` with eval.backend=vllm_server
    vllm_server_url: str = ""
    # vllm_server: seconds to wait for one request (a batch of rollouts is one request)
    vllm_server_timeout_s: float = 3600.0


@dataclass
class VerifierConfig:
    # per-item grading timeout in seconds (worker processes)
    timeout_s: float = 5.0
    # grading worker processes (0 = grade in this process, no hard timeout)
    workers: int = 2
    # answer extraction: boxed (a box or "Answer:"; training rewards) or free (any last expression)
    extraction: Literal["boxed", "free"] = "boxed"


@dataclass
class SkillsConfig:
    # skill bank: a JSON file, or builtin:starter (shipped with the package)
    bank: str = "builtin:starter"
    # sentence embedder: embedded:all-MiniLM-L6-v2 (offline) or a hub id (Qwen/Qwen3-Embedding-0.6B)
    embedder: str = "embedded:all-MiniLM-L6-v2"
    # instruction prefixed to retrieval queries (Qwen3-Embedding uses one; MiniLM none)
    query_instruction: str = ""
    # retrieval: embedding (Eq. 2) or random (control)
    retrieval: Literal["embedding", "random"] = "embedding"
    # softmax temperature for teacher weights alpha (Eq. 6 uses 1.0)
    weight_temperature: float = 1.0
    # online skill evolution (Alg. 4)
    online_update: bool = True
    # F: update every F steps (window = rollouts of the last F steps)
    update_every: int = 25
    # gamma: skip the update when the window's success rate >= gamma
    success_threshold: float = 0.8
    # N: at most N net new dynamic entries per update
    max_new: int = 5
    # C: at most C dynamic entries per collection
    capacity: int = 30
    # prune dynamic entries by ledger evidence (beyond the paper) instead of list order
    prune_by_evidence: bool = False
    # hierarchical merge: group size H
    merge_group_size: int = 32
    # hierarchical merge: stagnation patience P
    merge_patience: int = 3
    # form merge groups by embedding similarity instead of list order
    merge_group_by_similarity: bool = False
    # generator for extraction/merging: policy (the training model) or openai (an endpoint)
    extractor: Literal["policy", "openai"] = "policy"
    # model name for the openai extractor
    extractor_model: str = ""
    # base URL of an OpenAI-compatible endpoint for the openai extractor
    extractor_base_url: str = ""
    # token budget of one extraction or merge call
    extractor_max_new_tokens: int = 2048
    # thinking mode for extraction calls
    extractor_enable_thinking: bool = False
    # cold start: number of seed problems (paper: 256)
    cold_start_problems: int = 256
    # cold start: solution token budget (paper: not stated; official memory generation: 38912)
    cold_start_max_new_tokens: int = 1024
    # cold start: solution sampling temperature (paper: not stated; official: 1.0)
    cold_start_temperature: float = 1.0
    # cold start: solution nucleus sampling (paper: not stated; official: 0.95, no top-k)
    cold_start_top_p: float = 0.95
    # cold start: thinking mode of the solutions (paper: not stated; official: on, the Qwen3 template default)
    cold_start_enable_thinking: bool = False
    # retrieved pairs per problem, top-K skills and top-K mistakes (paper: 8; official: 8 for SGSD and
    # Base+Skill, 3 for GRPO+Skill and OPSD+Skill); null = teachers.count
    top_k: int | None = None
    # records an online update reads (Alg. 4's W; paper: "recent rollout records"): window = the last F
    # steps' rollouts; step = the update step's rollouts only (official: the update step's last micro-batch)
    evolution_window: Literal["step", "window"] = "window"


@dataclass
class TeachersConfig:
    # K: retrieved skill-mistake pairs, one teacher each (paper: 8; single-teacher ablation: 1)
    count: int = 8
    # teacher weights: live (current weights), frozen (adapter off), ema (second adapter), periodic (snapshot)
    mode: Literal["live", "frozen", "ema", "periodic"] = "live"
    # EMA decay for mode=ema (paper: not stated; official default: 0.999)
    ema_decay: float = 0.99
    # snapshot interval in steps for mode=periodic (paper: not stated; official default: 50)
    periodic_every: int = 25
    # teacher chat template thinking mode (paper: on for the teacher)
    enable_thinking: bool = True
    # append the student template's generation suffix (Qwen3 without thinking: the empty think block) to
    # every teacher prompt, so teacher and student score a token in the same context. Paper: thinking on
    # for the teacher; official: the teacher's thinking render, the completion right after
    # `<|im_start|>assistant\n` (= false)
    align_think_block: bool = True
    # privileged-answer text for OPSD, OPSD+Skill and include_answer: answer_line = "The answer is
    # \boxed{X}." before the problem; official = the official code's "Here is a reference solution ..."
    # block after the problem (with OPSD's transition paragraph for OPSD and OPSD+Skill)
    answer_template: Literal["answer_line", "official"] = "answer_line"
    # add the reference answer to every teacher context (Fig. 3(d) ablation; OPSD uses it alone)
    include_answer: bool = False
    # teacher rows scored per forward (memory knob)
    chunk_rows: int = 4


@dataclass
class ObjectiveConfig:
    # distillation loss: gated (Eq. 14), reverse_kl, forward_kl, jsd (full-vocabulary), sampled_rkl
    loss: Literal["gated", "reverse_kl", "forward_kl", "jsd", "sampled_rkl"] = "gated"
    # tau_g: width of the gate (Eq. 14)
    tau: float = 1.0
    # c_Delta: clipping bound for support estimation (Eq. 11); null disables clipping
    clip: float | None = 3.0
    # epsilon_a: polarity confidence threshold (Eq. 13); 0 disables the dead zone
    threshold: float = 0.05
    # epsilon in the masked means (Eqs. 12, 15)
    eps: float = 1e-8
    # token mask m_t (Section 2.4); off = every completion token counts
    token_mask: bool = True
    # outcome-validated polarity (Eq. 13); off = rho = +1 for every teacher
    use_polarity: bool = True
    # vocabulary support: full normalisation, or teacher top-K plus the sampled token (Section 4.5)
    support: Literal["full", "topk"] = "full"
    # K of the top-K support variant
    support_top_k: int = 100
    # what the gate of the top-K variant reads (paper Sec. 4.5: "apply the gated signal" on the local
    # support): sampled_gap = the local sampled-token gap; local_kl = the local forward KL (official)
    topk_gate: Literal["sampled_gap", "local_kl"] = "sampled_gap"
    # robust support a~: paper (Eq. 12), expected (gaps minus their expectation under the sampler),
    # null_relative (minus a content-free teacher's support), teacher_centred (minus the teachers' mean)
    support_estimator: Literal["paper", "expected", "null_relative", "teacher_centred"] = "paper"
    # beta of the generalized JSD (0 = forward KL, 1 = reverse KL)
    jsd_beta: float = 0.5
    # completion positions per chunk when computing log-probs and divergences
    position_chunk: int = 128
    # OPSD: logits of student and teacher are divided by this before the softmax (paper: not stated;
    # official: the rollout temperature, 1.1)
    opsd_temperature: float = 1.0
    # OPSD: clamp of the divergence from above; null = none (paper: not stated; official: 0.05)
    opsd_clip: float | None = None
    # OPSD: what the clamp applies to: entry = each vocabulary term p_T(v) log(p_T(v)/p_S(v)) (official:
    # TRL's elementwise kl_div, clamped before the sum over v), token = the per-token sum
    opsd_clip_scope: Literal["entry", "token"] = "entry"
    # OPSD: tokens in the loss: token_mask = m_t of Sec. 2.4 (when objective.token_mask), completion =
    # every sampled token, EOS included (official)
    opsd_mask: Literal["token_mask", "completion"] = "token_mask"
    # OPSD: sequence_mean = each completion's mean, then the mean over problems; token_mean = the mean
    # over all kept tokens (official: over each micro-batch of 4 problems)
    opsd_aggregation: Literal["token_mean", "sequence_mean"] = "sequence_mean"
    # GRPO: surrogate clipping epsilon (acts only with objective.grpo_iterations > 1: with one pass the ratio is 1)
    grpo_clip: float = 0.2
    # GRPO: loss aggregation, token_mean or sequence_mean (official, TRL loss_type=grpo: sequence_mean)
    grpo_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    # GRPO: divide advantages by the group's standard deviation
    grpo_scale_rewards: bool = True
    # GRPO: mu, optimizer steps per batch of rollouts; old log-probs are taken before the first, so the
    # ratio (and the clip) acts from the second on (paper: not stated; official, TRL num_iterations: 2)
    grpo_iterations: int = 1
    # GRPO: tokens in the loss: token_mask = m_t of Sec. 2.4 (when objective.token_mask), completion =
    # every sampled token, EOS included (official, TRL)
    grpo_mask: Literal["token_mask", "completion"] = "token_mask"


@dataclass
class TrainConfig:
    # method: sgsd, opsd, opsd_skill, grpo, grpo_skill
    method: Literal["sgsd", "opsd", "opsd_skill", "grpo", "grpo_skill"] = "sgsd"
    # optimizer steps (paper: 200)
    steps: int = 200
    # problems per optimizer step (paper: 16)
    batch_size: int = 16
    # problems per forward/backward (gradient accumulation splits the batch)
    micro_batch_size: int = 1
    # AdamW learning rate (paper: 5e-6)
    lr: float = 5e-6
    # AdamW weight decay
    weight_decay: float = 0.0
    # gradient clipping by global norm (reference runs: 0.1); 0 disables
    max_grad_norm: float = 0.1
    # linear warmup steps
    warmup_steps: int = 0
    # learning-rate schedule after warmup (paper: not stated; official: linear decay to 0, HF's default)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    # random seed (python, numpy, torch, sampling)
    seed: int = 42
    # run folder (metrics, checkpoints, banks); None = runs/<method>-<timestamp>
    output_dir: str | None = None
    # checkpoint every N steps (paper: 25)
    save_every: int = 25
    # evaluate held-out problems every N steps (0 = only before and after training)
    eval_every: int = 0
    # stop after this many seconds of training steps (0 = no limit; evaluation time is not counted)
    time_budget_s: float = 0.0
    # also evaluate every this many seconds of training (0 = off); for equal-wall-clock comparisons
    eval_every_s: float = 0.0
    # stop after this many process CPU-seconds of training steps (0 = no limit): time.process_time() of
    # this process, which counts every thread (torch's intra-op threads too: N busy threads add N seconds
    # per wall second) and not the verifier's worker processes; evaluation and checkpoint writes are not
    # counted. Unlike time_budget_s, other load on the machine does not change how far a run gets
    cpu_budget_s: float = 0.0
    # also evaluate every this many training CPU-seconds (0 = off); for equal-compute comparisons
    eval_every_cpu_s: float = 0.0
    # evaluate before the first step (off when an identical step-0 evaluation exists elsewhere)
    eval_at_start: bool = True
    # experiment trackers fed with metrics, evaluations, config and plots: tensorboard, wandb, mlflow, trackio
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(
        default_factory=lambda: ["tensorboard"]
    )
    # deprecated (use train.report_to): false drops tensorboard from report_to, true adds it
    tensorboard: bool | None = None
    # at the end of training write RUN/report/ (report.md, accuracy/polarity/signals plots) for the summary
    write_report: bool = True
    # show a progress bar
    progress: bool = True


@dataclass
class EvalConfig:
    # samples per problem (paper: 12)
    k: int = 12
    # sampling temperature (paper: 1.0)
    temperature: float = 1.0
    # nucleus sampling (paper: 0.95)
    top_p: float = 0.95
    # top-k (paper: none = 0)
    top_k: int = 0
    # completion token budget (paper: 38912)
    max_new_tokens: int = 38912
    # evaluation chat template thinking mode (reference evaluator: on)
    enable_thinking: bool = True
    # Base+Skill: retrieved skills in the evaluation prompt
    with_skills: bool = False
    # in-loop evaluations score the test sources; false = only the validation split (data.validation_size),
    # for selection runs (a learning-rate search) that must not look at the test set
    test_in_loop: bool = True
    # generator backend of `sgsd eval` (evaluation during training samples with rollout.backend): hf, vllm
    # (a colocated engine), or vllm_server (the server at rollout.vllm_server_url)
    backend: Literal["hf", "vllm", "vllm_server"] = "hf"
    # sequences generated at once by the hf backend
    batch_size: int = 32


@dataclass
class ProbeConfig:
    # `sgsd probe`: training problems probed (the first N of a seeded shuffle of the training set)
    problems: int = 32
    # rollouts sampled per problem with the training sampler (rollout.*)
    rollouts: int = 4
    # JSON file of planted skill-mistake pairs (name, role helpful|misleading|null, skill, mistake)
    planted: str | None = None
    # problems sampled, scored and saved per round (an interrupted probe keeps its finished rounds)
    chunk_problems: int = 8
    # rollouts scored per forward group (memory knob; teacher rows still go teachers.chunk_rows at a time)
    micro_batch: int = 4
    # bootstrap resamples of problems for the AUC confidence intervals
    bootstrap: int = 1000
    # output folder (None = runs/probe-<time>)
    output_dir: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    skills: SkillsConfig = field(default_factory=SkillsConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


# ---------------------------------------------------------------------------
# Range checks: (section, field) -> (predicate, description of the valid range)

_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")
_UNIT = (lambda v: 0 < v <= 1, "in (0, 1]")
_UNIT_CLOSED = (lambda v: 0 <= v <= 1, "in [0, 1]")

RANGES: dict[tuple[str, str], tuple[Any, str]] = {
    ("model", "lora_rank"): _NON_NEGATIVE,
    ("model", "lora_alpha"): _POSITIVE,
    ("model", "lora_dropout"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data", "train_size"): _AT_LEAST_ONE,
    ("data", "eval_size"): _AT_LEAST_ONE,
    ("data", "validation_size"): _AT_LEAST_ONE,
    ("rollout", "temperature"): _POSITIVE,
    ("rollout", "top_p"): _UNIT,
    ("rollout", "top_k"): _NON_NEGATIVE,
    ("rollout", "max_new_tokens"): _AT_LEAST_ONE,
    ("rollout", "num_generations"): _AT_LEAST_ONE,
    ("rollout", "batch_size"): _AT_LEAST_ONE,
    ("rollout", "vllm_gpu_memory_utilization"): _UNIT,
    ("rollout", "vllm_server_timeout_s"): _POSITIVE,
    ("verifier", "timeout_s"): _POSITIVE,
    ("verifier", "workers"): _NON_NEGATIVE,
    ("skills", "weight_temperature"): _POSITIVE,
    ("skills", "update_every"): _AT_LEAST_ONE,
    ("skills", "success_threshold"): _UNIT_CLOSED,
    ("skills", "max_new"): _NON_NEGATIVE,
    ("skills", "capacity"): _NON_NEGATIVE,
    ("skills", "merge_group_size"): (lambda v: v >= 2, ">= 2"),
    ("skills", "merge_patience"): _AT_LEAST_ONE,
    ("skills", "extractor_max_new_tokens"): _AT_LEAST_ONE,
    ("skills", "cold_start_problems"): _AT_LEAST_ONE,
    ("skills", "cold_start_max_new_tokens"): _AT_LEAST_ONE,
    ("skills", "cold_start_temperature"): _NON_NEGATIVE,
    ("skills", "cold_start_top_p"): _UNIT,
    ("skills", "top_k"): _AT_LEAST_ONE,
    ("teachers", "count"): _AT_LEAST_ONE,
    ("teachers", "ema_decay"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("teachers", "periodic_every"): _AT_LEAST_ONE,
    ("teachers", "chunk_rows"): _AT_LEAST_ONE,
    ("objective", "tau"): _POSITIVE,
    ("objective", "clip"): _POSITIVE,
    ("objective", "threshold"): _NON_NEGATIVE,
    ("objective", "eps"): _POSITIVE,
    ("objective", "support_top_k"): _AT_LEAST_ONE,
    ("objective", "jsd_beta"): _UNIT_CLOSED,
    ("objective", "position_chunk"): _AT_LEAST_ONE,
    ("objective", "grpo_clip"): _POSITIVE,
    ("objective", "grpo_iterations"): _AT_LEAST_ONE,
    ("objective", "opsd_temperature"): _POSITIVE,
    ("objective", "opsd_clip"): _POSITIVE,
    ("train", "steps"): _NON_NEGATIVE,
    ("train", "batch_size"): _AT_LEAST_ONE,
    ("train", "micro_batch_size"): _AT_LEAST_ONE,
    ("train", "lr"): _POSITIVE,
    ("train", "weight_decay"): _NON_NEGATIVE,
    ("train", "max_grad_norm"): _NON_NEGATIVE,
    ("train", "warmup_steps"): _NON_NEGATIVE,
    ("train", "save_every"): _AT_LEAST_ONE,
    ("train", "eval_every"): _NON_NEGATIVE,
    ("train", "time_budget_s"): _NON_NEGATIVE,
    ("train", "eval_every_s"): _NON_NEGATIVE,
    ("train", "cpu_budget_s"): _NON_NEGATIVE,
    ("train", "eval_every_cpu_s"): _NON_NEGATIVE,
    ("eval", "k"): _AT_LEAST_ONE,
    ("eval", "temperature"): _POSITIVE,
    ("eval", "top_p"): _UNIT,
    ("eval", "top_k"): _NON_NEGATIVE,
    ("eval", "max_new_tokens"): _AT_LEAST_ONE,
    ("eval", "batch_size"): _AT_LEAST_ONE,
    ("probe", "problems"): _AT_LEAST_ONE,
    ("probe", "rollouts"): _AT_LEAST_ONE,
    ("probe", "micro_batch"): _AT_LEAST_ONE,
    ("probe", "chunk_problems"): _AT_LEAST_ONE,
    ("probe", "bootstrap"): _AT_LEAST_ONE,
}


# ---------------------------------------------------------------------------
# Building a config from plain data


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float)."""
    origin = get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = get_args(tp)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cfg: Config, data: dict, origin: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(data).__name__}")
    sections = [f.name for f in dataclasses.fields(Config)]
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{origin}: unknown section '{section}'{_nearest(str(section), sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section '{section}' must be a mapping, got {values!r}")
        obj = getattr(cfg, section)
        hints = _section_types(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{origin}: unknown key '{section}.{key}'{_nearest(str(key), list(hints))}")
            setattr(obj, key, _coerce(value, hints[key], f"{origin}: {section}.{key}"))


def validate(cfg: Config) -> Config:
    """Range checks and cross-field rules; raises ConfigError naming the field."""
    for (section, key), (ok, desc) in RANGES.items():
        value = getattr(getattr(cfg, section), key)
        if value is not None and not ok(value):
            raise ConfigError(f"{section}.{key} must be {desc}, got {value!r}")
    if cfg.train.batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size})"
        )
    if cfg.train.method.startswith("grpo") and cfg.rollout.num_generations < 2:
        raise ConfigError("rollout.num_generations must be >= 2 for GRPO (group-relative advantages)")
    o = cfg.objective
    if o.loss != "forward_kl" and (o.opsd_temperature != 1.0 or o.opsd_clip is not None):
        raise ConfigError(
            f"objective.opsd_temperature and objective.opsd_clip apply to objective.loss=forward_kl "
            f"(OPSD's divergence), not to {o.loss}"
        )
    if o.topk_gate == "local_kl" and (o.support != "topk" or o.loss != "gated"):
        raise ConfigError(
            "objective.topk_gate=local_kl needs objective.support=topk and objective.loss=gated"
        )
    if o.grpo_iterations > 1 and not cfg.train.method.startswith("grpo"):
        raise ConfigError(
            "objective.grpo_iterations > 1 needs a GRPO method (train.method=grpo or grpo_skill)"
        )
    if cfg.objective.support_estimator == "teacher_centred" and cfg.teachers.count < 2:
        raise ConfigError("objective.support_estimator=teacher_centred needs teachers.count >= 2")
    if cfg.objective.support_estimator == "expected" and cfg.objective.support != "full":
        raise ConfigError("objective.support_estimator=expected needs objective.support=full")
    if "vllm_server" in (cfg.rollout.backend, cfg.eval.backend):
        url = cfg.rollout.vllm_server_url
        if not url.startswith(("http://", "https://")):
            backend = "rollout" if cfg.rollout.backend == "vllm_server" else "eval"
            raise ConfigError(
                f"{backend}.backend=vllm_server needs rollout.vllm_server_url, the server's http(s):// URL "
                f"(e.g. http://gpu-host:8000), got {url!r}"
            )
    if not cfg.eval.test_in_loop and not cfg.data.validation_size:
        raise ConfigError("eval.test_in_loop=false needs data.validation_size (the split evaluated instead)")
    if cfg.skills.extractor == "openai" and not cfg.skills.extractor_base_url:
        raise ConfigError("skills.extractor=openai needs skills.extractor_base_url")
    if cfg.train.method == "sgsd" and cfg.teachers.count > retrieval_top_k(cfg):
        raise ConfigError(
            f"teachers.count ({cfg.teachers.count}) exceeds skills.top_k ({cfg.skills.top_k}): "
            "SGSD builds one teacher per retrieved pair"
        )
    _resolve_report_to(cfg.train)
    return cfg


def retrieval_top_k(cfg: Config) -> int:
    """Pairs retrieved per problem: skills.top_k, or teachers.count when it is null."""
    return cfg.skills.top_k if cfg.skills.top_k is not None else cfg.teachers.count


def _resolve_report_to(train: TrainConfig) -> None:
    """Fold the deprecated `train.tensorboard` flag into `train.report_to` (then clear it) and drop
    repeats, so the saved config.yaml states the trackers actually used."""
    names = list(dict.fromkeys(train.report_to))
    if train.tensorboard is False:
        names = [n for n in names if n != "tensorboard"]
    elif train.tensorboard is True and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    train.report_to, train.tensorboard = names, None


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is parsed as YAML (so 0.5, true, null, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '{text}': the key must be section.key, e.g. objective.tau=0.5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot parse the value ({exc.problem})") from exc
    return parts[0], parts[1], value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, then validation."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
        if data is not None:
            _apply_file(cfg, data, path, seen=[])
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, {section: {key: value}}, f"override '{text}'")
    return validate(cfg)


def _apply_file(cfg: Config, data: Any, path: Path, seen: list[Path]) -> None:
    """Apply a YAML mapping; a top-level `base: other.yaml` (relative to this file) is applied first."""
    if isinstance(data, dict) and "base" in data:
        data = dict(data)
        base = path.parent / str(data.pop("base"))
        if base.resolve() in seen:
            raise ConfigError(f"{path}: 'base' chain loops back to {base}")
        try:
            base_data = yaml.safe_load(base.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: base config not found: {base}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{base}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
        _apply_file(cfg, base_data, base, seen + [base.resolve()])
    _apply(cfg, data, str(path))


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data, "config")
    return validate(cfg)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
