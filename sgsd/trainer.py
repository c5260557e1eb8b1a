"""One method-agnostic training loop: SGSD (Algorithm 1) and the baselines of Section 4.1.

Every optimizer step, read top to bottom:

    sample B problems
      -> student rollouts y ~ p_S(.|x)          plain prompt, thinking off (grpo: G per prompt;
                                                grpo_skill / opsd_skill: skills in the student prompt;
                                                vllm backend: current adapter synced to the engine first)
      -> verify                                 r = +1 / -1
      -> build teachers for the method          sgsd: K retrieved skill-mistake pairs, weights alpha_k
                                                opsd: one teacher that sees the reference answer
      -> score                                  student log p [B,T] (grad), teachers [B,K,T] (no grad)
      -> objective                              gated SGSD (Eqs. 7-16), a divergence, or GRPO
      -> backward                               per micro-batch, scaled so the sum is the batch objective
      -> optimizer step                         AdamW, gradient clipping, LR schedule
      -> teacher update                         live / frozen / EMA / periodic
      -> online bank update every F steps       Alg. 4 over the rollouts of the last F steps
      -> log, checkpoint every N steps

Methods differ only in how teachers are built and which objective is applied, so comparisons share one
rollout path, one verifier and one evaluation.

Distributed runs (Accelerate, several processes): each rank takes its share of the step's problems,
gradients of the trainable parameters are averaged across ranks before the optimizer step, rollout
records are gathered, and the online bank update runs on the main process and is broadcast, so every
rank ends each step with identical weights and an identical bank.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgsd import checkpoint as ckpt
from sgsd.config import Config, config_to_dict, dump_config
from sgsd.errors import UserError
from sgsd.faults import maybe_fault
from sgsd.fileio import append_jsonl, atomic_write_text
from sgsd.hostmem import release_freed_memory
from sgsd.objectives import POLARITY_FRACTIONS

SKILL_METHODS = {"sgsd", "opsd_skill", "grpo_skill"}
TEACHER_METHODS = {"sgsd", "opsd", "opsd_skill"}


@dataclass
class Rollout:
    """One student rollout and everything the objective needs about it."""

    problem: Any  # sgsd.data.Problem
    student_text: str  # the user message the student saw
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str
    finish_reason: str
    reward: float = 0.0  # +1 / -1
    group: int = 0  # index of the prompt (GRPO groups rollouts of the same prompt)
    pairs: list = field(default_factory=list)  # retrieved skill-mistake pairs (sgsd, *_skill)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _lr_lambda(cfg: Config):
    warmup, total, kind = cfg.train.warmup_steps, max(cfg.train.steps, 1), cfg.train.lr_scheduler

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


class Trainer:
    """Builds everything from a `Config` and runs `train()`. See the module docstring for the loop."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, accelerator=None):
        from accelerate import Accelerator

        self.cfg = cfg
        self.method = cfg.train.method
        self.run_dir = Path(run_dir)
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.is_main = self.acc.is_main_process
        _seed_everything(cfg.train.seed)

        self._build_data()
        self._build_skills()  # before the policy: a bad bank file fails fast, before a model load
        self._build_policy()
        self._build_optimizer()
        self.step = 0
        self._step_evidence: dict = {}  # filled per step by _record_evidence
        self.train_time_s = 0.0  # seconds spent in training steps (the budget clock)
        self.last_eval_time_s = 0.0
        self.last_eval_step = -1
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
        if resume:
            self._resume()
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ setup

    def _build_data(self) -> None:
        from sgsd.data import decontaminate, load_problems

        d = self.cfg.data
        self.train_problems = load_problems(d.train_source, size=d.train_size, seed=d.seed, columns=d.columns)
        # held-out sets use their own loaders' columns (data.columns maps the training file only) and
        # another generator seed, so generated train and eval problems differ
        self.eval_sets = {
            src: load_problems(src, size=d.eval_size, seed=d.seed + 1) for src in d.eval_sources
        }
        if d.contamination_guard and self.eval_sets:
            held_out = [p for probs in self.eval_sets.values() for p in probs]
            self.train_problems, _dropped = decontaminate(self.train_problems, held_out)  # logs what it drops
        if not self.train_problems:
            raise UserError(f"no training problems left from {d.train_source}")

    def _build_policy(self) -> None:
        from sgsd.generation import HFGenerator, make_generator
        from sgsd.models import TeacherPolicy, apply_lora, load_policy, resolve_model_path

        m = self.cfg.model
        if self.cfg.rollout.backend == "vllm" and m.lora_rank == 0:
            raise UserError(
                "rollout.backend=vllm syncs the policy into vLLM as a LoRA adapter; "
                "it needs model.lora_rank > 0 (or use rollout.backend=hf)"
            )
        model, self.tokenizer = load_policy(
            m.name, dtype=m.dtype, cache_dir=m.cache_dir, attn_implementation=m.attn_implementation
        )
        model = apply_lora(
            model,
            rank=m.lora_rank,
            alpha=m.lora_alpha,
            dropout=m.lora_dropout,
            target_modules=m.lora_target_modules,
            gradient_checkpointing=m.gradient_checkpointing,
        )
        self.model = model.to(self.acc.device)
        self.pad_id = self.tokenizer.pad_token_id
        t = self.cfg.teachers
        self.teacher = TeacherPolicy(
            self.model, mode=t.mode, ema_decay=t.ema_decay, periodic_every=t.periodic_every
        )
        if self.cfg.rollout.backend == "vllm":
            self.generator = make_generator(
                "vllm",
                model_path=resolve_model_path(m.name, m.cache_dir),
                tokenizer=self.tokenizer,
                max_lora_rank=m.lora_rank,
                gpu_memory_utilization=self.cfg.rollout.vllm_gpu_memory_utilization,
                dtype=m.dtype,
            )
        else:
            self.generator = HFGenerator(self.model, self.tokenizer, batch_size=self.cfg.rollout.batch_size)
        self._synced_step: int | None = None  # the step whose weights the vllm engine samples with

    def _policy_generator(self):
        """The generator, sampling with the current weights. hf samples from the policy itself; a vllm
        engine holds its own copy of the base model, so after every optimizer step (and after a resume)
        the trainable adapter is saved to RUN/rollout-adapter and registered with the engine under a
        new LoRA id before the engine is used again."""
        if self.cfg.rollout.backend == "vllm" and self._synced_step != self.step:
            from sgsd.models import save_adapter

            name = "rollout-adapter" + (
                f"-rank{self.acc.process_index}" if self.acc.num_processes > 1 else ""
            )
            self.generator.sync_adapter(save_adapter(self.model, self.run_dir / name))
            self._synced_step = self.step
        return self.generator

    def _build_skills(self) -> None:
        self.retriever = self.evolver = self.ledger = self.bank = None
        if self.method not in SKILL_METHODS and not self.cfg.eval.with_skills:
            return
        from sgsd.skills.bank import load_bank
        from sgsd.skills.ledger import SkillLedger
        from sgsd.skills.retrieval import Embedder, Retriever

        s = self.cfg.skills
        self.bank = load_bank(s.bank)
        self.embedder = Embedder(s.embedder, query_instruction=s.query_instruction)
        self.retriever = Retriever(
            self.bank,
            self.embedder,
            top_k=self.cfg.teachers.count,
            mode=s.retrieval,
            weight_temperature=s.weight_temperature,
            seed=self.cfg.train.seed,
        )
        self.ledger = SkillLedger()
        if s.online_update and self.method == "sgsd":
            from sgsd.skills.evolve import OnlineEvolver

            self.evolver = OnlineEvolver(
                update_every=s.update_every,
                success_threshold=s.success_threshold,
                max_new=s.max_new,
                capacity=s.capacity,
                merge_group_size=s.merge_group_size,
                merge_patience=s.merge_patience,
                prune_by_evidence=s.prune_by_evidence,
                max_new_tokens=s.extractor_max_new_tokens,
                enable_thinking=s.extractor_enable_thinking,
                group_embedder=self.embedder if s.merge_group_by_similarity else None,
            )

    def _build_optimizer(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise UserError("the model has no trainable parameters (check model.lora_target_modules)")
        self.trainable = params
        t = self.cfg.train
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.cfg))

    def _extraction_generator(self):
        s = self.cfg.skills
        if s.extractor == "openai":
            from sgsd.generation import OpenAIChatGenerator

            return OpenAIChatGenerator(model=s.extractor_model, base_url=s.extractor_base_url)
        return self._policy_generator()

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Run from the current step to `train.steps`; returns the last metrics row."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        last: dict = {}
        if self.step == 0 and self._wants_eval() and t.eval_at_start:
            self.evaluate(step=0)
        bar = tqdm(
            total=t.steps, initial=self.step, desc=self.method, disable=not (t.progress and self.is_main)
        )
        writer = self._tensorboard()
        while self.step < t.steps:
            over_budget = bool(t.time_budget_s) and self.train_time_s >= t.time_budget_s
            if self._all_ranks_any(over_budget):  # every rank stops at the same step
                if self.is_main:
                    print(f"time budget of {t.time_budget_s:.0f} s reached at step {self.step}")
                if self.step % t.save_every:
                    self.save_checkpoint()
                break
            started = time.time()
            problems = self._sample_problems(self.step)
            rollouts = self._rollouts(problems, self.step)
            t_rollout = time.time()
            self._verify(rollouts)
            t_verify = time.time()
            metrics = self._optimize(rollouts)
            t_optimize = time.time()
            self.step += 1
            self.teacher.after_step(self.step)
            metrics.update(self._maybe_evolve_bank(rollouts))
            step_time = time.time() - started
            metrics.update(  # where the step's time went
                rollout_s=round(t_rollout - started, 3),
                verify_s=round(t_verify - t_rollout, 3),
                score_and_backward_s=round(t_optimize - t_verify, 3),
                bank_s=round(time.time() - t_optimize, 3),
            )
            self.train_time_s += step_time
            metrics.update(
                step=self.step,
                time_s=round(step_time, 3),
                train_time_s=round(self.train_time_s, 3),
                lr=self.scheduler.get_last_lr()[0],
            )
            maybe_fault("after_step", self.step)  # test-only kill point (sgsd/faults.py)
            self._log(metrics, writer)
            bar.update(1)
            bar.set_postfix(self._postfix(metrics))
            last = metrics
            if self.step % t.save_every == 0 or self.step == t.steps:
                self.save_checkpoint()
            due_by_steps = t.eval_every and self.step % t.eval_every == 0
            due_by_time = t.eval_every_s and self.train_time_s >= self.last_eval_time_s + t.eval_every_s
            if self._all_ranks_any(bool(due_by_steps or due_by_time)) and self.step != t.steps:
                self.evaluate(step=self.step)
        bar.close()
        if writer is not None:
            writer.close()
        if self._wants_eval() and self.last_eval_step != self.step:  # not twice at a budget's end
            self.evaluate(step=self.step)
        return last

    # ------------------------------------------------------------------ 1. problems

    def _sample_problems(self, step: int) -> list:
        """This rank's problems for `step`: a seeded permutation per epoch, sliced per step and rank, so
        a resumed run sees exactly the problems an uninterrupted one would."""
        b, n = self.cfg.train.batch_size, len(self.train_problems)
        start = step * b
        orders: dict[int, list[int]] = {}  # one seeded permutation per epoch this step touches
        picked = []
        for i in range(start, start + b):
            epoch, pos = divmod(i, n)
            if epoch not in orders:
                orders[epoch] = list(range(n))
                random.Random(self.cfg.train.seed * 1_000_003 + epoch).shuffle(orders[epoch])
            picked.append(self.train_problems[orders[epoch][pos]])
        return picked[self.acc.process_index :: self.acc.num_processes]

    # ------------------------------------------------------------------ 2. rollouts

    def _student_text(self, problem, pairs) -> str:
        from sgsd.prompts import skills_in_prompt, student_prompt

        if self.method in ("grpo_skill", "opsd_skill") and pairs:
            return skills_in_prompt(problem.question, pairs)
        return student_prompt(problem.question)

    def _rollouts(self, problems: list, step: int) -> list[Rollout]:
        from sgsd.generation import SamplingParams

        r = self.cfg.rollout
        pairs = self._retrieve(problems)
        texts = [self._student_text(p, pp) for p, pp in zip(problems, pairs)]
        params = SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            n=r.num_generations,
            seed=self._step_seed(step),
        )
        outputs = self._policy_generator().generate(texts, params, enable_thinking=r.enable_thinking)
        rollouts = []
        for i, (problem, text, samples, pp) in enumerate(zip(problems, texts, outputs, pairs)):
            for c in samples:
                rollouts.append(
                    Rollout(
                        problem,
                        text,
                        list(c.prompt_ids),
                        list(c.token_ids),
                        c.text,
                        c.finish_reason,
                        group=i,
                        pairs=pp,
                    )
                )
        return rollouts

    def _step_seed(self, step: int) -> int:
        return self.cfg.train.seed * 7919 + step * 104_729 + self.acc.process_index

    def _retrieve(self, problems: list) -> list[list]:
        if self.retriever is None or self.method not in SKILL_METHODS:
            return [[] for _ in problems]
        return self.retriever.retrieve_batch([p.question for p in problems])

    # ------------------------------------------------------------------ 3. verify

    def _verify(self, rollouts: list[Rollout]) -> None:
        from sgsd.verifier import grade_many

        v = self.cfg.verifier
        results = grade_many(
            [(r.completion_text, r.problem.answer) for r in rollouts],
            timeout_s=v.timeout_s,
            workers=v.workers,
        )
        for r, res in zip(rollouts, results):
            r.reward = 1.0 if res.correct else -1.0

    # ------------------------------------------------------------------ 4-7. teachers, score, objective, step

    def _optimize(self, rollouts: list[Rollout]) -> dict:
        """Score, compute the objective per micro-batch, backward, average gradients, step."""
        from sgsd.metrics import MetricMeter

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        meter = MetricMeter()
        self._step_evidence = {}  # per-decision support and Delta histogram (SGSD-style methods)
        units = self._normalizer(rollouts)
        mb = self.cfg.train.micro_batch_size * (
            self.cfg.rollout.num_generations if self.method.startswith("grpo") else 1
        )
        batch_loss, nonfinite = 0.0, False
        for start in range(0, len(rollouts), mb):
            chunk = rollouts[start : start + mb]
            loss, metrics = self._micro_batch_loss(chunk, units)
            if not torch.isfinite(loss):
                nonfinite = True  # nothing of this step may reach the weights
                break
            loss.backward()
            batch_loss += float(loss.detach())
            meter.add(metrics, weight=len(chunk))
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        stats = meter.mean()
        stats["loss"] = batch_loss
        skip = self._all_ranks_any(nonfinite)
        grad_norm = self._sync_and_clip()
        if skip or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            stats["skipped_step"] = 1.0
            if self.is_main:
                print(f"step {self.step + 1}: non-finite loss or gradient, step skipped")
        else:
            self.optimizer.step()
            self.scheduler.step()  # a skipped step does not advance the schedule
            stats["skipped_step"] = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        release_freed_memory()  # glibc keeps the step's freed temporaries resident otherwise (sgsd.hostmem)
        stats.update(
            reward_mean=float(rewards.mean()),
            accuracy=float((rewards > 0).float().mean()),
            grad_norm=float(grad_norm),
            completion_tokens=sum(len(r.completion_ids) for r in rollouts) / max(1, len(rollouts)),
            truncated_fraction=sum(r.finish_reason == "length" for r in rollouts) / max(1, len(rollouts)),
        )
        stats.update(self._step_evidence)
        return stats

    def _normalizer(self, rollouts: list[Rollout]) -> float:
        """Units the batch objective is averaged over: problems (SGSD/OPSD) or, for GRPO token_mean, the
        completion tokens of the whole batch. Each micro-batch's loss is a sum over its units divided by
        this number, so accumulated gradients equal those of the full-batch objective."""
        if self.method.startswith("grpo") and self.cfg.objective.grpo_aggregation == "token_mean":
            return float(max(1, sum(len(r.completion_ids) for r in rollouts)))
        return float(max(1, len(rollouts)))

    def _micro_batch_loss(self, chunk: list[Rollout], units: float) -> tuple[torch.Tensor, dict]:
        if self.method.startswith("grpo"):
            return self._grpo_loss(chunk, units)
        return self._distillation_loss(chunk, units)

    def _completion_ids(self, chunk: list[Rollout]) -> list[list[int]]:
        return [r.completion_ids if r.completion_ids else [self.pad_id] for r in chunk]

    def _token_mask(self, completion_ids, valid):
        from sgsd.scoring import completion_token_mask

        if self.cfg.objective.token_mask:
            return completion_token_mask(self.tokenizer, completion_ids, valid)
        return valid

    def _teacher_texts(self, r: Rollout) -> tuple[list[str], list[float]]:
        """Teacher contexts c_k and their retrieval scores for one rollout."""
        from sgsd.prompts import teacher_prompt

        answer = r.problem.answer if (self.cfg.teachers.include_answer or self.method != "sgsd") else None
        if self.method == "sgsd":
            pairs = r.pairs[: self.cfg.teachers.count]
            return [teacher_prompt(r.problem.question, p.skill, p.mistake, answer=answer) for p in pairs], [
                p.score for p in pairs
            ]
        if self.method == "opsd_skill":
            from sgsd.prompts import skills_in_prompt

            return [skills_in_prompt(r.problem.question, r.pairs, answer=answer)], [0.0]
        return [teacher_prompt(r.problem.question, answer=answer)], [0.0]  # opsd: the reference answer

    def _distillation_loss(self, chunk: list[Rollout], units: float) -> tuple[torch.Tensor, dict]:
        from sgsd import objectives as obj
        from sgsd.scoring import (
            score_student,
            score_teachers,
            score_topk_support,
            teacher_prompt_ids,
        )

        o, t = self.cfg.objective, self.cfg.teachers
        device = self.acc.device
        completion_ids = self._completion_ids(chunk)
        texts, scores = zip(*(self._teacher_texts(r) for r in chunk))
        k_max = max(1, max(len(x) for x in texts))
        teacher_ids = [
            teacher_prompt_ids(
                self.tokenizer,
                list(x),
                student_enable_thinking=self.cfg.rollout.enable_thinking,
                teacher_enable_thinking=t.enable_thinking,
            )
            for x in texts
        ]
        retrieval = torch.zeros(len(chunk), k_max, device=device)  # [B, K]
        for b, s in enumerate(scores):
            retrieval[b, : len(s)] = torch.tensor(s, dtype=torch.float32)
        reward = torch.tensor([r.reward for r in chunk], device=device)  # [B]
        student_prompts = [r.prompt_ids for r in chunk]

        if o.loss in ("reverse_kl", "forward_kl", "jsd"):
            return self._divergence_loss(
                chunk, units, student_prompts, teacher_ids, completion_ids, retrieval, reward
            )

        if o.support == "topk":  # Section 4.5: teacher top-K + sampled token, renormalised per teacher
            student_logp, teacher_logp, teacher_mask = score_topk_support(
                self.model,
                student_prompts,
                teacher_ids,
                completion_ids,
                self.pad_id,
                k=o.support_top_k,
                chunk_rows=t.chunk_rows,
                chunk_size=o.position_chunk,
                teacher_context=self.teacher.scoring,
            )  # [B, K, T] with grad, [B, K, T], [B, K]
            valid = None
        else:
            with self.teacher.scoring():
                teacher_logp, teacher_mask = score_teachers(
                    self.model,
                    teacher_ids,
                    completion_ids,
                    self.pad_id,
                    chunk_rows=t.chunk_rows,
                    chunk_size=o.position_chunk,
                )  # [B, K, T], [B, K]  no grad, teacher weights (live / frozen / EMA / periodic)
            release_freed_memory()  # the teacher forwards' temporaries, before the student's activations
            student_logp, valid = score_student(
                self.model, student_prompts, completion_ids, self.pad_id, chunk_size=o.position_chunk
            )  # [B, T]  one forward with grad, broadcast over the K teachers
        valid = valid if valid is not None else self._valid(completion_ids, device)
        mask = self._token_mask(completion_ids, valid)  # [B, T]
        loss, metrics = obj.sgsd_loss(
            student_logp,
            teacher_logp,
            mask=mask,
            reward=reward,
            retrieval_scores=retrieval / self.cfg.skills.weight_temperature,  # Eq. 6 with a temperature
            teacher_mask=teacher_mask,
            tau=o.tau,
            clip=o.clip,
            threshold=o.threshold,
            eps=o.eps,
            use_polarity=o.use_polarity and self.method == "sgsd",
        )
        if (
            o.loss == "sampled_rkl"
        ):  # same polarity and weights, sampled-token reverse-KL gradient per teacher
            loss = _polarity_weighted_sampled_rkl(student_logp, teacher_logp, mask, metrics, o.eps)
        self._record_evidence(chunk, student_logp, teacher_logp, mask, teacher_mask, metrics)
        # sgsd_loss averages over the micro-batch's problems; rescale to the batch objective
        return loss * (len(chunk) / units), _scalars(metrics)

    def _divergence_loss(self, chunk, units, student_prompts, teacher_ids, completion_ids, retrieval, reward):
        """Full-vocabulary divergences (OPSD and Fig. 3(c)): mean over problems of sum_k alpha_k D_k, with
        D_k the masked token mean of the divergence between the student and teacher k. A divergence has
        no sign to validate, so polarity does not apply. With K teachers the student rows are repeated
        once per teacher (memory grows K-fold; used by the Fig. 3(c) ablation only)."""
        from sgsd import objectives as obj
        from sgsd.scoring import score_divergence

        o = self.cfg.objective
        rows_s, rows_t, rows_c, owner = [], [], [], []
        for b, tids in enumerate(teacher_ids):
            for tid in tids:
                rows_s.append(student_prompts[b])
                rows_t.append(tid)
                rows_c.append(completion_ids[b])
                owner.append(b)
        per_token, valid = score_divergence(
            self.model,
            rows_s,
            rows_t,
            rows_c,
            self.pad_id,
            kind=o.loss,
            beta=o.jsd_beta,
            chunk_size=o.position_chunk,
            teacher_context=self.teacher.scoring,
        )  # [R, T]
        mask = self._token_mask(rows_c, valid).float()
        per_row = (per_token * mask).sum(-1) / (mask.sum(-1) + o.eps)  # [R]
        owner_t = torch.tensor(owner, device=per_row.device)
        teacher_mask = torch.zeros_like(retrieval, dtype=torch.bool)
        counts = [len(t) for t in teacher_ids]
        for b, c in enumerate(counts):
            teacher_mask[b, :c] = True
        weights = obj.teacher_weights(retrieval, teacher_mask)  # [B, K]
        flat_w = weights[teacher_mask]  # [R] in row order
        per_problem = torch.zeros(len(chunk), device=per_row.device).index_add(0, owner_t, flat_w * per_row)
        loss = per_problem.sum() / units
        return loss, {"divergence": float(per_row.detach().mean()), "kept_token_fraction": float(mask.mean())}

    def _grpo_loss(self, chunk: list[Rollout], units: float) -> tuple[torch.Tensor, dict]:
        from sgsd import objectives as obj
        from sgsd.scoring import score_student

        o, device = self.cfg.objective, self.acc.device
        completion_ids = self._completion_ids(chunk)
        logp, valid = score_student(
            self.model,
            [r.prompt_ids for r in chunk],
            completion_ids,
            self.pad_id,
            chunk_size=o.position_chunk,
        )  # [G*P, T]
        group_size = self.cfg.rollout.num_generations
        rewards = torch.tensor([r.reward for r in chunk], device=device)
        adv = obj.group_advantages(rewards, group_size=group_size, scale=o.grpo_scale_rewards)  # [G*P]
        mask = self._token_mask(completion_ids, valid)
        loss, metrics = obj.grpo_loss(
            logp, logp.detach(), adv, mask, clip_eps=o.grpo_clip, aggregation=o.grpo_aggregation
        )
        if o.grpo_aggregation == "token_mean":
            scale = float(mask.sum()) / units
        else:
            scale = len(chunk) / units
        metrics = dict(_scalars(metrics), advantage_abs_mean=float(adv.abs().mean()))
        return loss * scale, metrics

    def _valid(self, completion_ids, device):
        t = max(len(c) for c in completion_ids)
        valid = torch.zeros(len(completion_ids), t, dtype=torch.bool, device=device)
        for i, c in enumerate(completion_ids):
            valid[i, : len(c)] = True
        return valid

    def _record_evidence(self, chunk, student_logp, teacher_logp, mask, teacher_mask, metrics) -> None:
        """Per micro-batch of an SGSD-style objective: feed the skill ledger, and keep this step's raw
        evidence for diagnosis: one [robust support, rho, reward] per valid (rollout, teacher) and a
        histogram of the per-token gaps Delta_t over kept tokens of valid teachers (bins
        `sgsd.metrics.DELTA_EDGES`), logged with the step as `decisions` and `delta_hist`."""
        from sgsd.metrics import delta_histogram

        support, rho, valid = metrics["support"].cpu(), metrics["rho"].cpu(), teacher_mask.cpu()  # [B, K]
        if self.ledger is not None:
            for b, r in enumerate(chunk):
                k = len(r.pairs[: self.cfg.teachers.count])
                if k:
                    self.ledger.record(r.pairs[:k], support[b, :k].tolist(), rho[b, :k].tolist(), r.reward)
        student = _per_teacher_view(student_logp)  # [B, K|1, T]
        delta = teacher_logp.detach() - student.detach()  # [B, K, T]
        keep = mask.unsqueeze(1) & teacher_mask.unsqueeze(-1)  # [B, K, T]
        counts = delta_histogram(delta, keep)
        seen = self._step_evidence.setdefault("delta_hist", [0] * len(counts))
        self._step_evidence["delta_hist"] = [a + b for a, b in zip(seen, counts)]
        rows = self._step_evidence.setdefault("decisions", [])
        for b, r in enumerate(chunk):
            for k in range(valid.shape[1]):
                if valid[b, k]:
                    rows.append([round(float(support[b, k]), 5), round(float(rho[b, k]), 4), r.reward])

    def _sync_and_clip(self) -> float:
        """Average gradients of the trainable parameters across ranks, then clip by global norm."""
        if self.acc.num_processes > 1:
            for p in self.trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad = self.acc.reduce(p.grad, reduction="mean")
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))

    def _all_ranks_any(self, flag: bool) -> bool:
        if self.acc.num_processes == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    # ------------------------------------------------------------------ 9. online bank update

    def _maybe_evolve_bank(self, rollouts: list[Rollout]) -> dict:
        if self.evolver is None:
            return {}
        from accelerate.utils import broadcast_object_list, gather_object

        records = [
            {
                "question": r.problem.question,
                "answer": r.problem.answer,
                "completion": r.completion_text,
                "reward": r.reward,
                "step": self.step,
            }
            for r in rollouts
        ]
        if self.acc.num_processes > 1:
            records = gather_object(records)
        self.evolver.add_records(records, step=self.step)
        if self.step % self.cfg.skills.update_every:
            return {}
        payload = [None]
        if self.is_main:
            bank, report = self.evolver.maybe_update(
                self.step, self.bank, self._extraction_generator(), ledger=self.ledger
            )
            maybe_fault("bank_update", self.step)  # test-only kill point (sgsd/faults.py)
            if report.get("updated"):
                bank.save_snapshot(self.run_dir / "bank", self.step)
            payload = [(bank, report)]
        if self.acc.num_processes > 1:
            broadcast_object_list(payload, from_process=0)
        bank, report = payload[0]
        if report.get("updated"):
            self.bank = bank
            self.retriever.set_bank(bank)
        return {f"bank_{k}": v for k, v in report.items() if isinstance(v, (int, float, bool))}

    # ------------------------------------------------------------------ 10. logging, checkpoints, eval

    def _tensorboard(self):
        if not (self.cfg.train.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _log(self, metrics: dict, writer) -> None:
        if not self.is_main:
            return
        append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(f"train/{k}", v, metrics["step"])
            writer.flush()

    @staticmethod
    def _postfix(m: dict) -> dict:
        out = {"reward": f"{m.get('reward_mean', 0):+.2f}", "loss": f"{m.get('loss', 0):.4f}"}
        if POLARITY_FRACTIONS[0] in m:
            out["pol(h/w/m/o/n)"] = "/".join(f"{m.get(k, 0):.2f}" for k in POLARITY_FRACTIONS)
        return out

    def save_checkpoint(self) -> Path | None:
        """Adapter, optimizer, scheduler, RNG states, step, teacher state, bank, ledger and the evolution
        window, written into a temporary folder and renamed into place (atomic)."""
        self.acc.wait_for_everyone()
        path = None
        if self.is_main:
            path = ckpt.save(
                self.run_dir,
                self.step,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                teacher=self.teacher,
                bank=self.bank,
                ledger=self.ledger,
                evolver=self.evolver,
            )
        self.acc.wait_for_everyone()
        return path

    def _resume(self) -> None:
        state = ckpt.load_latest(
            self.run_dir,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            teacher=self.teacher,
            evolver=self.evolver,
        )
        if state is None:
            raise UserError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
        self.step = state["step"]
        if state.get("bank") is not None and self.retriever is not None:
            self.bank = state["bank"]
            self.retriever.set_bank(self.bank)
        if state.get("ledger") is not None and self.ledger is not None:
            self.ledger = state["ledger"]
        rows = _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        self.train_time_s = float(rows[-1].get("train_time_s", 0.0)) if rows else 0.0
        self.last_eval_time_s = self.train_time_s
        if self.is_main:
            print(f"resumed from step {self.step}")

    def _wants_eval(self) -> bool:
        return bool(self.eval_sets) and self.cfg.eval.k > 0

    def evaluate(self, step: int) -> dict:
        """Held-out avg@k with the current weights; written to RUN/eval/step-XXXXXX/ (main process)."""
        self.last_eval_time_s = self.train_time_s
        self.last_eval_step = step
        if not self.is_main:
            self.acc.wait_for_everyone()
            return {}
        from sgsd.evaluate import evaluate_sources

        e = self.cfg.eval
        summary = evaluate_sources(
            self._policy_generator(),
            self.eval_sets,
            out_dir=self.run_dir / "eval" / f"step-{step:06d}",
            k=e.k,
            temperature=e.temperature,
            top_p=e.top_p,
            top_k=e.top_k,
            max_new_tokens=e.max_new_tokens,
            enable_thinking=e.enable_thinking,
            seed=self.cfg.train.seed + 17,
            retriever=self.retriever if e.with_skills else None,
            verifier_timeout_s=self.cfg.verifier.timeout_s,
            verifier_workers=self.cfg.verifier.workers,
            step=step,
            batch_size=e.batch_size,
            show_progress=self.cfg.train.progress,
            extra={"train_time_s": round(self.train_time_s, 3)},
        )
        self.model.train()
        line = ", ".join(f"{src}: avg@{e.k} {r['avg@k']:.3f}" for src, r in summary["results"].items())
        print(f"eval step {step}: {line}")
        self.acc.wait_for_everyone()
        return summary


def _per_teacher_view(student_logp: torch.Tensor) -> torch.Tensor:
    """Student log-probs `[B, T]` (one score for all teachers) or `[B, K, T]` (top-K support: one per
    teacher) as `[B, K|1, T]`, to broadcast against teacher log-probs `[B, K, T]`."""
    return student_logp if student_logp.dim() == 3 else student_logp.unsqueeze(1)


def _polarity_weighted_sampled_rkl(student_logp, teacher_logp, mask, metrics, eps) -> torch.Tensor:
    """mean_b sum_k alpha_k rho_k * (-masked mean_t stopgrad(Delta_t) * log p_S(y_t)) (Fig. 3(c) option)."""
    student = _per_teacher_view(student_logp)  # [B, K|1, T]
    m = mask.float().unsqueeze(1)  # [B, 1, T]
    delta = torch.where(m > 0, teacher_logp.detach() - student.detach(), 0.0)  # [B, K, T]
    per_teacher = -(delta * student * m).sum(-1) / (m.sum(-1) + eps)  # [B, K]
    return (metrics["weights"] * metrics["rho"] * per_teacher).sum(-1).mean()


def _scalars(metrics: dict) -> dict:
    """Keep the loggable scalars of an objective's metrics (drop per-teacher tensors)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            if v.dim() == 0:
                out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def _truncate_metrics(path: Path, step: int) -> list[dict]:
    """On resume, drop metric rows logged after the checkpoint (they will be produced again)."""
    if not path.exists():
        return []
    from sgsd.fileio import atomic_write_jsonl, read_jsonl

    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    atomic_write_jsonl(path, rows)
    return rows


def default_run_dir(cfg: Config) -> Path:
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    return Path("runs") / f"{cfg.train.method}-{time.strftime('%Y%m%d-%H%M%S')}"


__all__ = ["Trainer", "Rollout", "default_run_dir", "config_to_dict"]
