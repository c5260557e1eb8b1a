"""The parts a training run is built from, made from a `Config`: the policy with its LoRA adapters,
teacher weights and rollout generator, and the skill bank with its retriever, ledger and evolver.
`sgsd.trainer.Trainer` wires them into the loop; `sgsd probe` and the benchmarks reuse them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sgsd.config import Config, retrieval_top_k
from sgsd.errors import UserError
from sgsd.methods import MethodSpec


@dataclass
class Policy:
    model: Any  # the (LoRA-wrapped) causal LM, trained in place
    tokenizer: Any
    teacher: Any  # sgsd.models.TeacherPolicy: which weights the teachers score with
    generator: Any  # rollouts and in-loop evaluation (hf: the model; vllm: an engine; vllm_server: a client)

    def __iter__(self):  # model, tokenizer, teacher, generator = build_policy(...)
        return iter((self.model, self.tokenizer, self.teacher, self.generator))


def build_policy(cfg: Config, device, show_progress: bool = False) -> Policy:
    """The policy (LoRA-wrapped, on `device`), its tokenizer, teacher weights and rollout generator;
    `show_progress` puts a token bar on hf generation (rollouts and in-loop evaluation)."""
    from sgsd.generation import HFGenerator, make_generator
    from sgsd.models import TeacherPolicy, apply_lora, load_policy, resolve_model_path

    m, r, t = cfg.model, cfg.rollout, cfg.teachers
    if r.backend in ("vllm", "vllm_server") and m.lora_rank == 0:
        raise UserError(
            f"rollout.backend={r.backend} syncs the policy into vLLM as a LoRA adapter; "
            "it needs model.lora_rank > 0 (or use rollout.backend=hf)"
        )
    if r.backend == "vllm_server":  # fail before the model load when the server is not there
        server = make_generator("vllm_server", base_url=r.vllm_server_url, tokenizer=None,
                                timeout_s=r.vllm_server_timeout_s)  # fmt: skip
        server.check()
    model, tokenizer = load_policy(
        m.name, dtype=m.dtype, cache_dir=m.cache_dir, attn_implementation=m.attn_implementation
    )
    model = apply_lora(
        model,
        rank=m.lora_rank,
        alpha=m.lora_alpha,
        dropout=m.lora_dropout,
        target_modules=m.lora_target_modules,
        gradient_checkpointing=m.gradient_checkpointing,
    ).to(device)
    teacher = TeacherPolicy(model, mode=t.mode, ema_decay=t.ema_decay, periodic_every=t.periodic_every)
    if r.backend == "vllm":
        generator = make_generator(
            "vllm",
            model_path=resolve_model_path(m.name, m.cache_dir),
            tokenizer=tokenizer,
            max_lora_rank=m.lora_rank,
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            dtype=m.dtype,
        )
    elif r.backend == "vllm_server":
        server.tokenizer = tokenizer
        generator = server
    else:
        generator = HFGenerator(
            model,
            tokenizer,
            batch_size=r.batch_size,
            merged=r.merged_generation,
            progress=show_progress,
            prune_finished=r.prune_finished,
        )
    return Policy(model, tokenizer, teacher, generator)


@dataclass
class Skills:
    bank: Any = None  # sgsd.skills.bank.SkillBank
    retriever: Any = None  # sgsd.skills.retrieval.Retriever
    ledger: Any = None  # sgsd.skills.ledger.SkillLedger (methods with one pair per teacher)
    evolver: Any = None  # sgsd.skills.evolve.OnlineEvolver (methods that evolve the bank)

    def __iter__(self):  # bank, retriever, ledger, evolver = build_skills(...)
        return iter((self.bank, self.retriever, self.ledger, self.evolver))


def build_skills(cfg: Config, spec: MethodSpec) -> Skills:
    """The bank and its helpers when the method retrieves skills or Base+Skill evaluation needs them;
    an empty `Skills` otherwise. Loads the bank first, so a bad bank file fails before a model load."""
    if not spec.retrieves and not cfg.eval.with_skills:
        return Skills()
    from sgsd.skills.bank import load_bank
    from sgsd.skills.ledger import SkillLedger
    from sgsd.skills.retrieval import Embedder, Retriever

    s = cfg.skills
    bank = load_bank(s.bank)
    embedder = Embedder(s.embedder, query_instruction=s.query_instruction)
    retriever = Retriever(
        bank,
        embedder,
        top_k=retrieval_top_k(cfg),  # skills.top_k (SGSD cuts them to teachers.count teachers)
        mode=s.retrieval,
        weight_temperature=s.weight_temperature,
        seed=cfg.train.seed,
    )
    # the ledger credits each teacher's outcome to the one pair that teacher saw; a teacher that sees
    # several pairs at once (OPSD+Skill) has no single pair to credit, so those methods keep no ledger
    ledger = SkillLedger(threshold=cfg.objective.threshold) if spec.teachers == "per_pair" else None
    evolver = None
    if s.online_update and spec.evolves_bank:
        from sgsd.skills.evolve import OnlineEvolver

        evolver = OnlineEvolver(
            update_every=s.update_every,
            success_threshold=s.success_threshold,
            max_new=s.max_new,
            capacity=s.capacity,
            merge_group_size=s.merge_group_size,
            merge_patience=s.merge_patience,
            prune_by_evidence=s.prune_by_evidence,
            max_new_tokens=s.extractor_max_new_tokens,
            enable_thinking=s.extractor_enable_thinking,
            group_embedder=embedder if s.merge_group_by_similarity else None,
            window_mode=s.evolution_window,
        )
    return Skills(bank, retriever, ledger, evolver)


def extraction_generator(cfg: Config, policy_generator):
    """The generator of the online bank update: an OpenAI-compatible endpoint or the policy itself."""
    s = cfg.skills
    if s.extractor == "openai":
        from sgsd.generation import OpenAIChatGenerator

        return OpenAIChatGenerator(model=s.extractor_model, base_url=s.extractor_base_url)
    return policy_generator


def build_optimizer(cfg: Config, params: list):
    """AdamW over `params` and the learning-rate schedule (`train.warmup_steps` linear warmup, then
    constant, linear decay to 0 or cosine over `train.steps` optimizer steps)."""
    import math

    import torch

    t = cfg.train
    warmup, total = t.warmup_steps, max(t.steps, 1)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if t.lr_scheduler == "linear":
            return 1.0 - progress
        if t.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
