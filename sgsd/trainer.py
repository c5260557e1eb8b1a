"""One method-agnostic training loop: SGSD (Algorithm 1) and the baselines of Section 4.1.

Every optimizer step (`Trainer.train_step`), read top to bottom:

    sample B problems
      -> student rollouts y ~ p_S(.|x)      plain prompt, thinking off; the method spec decides whether the
                                            retrieved skills are in it and how many rollouts per prompt
      -> verify                             r = +1 / -1
      -> per micro-batch:
           teachers                         the method's privileged contexts c_k and weights alpha_k
           score                            what the objective reads (sampled-token log-probs,
                                            full-vocabulary divergences, or the policy's own log-probs)
           objective                        gated SGSD (Eqs. 7-16), a divergence, or GRPO, normalised by
                                            the whole batch so the accumulated gradient is the batch's
           backward
      -> optimizer step                     AdamW, gradient clipping, LR schedule (skipped if non-finite)
      -> evidence                           skill ledger and logged decisions, only for applied steps
      -> teacher update                     live / frozen / EMA / periodic
      -> online bank update every F steps   Alg. 4 (methods that evolve the bank)
      -> log, checkpoint every N steps, evaluate

Methods are data (`sgsd.methods`), objectives are named (`sgsd.objectives.OBJECTIVES`), and the
teachers of a micro-batch are built in one place (`sgsd.teaching`), so this loop has no per-method
branches and comparisons share one rollout path, one verifier and one evaluation.

Distributed runs (`accelerate launch --config_file configs/accelerate/...`: DDP, FSDP2, DeepSpeed; see
`sgsd.engine`): the policy, optimizer and schedule go through `accelerator.prepare`; each rank takes its
equal share of the step's problems; the objective is normalised by the whole step's batch over all
ranks, and the engine reduces the gradients after each step's last micro-batch (its own accumulation),
so every rank's update is the one a single process would make on the whole batch. Rollout records are
gathered and the online bank update runs on the main process and is broadcast, so every rank ends each
step with identical weights and an identical bank.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgsd import checkpoint as ckpt
from sgsd import objectives as obj
from sgsd.components import build_optimizer, build_policy, build_skills, extraction_generator, seed_everything
from sgsd.config import Config, config_to_dict, dump_config
from sgsd.data import held_out_sets, step_problems, training_problems, validation_sets
from sgsd.engine import Engine, check_setup, make_accelerator
from sgsd.errors import UserError
from sgsd.faults import maybe_fault
from sgsd.fileio import append_jsonl, atomic_write_text
from sgsd.generation import sampling_params
from sgsd.hostmem import release_freed_memory
from sgsd.methods import method_spec
from sgsd.metrics import MetricMeter, mixed_group_fraction, scalars, step_evidence
from sgsd.prompts import skills_in_prompt, student_prompt
from sgsd.summary import write_run_plots
from sgsd.teaching import MicroBatchLoss
from sgsd.tracking import RunTrackers


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
    pairs: list = field(default_factory=list)  # retrieved skill-mistake pairs (methods that retrieve)
    old_logp: Any = None  # [T] log-probs under the sampling weights (GRPO with several passes)


class Trainer:
    """Builds everything from a `Config` and runs `train()`. See the module docstring for the loop."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, accelerator=None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.spec = method_spec(cfg.train.method)
        self.objective = obj.objective_spec(self.spec.objective_name(cfg.objective.loss))
        self.acc = accelerator or make_accelerator()
        self.is_main = self.acc.is_main_process
        check_setup(cfg, self.acc)  # before any loading: an engine that cannot run this config fails now
        seed_everything(cfg.train.seed)
        self.eval_sets = held_out_sets(cfg.data)
        self.val_sets = validation_sets(cfg.data, self.eval_sets)  # {} without data.validation_size
        self.train_problems = training_problems(cfg.data, self.eval_sets, self.val_sets)
        # the skills before the policy: a bad bank file fails before a model load
        self.bank, self.retriever, self.ledger, self.evolver = build_skills(cfg, self.spec)
        self.model, self.tokenizer, self.teacher, self.generator = build_policy(
            cfg, self.acc.device, show_progress=cfg.train.progress and self.is_main
        )
        self.pad_id = self.tokenizer.pad_token_id
        self._synced_step: int | None = None  # the step whose weights a vllm engine samples with
        self.passes = cfg.objective.grpo_iterations if self.spec.grouped else 1  # optimizer steps per batch
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise UserError("the model has no trainable parameters (check model.lora_target_modules)")
        # the policy, optimizer and schedule through accelerator.prepare (DDP / FSDP / DeepSpeed / none);
        # the accumulation length first, as DeepSpeed reads it when preparing
        self.acc.gradient_accumulation_steps = self._micro_batches(self._rollouts_per_rank())
        self.engine = Engine(self.acc, self.model, *build_optimizer(cfg, trainable))
        self.optimizer, self.scheduler = self.engine.optimizer, self.engine.scheduler
        self.teacher.bind_parameters()  # FSDP replaced the parameters the teacher adapter pairs with
        self.loss = MicroBatchLoss(  # student forwards through the engine, teachers as it routes them
            self.spec, self.objective, cfg, self.engine.scoring_model, self.tokenizer, self.teacher.scoring
        )
        self.step, self.train_time_s, self.last_eval_time_s, self.last_eval_step = 0, 0.0, 0.0, -1
        # compute spent so far, logged cumulatively in every metrics row and restored on resume
        self.counters = dict.fromkeys(COUNTERS, 0.0)
        self.last_eval_cpu_s = 0.0
        self.trackers: RunTrackers | None = None  # open while train() runs
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
        if resume:
            self._resume()
        self.acc.wait_for_everyone()

    def _policy_generator(self, all_ranks: bool = False):
        """The generator, sampling with the current weights. hf samples from the policy itself; a vllm
        engine holds its own copy of the base model, so after every optimizer step (and after a resume)
        the trainable adapter is saved to RUN/rollout-adapter and registered with the engine under a
        new LoRA id before the engine is used again.

        vllm_server: the main process saves the adapter to RUN/rollout-adapter and loads it into the
        server as `sgsd-<run>-step-<N>` (unloading the previous step's); the other ranks, whose weights
        are identical, sample with that name. `all_ranks=True` (the rollouts, which every rank samples)
        makes them wait until the main process has loaded it; evaluation and the bank update run on the
        main process alone and pass False."""
        backend = self.cfg.rollout.backend
        if backend == "vllm" and self._synced_step != self.step:
            from sgsd.models import save_adapter

            rank = f"-rank{self.acc.process_index}" if self.acc.num_processes > 1 else ""
            self.generator.sync_adapter(save_adapter(self.model, self.run_dir / f"rollout-adapter{rank}"))
            self._synced_step = self.step
        elif backend == "vllm_server":
            if self._synced_step != self.step:
                name = f"{self._adapter_prefix}-step-{self.step}"
                if self.is_main:
                    from sgsd.models import save_adapter

                    self.generator.load_adapter(
                        name, save_adapter(self.model, self.run_dir / "rollout-adapter")
                    )
                else:
                    self.generator.use_adapter(name)
                self._synced_step = self.step
            if all_ranks and self.acc.num_processes > 1:
                self.acc.wait_for_everyone()  # this step's adapter is loaded before any rank samples
        return self.generator

    @property
    def _adapter_prefix(self) -> str:
        """The server-side adapter names' prefix: the same on every rank and across resumes of this run
        folder, different for another run sharing the server."""
        import hashlib

        return "sgsd-" + hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:10]

    def _release_server_adapter(self) -> None:
        """vllm_server, at the end of train(): unload this run's adapter from the server (best effort)."""
        if self.cfg.rollout.backend != "vllm_server" or not self.is_main:
            return
        self._synced_step = None  # a later use loads the adapter again
        try:
            self.generator.unload()
        except UserError as exc:
            print(f"warning: could not unload the rollout adapter from the vLLM server: {exc}")

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Run from the current step to `train.steps`; returns the last metrics row. The run's trackers
        (`train.report_to`) are open meanwhile and closed however the loop ends."""
        # logs the resolved config; a resumed run continues its tracker runs
        self.trackers = RunTrackers(self.cfg, self.run_dir, self.is_main, resume=self.step > 0)
        try:
            return self._train_loop()
        finally:
            self.trackers.close()
            self._release_server_adapter()

    def _train_loop(self) -> dict:
        from tqdm.auto import tqdm

        t = self.cfg.train
        last: dict = {}
        if self.step == 0 and self._wants_eval() and t.eval_at_start:
            self.evaluate(step=0)
        elif 0 < self.step < t.steps and self._eval_due(self.step - 1) and self.last_eval_step != self.step:
            self.evaluate(step=self.step)  # resumed from a checkpoint whose due evaluation the stop cut off
        bar = tqdm(
            total=t.steps, initial=self.step, desc=self.spec.name, disable=not (t.progress and self.is_main)
        )
        while self.step < t.steps:
            spent = self._budget_spent()
            if self._all_ranks_any(bool(spent)):
                if self.is_main:
                    print(f"{spent or 'the budget of another rank'} reached at step {self.step}")
                if self.step % t.save_every:
                    self.save_checkpoint()
                break
            before = self.step
            for last in self.train_step():
                self._log(last)
            bar.update(self.step - before)
            bar.set_postfix(self._postfix(last))
            if _reached(before, self.step, t.save_every) or self.step == t.steps:
                self.save_checkpoint()
            if self._eval_due(before) and self.step != t.steps:
                self.evaluate(step=self.step)
        bar.close()
        if self._wants_eval() and self.last_eval_step != self.step:  # not twice at a budget's end
            self.evaluate(step=self.step)
        if self.is_main and t.write_report:  # RUN/report: the run's plots, also sent to the trackers
            self.trackers.log_images(write_run_plots(self.run_dir), step=self.step)
        return last

    def train_step(self) -> list[dict]:
        """One round of Algorithm 1: a batch of rollouts and its optimizer step, or, for GRPO with
        `objective.grpo_iterations` = mu > 1, mu optimizer steps on the same rollouts (the old log-probs
        taken before the first, so the ratio and its clip act from the second). Returns one metrics row
        per optimizer step."""
        started, cpu_started = time.time(), time.process_time()
        passes = min(self.passes, self.cfg.train.steps - self.step)
        rollouts = self._rollouts(self._sample_problems(self.step // self.passes))  # y ~ p_S(.|x)
        t_rollout = time.time()
        self._verify(rollouts)  # r = +1 / -1
        t_verify = time.time()
        round_stats = self._round_stats(rollouts)
        if self.passes > 1:
            self.loss.snapshot_old_logp(rollouts, self._micro_batch())
        rows = []
        for _ in range(passes):
            pass_started = time.time()
            metrics, evidence = self.accumulate_gradients(rollouts)  # teachers, score, objective, backward
            if self._apply_update(metrics):  # clip, AdamW step; a non-finite step changes nothing
                metrics.update(self._commit_evidence(evidence))
            self.step += 1
            self.teacher.after_step(self.step)
            rows.append(dict(metrics, score_and_backward_s=round(time.time() - pass_started, 3), step=self.step,
                             lr=self.scheduler.get_last_lr()[0]))  # fmt: skip
        t_optimize = time.time()
        rows[-1].update(self._maybe_evolve_bank(rollouts))
        round_time, round_cpu = time.time() - started, time.process_time() - cpu_started
        for row in rows:  # the round's time is split evenly over its optimizer steps
            self.train_time_s += round_time / len(rows)
            self.counters["train_cpu_s"] += round_cpu / len(rows)
            row.update(time_s=round(round_time / len(rows), 3), train_time_s=round(self.train_time_s, 3))
            row.update(round_stats, **{k: round(v, 3) for k, v in self.counters.items()})
        rows[0].update(rollout_s=round(t_rollout - started, 3), verify_s=round(t_verify - t_rollout, 3))
        rows[-1].update(bank_s=round(time.time() - t_optimize, 3))
        maybe_fault("after_step", self.step)  # test-only kill point (sgsd/faults.py)
        return rows

    def _budget_spent(self) -> str | None:
        """Which training budget is used up (`train.time_budget_s` wall, `train.cpu_budget_s` CPU), if any."""
        t = self.cfg.train
        if t.time_budget_s and self.train_time_s >= t.time_budget_s:
            return f"time budget of {t.time_budget_s:.0f} s"
        if t.cpu_budget_s and self.counters["train_cpu_s"] >= t.cpu_budget_s:
            return f"CPU budget of {t.cpu_budget_s:.0f} CPU-s"
        return None

    def _round_stats(self, rollouts: list[Rollout]) -> dict:
        """Count a round's rollouts and completion tokens into the counters; for grouped methods (GRPO)
        also return the fraction of groups with mixed rewards (the groups that carry a gradient)."""
        self.counters["rollouts_total"] += len(rollouts)
        self.counters["completion_tokens_total"] += sum(len(r.completion_ids) for r in rollouts)
        if not self.spec.grouped:
            return {}
        return {"mixed_group_fraction": mixed_group_fraction([(r.group, r.reward) for r in rollouts])}

    # ------------------------------------------------------------------ problems and rollouts

    def _sample_problems(self, round_index: int) -> list:
        """This rank's problems for a round (resumed runs see exactly those of an uninterrupted one)."""
        t = self.cfg.train
        return step_problems(self.train_problems, round_index, t.batch_size, t.seed, self.acc.process_index,
                             self.acc.num_processes)  # fmt: skip

    def _rollouts(self, problems: list, round_index: int | None = None) -> list[Rollout]:
        """Rollouts of `problems`, sampled with the seed of round `round_index` (default: this step's)."""
        r = self.cfg.rollout
        round_index = self.step // self.passes if round_index is None else round_index
        questions = [p.question for p in problems]
        pairs = self.retriever.retrieve_batch(questions) if self.spec.retrieves else [[] for _ in problems]
        texts = [
            skills_in_prompt(q, pp) if self.spec.student_sees_skills and pp else student_prompt(q)
            for q, pp in zip(questions, pairs)
        ]
        seed = self.cfg.train.seed * 7919 + round_index * 104_729 + self.acc.process_index
        params = sampling_params(r, n=r.num_generations, seed=seed)
        generator = self._policy_generator(all_ranks=True)
        with self.engine.generation():  # FSDP: the whole weights, gathered once for the batch
            outputs = generator.generate(texts, params, enable_thinking=r.enable_thinking)
        return [
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
            for i, (problem, text, samples, pp) in enumerate(zip(problems, texts, outputs, pairs))
            for c in samples
        ]

    def _verify(self, rollouts: list[Rollout]) -> None:
        from sgsd.verifier import grade_many

        v = self.cfg.verifier
        pairs = [(r.completion_text, r.problem.answer) for r in rollouts]
        for r, res in zip(
            rollouts, grade_many(pairs, timeout_s=v.timeout_s, workers=v.workers, extraction=v.extraction)
        ):
            r.reward = 1.0 if res.correct else -1.0

    # ------------------------------------------------------------------ gradients and the update

    @property
    def trainable(self) -> list:
        """The trainable parameters as the engine holds them (sharded under FSDP)."""
        return self.engine.trainable()

    def accumulate_gradients(self, rollouts: list[Rollout]) -> tuple[dict, list[dict]]:
        """Backward of the batch objective over micro-batches (gradients accumulate in `.grad`, reduced
        across ranks by the engine after the last one); returns the step's metrics and each micro-batch's
        evidence. The objective is normalised by the whole step's batch over all ranks. Every
        micro-batch runs on every rank even after a non-finite loss (the engine's collectives need the
        same calls on all ranks); such a step is then skipped by `_apply_update`."""
        self.engine.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        meter, evidence, batch_loss = MetricMeter(), [], 0.0
        size = self._micro_batch()
        normalizer = max(1.0, self._all_ranks_sum(self.loss.batch_count(rollouts)))
        nonfinite = False
        self.engine.start_step(self._micro_batches(len(rollouts)))
        for start in range(0, len(rollouts), size):
            chunk = rollouts[start : start + size]
            with self.engine.accumulate():  # no gradient reduction before the step's last micro-batch
                loss, metrics, seen = self.loss(chunk, normalizer)
                self.engine.backward(loss)
            if not torch.isfinite(loss):
                nonfinite = True  # nothing of this step may reach the weights
                continue
            batch_loss += float(loss.detach())
            meter.add(scalars(metrics), weight=len(chunk))
            evidence += [seen] if seen else []
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        n = max(1, len(rollouts))
        stats = dict(
            meter.mean(),
            loss=self._all_ranks_sum(batch_loss),  # the batch objective (each rank holds its share)
            nonfinite=nonfinite,
            reward_mean=float(rewards.mean()),
            accuracy=float((rewards > 0).float().mean()),
            completion_tokens=sum(len(r.completion_ids) for r in rollouts) / n,
            truncated_fraction=sum(r.finish_reason == "length" for r in rollouts) / n,
        )
        return stats, evidence

    def _micro_batch(self) -> int:
        """Rollouts per forward/backward: `train.micro_batch_size` problems (GRPO: with all G rollouts)."""
        return self.cfg.train.micro_batch_size * (
            self.cfg.rollout.num_generations if self.spec.grouped else 1
        )

    def _rollouts_per_rank(self) -> int:
        g = self.cfg.rollout.num_generations
        return self.cfg.train.batch_size // self.acc.num_processes * g

    def _micro_batches(self, rollouts: int) -> int:
        return max(1, -(-rollouts // self._micro_batch()))

    def _apply_update(self, stats: dict) -> bool:
        """Clip the (engine-reduced) gradients, and step the optimizer and schedule unless the loss or
        gradient is non-finite on any rank. Returns whether the update was applied."""
        skip = self._all_ranks_any(stats.pop("nonfinite"))
        grad_norm = self.engine.clip_grad_norm(self.cfg.train.max_grad_norm or math.inf)
        applied = self.engine.step(ok=not skip and math.isfinite(grad_norm))  # DeepSpeed: done in backward
        if applied:
            self.scheduler.step()  # a skipped step does not advance the schedule
        elif self.is_main:
            print(f"step {self.step + 1}: non-finite loss or gradient, step skipped")
        self.optimizer.zero_grad(set_to_none=True)
        release_freed_memory()  # glibc keeps the step's freed temporaries resident otherwise (sgsd.hostmem)
        stats.update(grad_norm=grad_norm, skipped_step=0.0 if applied else 1.0)
        return applied

    def _commit_evidence(self, evidence: list[dict]) -> dict:
        """After an applied update: credit the skill ledger, and return the step's evidence to log."""
        for pairs, support, rho, reward in [e for part in evidence for e in part["ledger"]]:
            self.ledger.record(pairs, support, rho, reward)
        return step_evidence(evidence)

    def _all_ranks_any(self, flag: bool) -> bool:
        return self._all_ranks_sum(1.0 if flag else 0.0) > 0

    def _all_ranks_sum(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(t, reduction="sum").item())

    # ------------------------------------------------------------------ online bank update

    def _maybe_evolve_bank(self, rollouts: list[Rollout]) -> dict:
        if self.evolver is None:
            return {}
        from accelerate.utils import broadcast_object_list, gather_object

        keys = ("question", "answer", "completion", "reward", "step")  # the evolution window's records
        records = [dict(zip(keys, (r.problem.question, r.problem.answer, r.completion_text, r.reward, self.step)))
                   for r in rollouts]  # fmt: skip
        if self.acc.num_processes > 1:
            records = gather_object(records)
        self.evolver.add_records(records, step=self.step)
        if self.step % self.cfg.skills.update_every:
            return {}
        payload = [None]
        if self.is_main:
            extractor = extraction_generator(self.cfg, self._policy_generator())
            bank, report = self.evolver.maybe_update(self.step, self.bank, extractor, ledger=self.ledger)
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

    # ------------------------------------------------------------------ logging, checkpoints, eval

    def _log(self, metrics: dict) -> None:
        if self.is_main:
            append_jsonl(self.run_dir / "metrics.jsonl", metrics)
            self.trackers.log(metrics, step=metrics["step"])

    @staticmethod
    def _postfix(m: dict) -> dict:
        out = {"reward": f"{m.get('reward_mean', 0):+.2f}", "loss": f"{m.get('loss', 0):.4f}"}
        if obj.POLARITY_FRACTIONS[0] in m:
            out["pol(h/w/m/o/n)"] = "/".join(f"{m.get(k, 0):.2f}" for k in obj.POLARITY_FRACTIONS)
        return out

    def _checkpointed(self) -> dict:
        return dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, teacher=self.teacher,
                    evolver=self.evolver)  # fmt: skip

    def save_checkpoint(self) -> Path | None:
        """Adapter, optimizer, scheduler, RNG states, step, teacher state, bank, ledger and the evolution
        window, written into a temporary folder and renamed into place (atomic)."""
        self.acc.wait_for_everyone()
        gathered, shards = {}, None
        if self.engine.sharded:  # every rank: gather the whole trainable tensors
            gathered = dict(
                trainable=self.engine.full_trainable_state(), teacher_state=self.teacher.state_dict()
            )
        if self.engine.shards_optimizer:  # every rank: write its shard of the optimizer state
            shards = ckpt.shard_staging_dir(self.run_dir, self.step)
            if self.is_main:
                shutil.rmtree(shards, ignore_errors=True)
                shards.parent.mkdir(parents=True, exist_ok=True)
            self.acc.wait_for_everyone()
            self.engine.save_sharded_optimizer(shards)
            self.acc.wait_for_everyone()
        path = None
        if self.is_main:
            path = ckpt.save(self.run_dir, self.step, bank=self.bank, ledger=self.ledger, optimizer_shards=shards,
                             **gathered, **self._checkpointed())  # fmt: skip
        self.acc.wait_for_everyone()
        return path

    def _resume(self) -> None:
        sharded = self.engine.load_sharded_optimizer if self.engine.shards_optimizer else None
        state = ckpt.load_latest(self.run_dir, load_sharded_optimizer=sharded, **self._checkpointed())
        if state is None:
            raise UserError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
        self.step = state["step"]
        if state.get("bank") is not None and self.retriever is not None:
            self.bank = state["bank"]
            self.retriever.set_bank(self.bank)
        if state.get("ledger") is not None and self.ledger is not None:
            self.ledger = state["ledger"]
        rows = ckpt.truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        self.train_time_s = float(rows[-1].get("train_time_s", 0.0)) if rows else 0.0
        self.counters.update({k: float(rows[-1][k]) for k in COUNTERS if rows and k in rows[-1]})
        self._restore_eval_schedule()
        if self.is_main:
            print(f"resumed from step {self.step}")

    def _restore_eval_schedule(self) -> None:
        """On resume, time the next evaluation from the last one at or before the checkpoint's step (as the
        uninterrupted run would), not from the resume point; no evaluation yet: from the start."""
        from sgsd.evaluate import read_summaries

        done = {s: v for s, v in read_summaries(self.run_dir / "eval").items() if s <= self.step}
        self.last_eval_step = max(done, default=-1)
        last = done.get(self.last_eval_step, {})
        self.last_eval_time_s = float(last.get("train_time_s", 0.0))
        self.last_eval_cpu_s = float(last.get("train_cpu_s", 0.0))

    def _eval_due(self, before: int) -> bool:
        """Whether the steps before+1..self.step reach an evaluation: a multiple of `train.eval_every`, or
        `eval_every_s` training seconds / `eval_every_cpu_s` training CPU-seconds since the last one (any rank)."""
        t = self.cfg.train
        due_by_time = t.eval_every_s and self.train_time_s >= self.last_eval_time_s + t.eval_every_s
        due_by_cpu = (
            t.eval_every_cpu_s and self.counters["train_cpu_s"] >= self.last_eval_cpu_s + t.eval_every_cpu_s
        )
        return self._all_ranks_any(
            _reached(before, self.step, t.eval_every) or bool(due_by_time or due_by_cpu)
        )

    def _wants_eval(self) -> bool:
        return bool(self.eval_sets) and self.cfg.eval.k > 0

    def evaluate(self, step: int) -> dict:
        """Held-out avg@k with the current weights, on the test sources and the validation split (if any);
        written to RUN/eval/step-XXXXXX/ (validation: its validation/ subfolder; main process)."""
        self.last_eval_time_s, self.last_eval_step = self.train_time_s, step
        self.last_eval_cpu_s = self.counters["train_cpu_s"]
        if not self.is_main:
            self.acc.wait_for_everyone()
            return {}
        from sgsd.evaluate import evaluate_during_training

        test_sets = self.eval_sets if self.cfg.eval.test_in_loop else {}
        summary = evaluate_during_training(
            self.cfg, self._policy_generator(), test_sets, self.run_dir / "eval" / f"step-{step:06d}", step,
            retriever=self.retriever if self.cfg.eval.with_skills else None, train_time_s=self.train_time_s,
            validation_sets=self.val_sets, extra={k: round(v, 3) for k, v in self.counters.items()},
        )  # fmt: skip
        self.model.train()
        if self.trackers is not None:
            self.trackers.log_eval(summary, step)
        k = self.cfg.eval.k
        line = ", ".join(f"{src}: avg@{k} {r['avg@k']:.3f}" for src, r in summary["results"].items())
        line += "".join(f", val {src}: {r['avg@k']:.3f}" for src, r in summary.get("validation", {}).items())
        print(f"eval step {step}: {line}")
        self.acc.wait_for_everyone()
        return summary


# cumulative compute, in every metrics row: training CPU-seconds, rollouts and completion tokens generated
COUNTERS = ("train_cpu_s", "rollouts_total", "completion_tokens_total")


def _reached(before: int, after: int, every: int) -> bool:
    """Whether the steps before+1..after include a multiple of `every` (0 = never)."""
    return bool(every) and after // every > before // every


def default_run_dir(cfg: Config) -> Path:
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    return Path("runs") / f"{cfg.train.method}-{time.strftime('%Y%m%d-%H%M%S')}"


__all__ = ["Trainer", "Rollout", "default_run_dir", "config_to_dict"]
