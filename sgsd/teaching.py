"""One micro-batch of a training step: its teachers, the scores they give, and the named objective.

`build_teacher_batch` turns each rollout into its teachers' token ids and weights alpha (Eq. 6, with
`skills.weight_temperature`), computed once, following the method's spec (`sgsd.methods`): one teacher
per retrieved pair (SGSD; the pairs are cut to `teachers.count` here and nowhere else), one teacher
that sees every retrieved pair (OPSD+Skill), or one that sees the reference answer (OPSD). The scoring
functions run the model for one kind of objective input (`sgsd.objectives.OBJECTIVES`), every teacher
forward inside `teacher_context` (live / frozen / EMA / periodic weights) and `teachers.chunk_rows`
rows at a time. `MicroBatchLoss` ties the three together for the trainer; all loss math stays in
`sgsd.objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from sgsd.hostmem import release_freed_memory
from sgsd.methods import MethodSpec
from sgsd.metrics import decision_evidence
from sgsd.objectives import (
    divergence_objective,
    group_advantages,
    grpo_loss,
    opsd_forward_kl,
    sgsd_local_kl_loss,
    sgsd_loss,
    teacher_weights,
)
from sgsd.prompts import (
    null_teacher_prompt,
    official_opsd_skill_teacher_prompt,
    official_opsd_teacher_prompt,
    official_skill_answer_teacher_prompt,
    skills_in_prompt,
    teacher_prompt,
)
from sgsd.scoring import (
    completion_token_mask,
    score_divergence,
    score_student,
    score_teachers,
    score_teachers_expected,
    score_topk_support,
    teacher_prompt_ids,
)


@dataclass
class TeacherBatch:
    prompt_ids: list[list[list[int]]]  # [B][K] token ids of each rollout's teacher prompts
    weights: torch.Tensor  # [B, K] alpha (Eq. 6), 0 for missing teachers
    mask: torch.Tensor  # [B, K] bool, the teachers that exist
    ledger_pairs: list[list]  # [B][K] the pair behind each teacher; [] for teachers of several pairs
    null_ids: list[list[int]] | None = None  # [B] the null teacher's prompt (support_estimator=null_relative)


def teacher_texts(spec: MethodSpec, problem, pairs: list, teachers_cfg):
    """(teacher user messages, retrieval scores, pairs for the ledger) of one rollout. The privileged
    answer is written as `teachers.answer_template` says: the answer line, or the official code's
    reference block (docs/FIDELITY.md)."""
    t, q, answer = teachers_cfg, problem.question, problem.answer
    official = t.answer_template == "official"
    if spec.teachers == "per_pair":
        pairs = pairs[: t.count]
        if t.include_answer and official:
            texts = [official_skill_answer_teacher_prompt(q, p.skill, p.mistake, answer) for p in pairs]
        else:
            hint = answer if t.include_answer else None
            texts = [teacher_prompt(q, p.skill, p.mistake, answer=hint) for p in pairs]
        return texts, [p.score for p in pairs], list(pairs)
    if spec.teachers == "joint":  # OPSD+Skill: the answer and every retrieved pair in one context
        text = (
            official_opsd_skill_teacher_prompt(q, pairs, answer)
            if official
            else skills_in_prompt(q, pairs, answer)
        )
        return [text], [0.0], []
    if spec.teachers == "answer":  # OPSD: the reference answer
        text = official_opsd_teacher_prompt(q, answer) if official else teacher_prompt(q, answer=answer)
        return [text], [0.0], []
    return [], [], []


def build_teacher_batch(spec: MethodSpec, rollouts: list, tokenizer, cfg, device) -> TeacherBatch:
    """The teachers of `rollouts` (each with `.problem` and `.pairs`) under config `cfg`. All teacher
    prompts of the micro-batch (and the null teacher's, for `support_estimator=null_relative`) are
    rendered and tokenized in one `teacher_prompt_ids` call."""
    t = cfg.teachers
    texts, scores, ledger_pairs = zip(*(teacher_texts(spec, r.problem, r.pairs, t) for r in rollouts))
    null_texts = []
    if cfg.objective.support_estimator == "null_relative":  # same template, content-free guidance
        null_texts = [null_teacher_prompt(r.problem.question, r.problem.answer if t.include_answer else None)
                      for r in rollouts]  # fmt: skip
    flat = teacher_prompt_ids(
        tokenizer,
        [x for row in texts for x in row] + null_texts,
        student_enable_thinking=cfg.rollout.enable_thinking,
        teacher_enable_thinking=t.enable_thinking,
        align_think_block=t.align_think_block,
    )
    ids, start = [], 0
    for row in texts:  # back to [B][K]
        ids.append(flat[start : start + len(row)])
        start += len(row)
    k = max(1, max(len(x) for x in texts))
    retrieval = torch.zeros(len(rollouts), k, device=device)  # [B, K]
    mask = torch.zeros(len(rollouts), k, dtype=torch.bool, device=device)  # [B, K]
    for b, s in enumerate(scores):
        retrieval[b, : len(s)] = torch.tensor(s, dtype=torch.float32)
        mask[b, : len(s)] = True
    weights = teacher_weights(retrieval, mask, cfg.skills.weight_temperature)  # [B, K]
    return TeacherBatch(ids, weights, mask, list(ledger_pairs), flat[start:] if null_texts else None)


def completion_valid(completion_ids: list[list[int]], device) -> torch.Tensor:
    """[B, T] bool: True on each row's completion tokens (T the longest completion)."""
    width = max((len(c) for c in completion_ids), default=0)
    valid = torch.zeros(len(completion_ids), width, dtype=torch.bool, device=device)  # [B, T]
    for i, c in enumerate(completion_ids):
        valid[i, : len(c)] = True
    return valid


def completion_ids_of(rollouts: list, pad_id: int) -> list[list[int]]:
    """Each rollout's completion token ids; an empty completion is scored as one pad token."""
    return [r.completion_ids if r.completion_ids else [pad_id] for r in rollouts]


def token_mask(tokenizer, completion_ids, valid: torch.Tensor, use_mask: bool) -> torch.Tensor:
    """m_t (Section 2.4) when `objective.token_mask` is on, else every completion token."""
    return completion_token_mask(tokenizer, completion_ids, valid) if use_mask else valid


@dataclass
class SampledScores:
    """What the gated and sampled-RKL objectives read, for B rollouts and K teachers."""

    student: torch.Tensor  # [B, T] log p_S(y_t) with grad; [B, K, T] renormalised per teacher (top-K)
    teacher: torch.Tensor  # [B, K, T] log p_T(y_t), no grad
    valid: torch.Tensor  # [B, T] completion tokens
    local_kl: torch.Tensor | None = (
        None  # [B, K, T] local forward KL with grad (objective.topk_gate=local_kl)
    )
    baseline: torch.Tensor | None = None  # [B, K, T] expected gap b_t (support_estimator=expected)
    null_teacher: torch.Tensor | None = (
        None  # [B, T] the null teacher's log p (support_estimator=null_relative)
    )


def score_sampled_tokens(
    model, student_prompts, batch: TeacherBatch, completions, pad_id, cfg, teacher_context
) -> SampledScores:
    """Sampled-token log-probs of the student and each teacher, plus what the configured support
    estimator and top-K gate need: the expected gaps under the rollout sampler (`expected`), the null
    teacher's log-probs (`null_relative`, one extra teacher row per rollout), the local KL (top-K)."""
    o, t, r = cfg.objective, cfg.teachers, cfg.rollout
    common = dict(chunk_rows=t.chunk_rows, chunk_size=o.position_chunk)
    if o.support == "topk":  # Section 4.5: teacher top-K + sampled token, renormalised per teacher
        local_kl = o.topk_gate == "local_kl"
        out = score_topk_support(model, student_prompts, batch.prompt_ids, completions, pad_id, k=o.support_top_k,
                                 teacher_context=teacher_context, local_kl=local_kl, **common)  # fmt: skip
        valid = completion_valid(completions, out[0].device)
        return SampledScores(out[0], out[1], valid, local_kl=out[3] if local_kl else None)
    ids = batch.prompt_ids
    if batch.null_ids is not None:  # the null teacher scores first, in the same forwards
        ids = [[null] + row for null, row in zip(batch.null_ids, ids)]
    baseline = None
    if o.support_estimator == "expected":  # teacher forwards inside teacher_context, student outside
        teacher, _, baseline = score_teachers_expected(
            model,
            student_prompts,
            ids,
            completions,
            pad_id,
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            teacher_context=teacher_context,
            **common,
        )  # fmt: skip  [B, K, T] each, no grad
    else:
        with teacher_context():  # score_teachers runs only teacher forwards: the context wraps the call
            teacher, _ = score_teachers(model, ids, completions, pad_id, **common)  # [B, K, T] no grad
    release_freed_memory()  # the teacher forwards' temporaries, before the student's activations
    student, valid = score_student(model, student_prompts, completions, pad_id, chunk_size=o.position_chunk)
    null = None
    if batch.null_ids is not None:
        null, teacher = teacher[:, 0], teacher[:, 1:]  # [B, T], [B, K, T]
        baseline = baseline[:, 1:] if baseline is not None else None
    return SampledScores(student, teacher, valid, baseline=baseline, null_teacher=null)


def score_divergences(
    model, student_prompts, batch: TeacherBatch, completions, pad_id, cfg, teacher_context, divergence_fn=None
):
    """Per-position full-vocabulary divergences `(per_token [B, K, T] with grad, valid [B, T])` between
    the student and each teacher. The student rows are repeated once per teacher (memory grows K-fold;
    K > 1 is used by the Fig. 3(c) ablation only)."""
    o = cfg.objective
    rows = [(b, k) for b, ids in enumerate(batch.prompt_ids) for k in range(len(ids))]
    per_row, _ = score_divergence(
        model,
        [student_prompts[b] for b, _ in rows],
        [batch.prompt_ids[b][k] for b, k in rows],
        [completions[b] for b, _ in rows],
        pad_id,
        kind=o.loss,
        beta=o.jsd_beta,
        chunk_size=o.position_chunk,
        chunk_rows=cfg.teachers.chunk_rows,
        teacher_context=teacher_context,
        divergence_fn=divergence_fn,
    )  # [R, T]
    valid = completion_valid(completions, per_row.device)  # [B, T]
    grid = per_row.new_zeros((len(completions), batch.mask.shape[1], valid.shape[1]))  # [B, K, T]
    index = torch.tensor(rows, device=per_row.device).reshape(-1, 2)  # [R, 2]
    grid = grid.index_put((index[:, 0], index[:, 1]), per_row)  # out of place: keeps the graph
    return grid, valid


class MicroBatchLoss:
    """The loss of one micro-batch of rollouts for a method and a named objective: builds the teachers,
    runs the scoring the objective reads (`ObjectiveSpec.scores`), and applies the objective of
    `sgsd.objectives`, normalised by the whole batch (`normalizer`), so that micro-batch gradients add
    up to the batch objective's. Calling it returns `(loss, metrics, evidence)`; evidence (the
    teachers' decisions, see `sgsd.metrics.decision_evidence`) is None for objectives without
    polarity decisions.

    Which tokens count: m_t of Section 2.4 (`objective.token_mask`), or every sampled token, EOS
    included, for GRPO with `objective.grpo_mask=completion` and the divergences with
    `objective.opsd_mask=completion` (the official code). How they are averaged: per completion then
    over problems, or over all kept tokens of the batch (`grpo_aggregation`, `opsd_aggregation`)."""

    def __init__(self, spec: MethodSpec, objective, cfg, model, tokenizer, teacher_context):
        self.spec, self.objective, self.cfg = spec, objective, cfg
        self.model, self.tokenizer, self.teacher_context = model, tokenizer, teacher_context
        self.pad_id = tokenizer.pad_token_id
        o = cfg.objective
        self.every_token, self.aggregation = {
            "policy": (o.grpo_mask == "completion", o.grpo_aggregation),
            "divergence": (o.opsd_mask == "completion", o.opsd_aggregation),
            "sampled_tokens": (False, "sequence_mean"),
        }[objective.scores]
        self.divergence_fn = None  # OPSD's forward KL on tempered logits, clamped (official code)
        if o.loss == "forward_kl" and (o.opsd_temperature != 1.0 or o.opsd_clip is not None):
            self.divergence_fn = partial(
                opsd_forward_kl,
                temperature=o.opsd_temperature,
                clip=o.opsd_clip,
                clip_scope=o.opsd_clip_scope,
            )
        self._loss = {
            "sampled_tokens": self._sampled_token_loss,
            "divergence": self._divergence_loss,
            "policy": self._policy_loss,
        }[objective.scores]

    def __call__(self, chunk: list, normalizer: float):
        return self._loss(chunk, normalizer)

    def normalizer(self, rollouts: list) -> float:
        """What the batch objective averages over: the kept tokens of the whole batch (token_mean
        aggregation) or its rollouts (at least 1)."""
        return max(1.0, self.batch_count(rollouts))

    def batch_count(self, rollouts: list) -> float:
        """The kept tokens (token_mean) or rollouts of `rollouts`; the trainer sums it over ranks, so
        the normaliser is the whole step's batch's on every rank."""
        if self.aggregation == "token_mean":
            ids = completion_ids_of(rollouts, self.pad_id)
            return float(int(self._mask(ids, completion_valid(ids, "cpu")).sum()))
        return float(len(rollouts))

    def _mask(self, completions, valid: torch.Tensor) -> torch.Tensor:
        return (
            valid
            if self.every_token
            else token_mask(self.tokenizer, completions, valid, self.cfg.objective.token_mask)
        )

    def _device(self):
        return next(self.model.parameters()).device

    def _sampled_token_loss(self, chunk: list, normalizer: float):
        """SGSD's gated objective (or its sampled-token RKL variant)."""
        o = self.cfg.objective
        teachers = build_teacher_batch(self.spec, chunk, self.tokenizer, self.cfg, self._device())
        completions = completion_ids_of(chunk, self.pad_id)
        prompts = [r.prompt_ids for r in chunk]
        scores = score_sampled_tokens(
            self.model, prompts, teachers, completions, self.pad_id, self.cfg, self.teacher_context
        )
        rewards = [r.reward for r in chunk]
        common = dict(
            tau=o.tau,
            clip=o.clip,
            threshold=o.threshold,
            eps=o.eps,
            use_polarity=o.use_polarity and self.spec.polarity,
            weights=teachers.weights,
            normalizer=normalizer,
        )
        mask, reward = (
            self._mask(completions, scores.valid),
            torch.tensor(rewards, device=scores.teacher.device),
        )
        if scores.local_kl is not None:  # the official top-K variant: the gate reads the local KL
            loss, metrics = sgsd_local_kl_loss(
                scores.student, scores.teacher, scores.local_kl, mask, reward, None, teachers.mask, **common
            )
        else:
            null_delta = (
                None if scores.null_teacher is None else scores.null_teacher - scores.student.detach()
            )
            loss, metrics = sgsd_loss(
                scores.student, scores.teacher, mask, reward, None, teachers.mask, teacher_term=self.objective.name,
                support_baseline=scores.baseline, support_estimator=o.support_estimator, null_delta=null_delta,
                **common,
            )  # fmt: skip
        return loss, metrics, decision_evidence(rewards, metrics, teachers.mask, teachers.ledger_pairs)

    def _divergence_loss(self, chunk: list, normalizer: float):
        """Full-vocabulary divergence to each teacher (OPSD, Fig. 3(c)), weighted by alpha."""
        teachers = build_teacher_batch(self.spec, chunk, self.tokenizer, self.cfg, self._device())
        completions = completion_ids_of(chunk, self.pad_id)
        prompts = [r.prompt_ids for r in chunk]
        per_token, valid = score_divergences(
            self.model,
            prompts,
            teachers,
            completions,
            self.pad_id,
            self.cfg,
            self.teacher_context,
            self.divergence_fn,
        )  # [B, K, T] with grad, [B, T]
        loss, metrics = divergence_objective(
            per_token,
            self._mask(completions, valid),
            teachers.weights,
            normalizer,
            self.cfg.objective.eps,
            aggregation=self.aggregation,
        )
        return loss, metrics, None

    @torch.no_grad()
    def snapshot_old_logp(self, rollouts: list, micro_batch: int) -> None:
        """GRPO with several passes over one batch (`objective.grpo_iterations`): keep each rollout's
        log-probs under the weights that sampled it (`r.old_logp`, [T_r]), before the first update, so
        the ratio of the clipped surrogate is the real one from the second pass on."""
        for start in range(0, len(rollouts), micro_batch):
            chunk = rollouts[start : start + micro_batch]
            completions = completion_ids_of(chunk, self.pad_id)
            logp, _ = score_student(self.model, [r.prompt_ids for r in chunk], completions, self.pad_id,
                                    chunk_size=self.cfg.objective.position_chunk)  # fmt: skip
            for r, row, c in zip(chunk, logp, completions):
                r.old_logp = row[: len(c)].clone()

    def _policy_loss(self, chunk: list, normalizer: float):
        """GRPO: group-relative advantages and the clipped surrogate on the policy's own log-probs."""
        o = self.cfg.objective
        completions = completion_ids_of(chunk, self.pad_id)
        prompts = [r.prompt_ids for r in chunk]
        logp, valid = score_student(
            self.model, prompts, completions, self.pad_id, chunk_size=o.position_chunk
        )
        old = logp.detach()  # [G*P, T]  one pass: ratio 1
        if all(getattr(r, "old_logp", None) is not None for r in chunk):
            old = torch.zeros_like(old)
            for i, r in enumerate(chunk):
                old[i, : len(r.old_logp)] = r.old_logp
        rewards = torch.tensor([r.reward for r in chunk], device=logp.device)  # [G*P]
        adv = group_advantages(
            rewards, group_size=self.cfg.rollout.num_generations, scale=o.grpo_scale_rewards
        )
        loss, metrics = grpo_loss(
            logp,
            old,
            adv,
            self._mask(completions, valid),
            clip_eps=o.grpo_clip,
            aggregation=self.aggregation,
            normalizer=normalizer,
        )
        return loss, dict(metrics, advantage_abs_mean=adv.abs().mean()), None
