"""Sampled-token log-probabilities of one student rollout under the student and K teachers.

Scoring is the cost centre of SGSD: every rollout y is scored once by the student (with grad) and
by K skill-conditioned teachers (no grad). The objectives need only log p(y_t) of the sampled token,
so nothing here materialises a `[rows, T, V]` tensor:

1. Rows are packed with prompts LEFT-padded, so every completion starts at the same column, and
   completions right-padded. Position ids come from the attention mask, so padding never shifts a
   position: a row scores exactly as it would alone.
2. Only the decoder runs over the whole row. The output head is applied to the completion positions
   only, a chunk of positions at a time, flattened to a contiguous `[n, H]` matrix (a 3-D slice makes
   torch fall back to a slow batched matmul).
3. Each chunk's logits are normalised in fp32 (`log_softmax(..., dtype=float32)`, so a bf16 model
   still gets fp32 log-probs) and the sampled token is gathered. With grad, each chunk runs under
   `torch.utils.checkpoint`, so only one chunk's logits are alive during backward.
4. The student runs once per problem; its log-probs broadcast over the K teachers. Teacher rows run
   under no_grad, `chunk_rows` rows per forward.
5. Over a bf16 (or fp16) base, LoRA adapters run in that precision with fp32 master weights
   (`sgsd.models.adapters_in_base_precision`), so no fp32 copy of every adapter input is saved.

Teacher weights are whatever `model` holds when called: for a live teacher pass the policy; for a
frozen teacher wrap `score_teachers` in `model.disable_adapter()` (the combined functions take a
`teacher_context` factory for this).

Also here: the token mask m_t of Section 2.4 (`completion_token_mask`), the thinking-boundary
alignment of teacher prompts (`teacher_prompt_ids`), the top-K support variant of Section 4.5
(`score_topk_support`) and full-distribution divergences for OPSD (`score_divergence`).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from sgsd.errors import ConfigError, DataError
from sgsd.models import adapters_in_base_precision
from sgsd.objectives import (
    forward_kl,
    generalized_jsd,
    local_support_ids,
    local_support_terms_from_gathered,
    reverse_kl,
    topk_support_logprobs,
)
from sgsd.prompts import render_chat

__all__ = [
    "score_student",
    "score_teachers",
    "score_teachers_expected",
    "sampler_distribution",
    "expected_gap",
    "score_topk_support",
    "score_divergence",
    "completion_token_mask",
    "teacher_prompt_ids",
]

TokenIds = Sequence[Sequence[int]]
ContextFactory = Callable[[], contextlib.AbstractContextManager] | None


# ---------------------------------------------------------------------------------------------------
# Model parts: the decoder (hidden states) and the output head, found generically.


@dataclass(frozen=True)
class _CausalLMParts:
    decoder: torch.nn.Module
    head: torch.nn.Module
    softcap: float | None  # final logit soft-capping (Gemma 2 style), applied after the head
    logit_scale: float | None  # constant logit multiplier (Cohere style)
    routed: bool = False  # decoder is sgsd.engine.ScoringModel.decoder (returns hidden states)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[n, V]` from hidden states `[n, H]`, in the model dtype."""
        logits = self.head(hidden)  # [n, V]
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _causal_lm_parts(model: torch.nn.Module) -> _CausalLMParts:
    """Decoder and head of a HF causal LM, plain or PEFT-wrapped (LoRA layers stay in place). In
    training the model is an `sgsd.engine.ScoringModel`: the head is the policy's, and decoder forwards
    go through the training engine (DDP / FSDP / DeepSpeed) as it routes them."""
    from sgsd.engine import ScoringModel

    if isinstance(model, ScoringModel):
        parts = _causal_lm_parts(model.policy)
        return _CausalLMParts(model.decoder, parts.head, parts.softcap, parts.logit_scale, routed=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or not hasattr(base, "get_decoder"):
        raise ConfigError(f"{type(base).__name__} is not a causal LM with an output head; cannot score it")
    decoder = base.get_decoder()
    if decoder is base:
        raise ConfigError(f"cannot find the decoder inside {type(base).__name__}")
    config = getattr(base, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    logit_scale = getattr(config, "logit_scale", None)
    return _CausalLMParts(decoder, head, softcap or None, logit_scale)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------
# Packing: left-padded prompts, right-padded completions, positions from the attention mask.


@dataclass(frozen=True)
class _Packed:
    input_ids: torch.Tensor  # [R, P + T - 1]
    attention_mask: torch.Tensor  # [R, P + T - 1]
    position_ids: torch.Tensor  # [R, P + T - 1]
    targets: torch.Tensor  # [R, T] completion tokens (pad_id where invalid)
    valid: torch.Tensor  # [R, T] bool, t < len(completion)
    first: int  # column whose hidden state predicts completion token 0 (= P - 1)


def _pack(prompts: TokenIds, completions: TokenIds, pad_id: int, device: torch.device) -> _Packed:
    """Pack rows as [left pad | prompt | completion | right pad] and drop the last column (its hidden
    state predicts nothing). Every completion starts at column P = longest prompt."""
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise DataError(f"row {row} has an empty prompt; a completion needs at least one prompt token")
    width_p = max(len(p) for p in prompts)
    width_t = max(len(c) for c in completions)
    rows = len(prompts)
    ids = torch.full((rows, width_p + width_t), pad_id, dtype=torch.long)  # [R, P + T]
    mask = torch.zeros((rows, width_p + width_t), dtype=torch.long)  # [R, P + T]
    for r, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        start = width_p - len(prompt)
        stop = width_p + len(completion)
        ids[r, start:stop] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        mask[r, start:stop] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [R, P + T]
    valid = mask[:, width_p:].bool()  # [R, T]
    return _Packed(
        input_ids=ids[:, :-1].to(device),
        attention_mask=mask[:, :-1].to(device),
        position_ids=positions[:, :-1].to(device),
        targets=ids[:, width_p:].to(device),
        valid=valid.to(device),
        first=width_p - 1,
    )


def _completion_hidden(parts: _CausalLMParts, packed: _Packed) -> torch.Tensor:
    """Decoder hidden states at the valid completion positions, flattened row-major: `[N, H]`."""
    if parts.routed:  # the engine's forward (sgsd.engine.DecoderForward) returns the hidden states
        states = parts.decoder(
            input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids
        )  # [R, L, H]
    else:
        with adapters_in_base_precision(parts.decoder):
            states = parts.decoder(
                input_ids=packed.input_ids,
                attention_mask=packed.attention_mask,
                position_ids=packed.position_ids,
                use_cache=False,
            ).last_hidden_state  # [R, L, H]
    width_t = packed.targets.shape[1]
    hidden = states[:, packed.first : packed.first + width_t]  # [R, T, H]
    return hidden[packed.valid]  # [N, H] (a contiguous copy)


def _no_positions(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values and validity for a batch whose completions are all empty: `[B, 0]` each."""
    empty = torch.zeros((rows, 0), device=device)
    return empty, empty.bool()


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _check_batch(completion_ids: TokenIds, chunk_size: int, *others: tuple[str, Sequence]) -> None:
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    for name, seq in others:
        if len(seq) != len(completion_ids):
            raise DataError(f"{name} has {len(seq)} problems but completion_ids has {len(completion_ids)}")


# ---------------------------------------------------------------------------------------------------
# Sampled-token log-probs.


def _token_logp(parts: _CausalLMParts, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 log p(token) over the full vocabulary for hidden `[n, H]`, tokens `[n]` -> `[n]`."""
    logits = parts.logits(hidden)  # [n, V]
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [n, V]
    return logp.gather(1, tokens[:, None]).squeeze(1)  # [n]


def _chunked_token_logp(
    parts: _CausalLMParts, hidden: torch.Tensor, tokens: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """`_token_logp` over `[N, H]` hidden states in chunks; with grad each chunk is checkpointed."""
    pieces = []
    for a, b in _chunks(hidden.shape[0], chunk_tokens):
        if hidden.requires_grad:
            pieces.append(checkpoint(_token_logp, parts, hidden[a:b], tokens[a:b], use_reentrant=False))
        else:
            pieces.append(_token_logp(parts, hidden[a:b], tokens[a:b]))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)  # [N]


def score_student(
    model: torch.nn.Module,
    prompt_ids: TokenIds,
    completion_ids: TokenIds,
    pad_id: int,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs of each sampled completion token, one forward for all B problems.

    Returns `(logp [B, T] fp32, valid [B, T] bool)` with T the longest completion; logp is 0 where
    `valid` is False and carries grad when grad is enabled. Chunks hold about `chunk_size` positions
    per row (`chunk_size * B` tokens).
    """
    _check_batch(completion_ids, chunk_size, ("prompt_ids", prompt_ids))
    device = _device(model)
    parts = _causal_lm_parts(model)
    rows, width_t = len(completion_ids), max((len(c) for c in completion_ids), default=0)
    if width_t == 0:
        return _no_positions(rows, device)
    packed = _pack(prompt_ids, completion_ids, pad_id, device)
    hidden = _completion_hidden(parts, packed)  # [N, H]
    flat = _chunked_token_logp(parts, hidden, packed.targets[packed.valid], chunk_size * rows)  # [N]
    logp = torch.zeros((rows, width_t), dtype=torch.float32, device=device)  # [B, T]
    logp[packed.valid] = flat
    return logp, packed.valid


def _teacher_rows(teacher_prompt_ids: Sequence[TokenIds]) -> list[tuple[int, int]]:
    """(problem, teacher) pairs, longest prompts first so that rows of a chunk pad little."""
    pairs = [(b, k) for b, prompts in enumerate(teacher_prompt_ids) for k in range(len(prompts))]
    return sorted(pairs, key=lambda bk: -len(teacher_prompt_ids[bk[0]][bk[1]]))


def _teacher_shape(teacher_prompt_ids: Sequence[TokenIds], completion_ids: TokenIds) -> tuple[int, int, int]:
    width_k = max((len(p) for p in teacher_prompt_ids), default=0)
    width_t = max((len(c) for c in completion_ids), default=0)
    return len(completion_ids), width_k, width_t


def _teacher_mask(teacher_prompt_ids: Sequence[TokenIds], width_k: int, device) -> torch.Tensor:
    mask = torch.zeros((len(teacher_prompt_ids), width_k), dtype=torch.bool, device=device)  # [B, K]
    for b, prompts in enumerate(teacher_prompt_ids):
        mask[b, : len(prompts)] = True
    return mask


@torch.no_grad()
def score_teachers(
    model: torch.nn.Module,
    teacher_prompt_ids: Sequence[TokenIds],
    completion_ids: TokenIds,
    pad_id: int,
    chunk_rows: int = 4,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each problem's completion under each of its teachers, without grad.

    `teacher_prompt_ids[b]` holds up to K prompts for problem b; every teacher scores exactly
    `completion_ids[b]` right after its own prompt, at the positions it would have alone. Rows go
    `chunk_rows` per forward. Returns `(logp [B, K, T] fp32, teacher_mask [B, K] bool)`; logp is 0 for
    missing teachers and at padding positions.
    """
    _check_batch(completion_ids, chunk_size, ("teacher_prompt_ids", teacher_prompt_ids))
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be at least 1, got {chunk_rows}")
    device = _device(model)
    parts = _causal_lm_parts(model)
    rows, width_k, width_t = _teacher_shape(teacher_prompt_ids, completion_ids)
    logp = torch.zeros((rows, width_k, width_t), dtype=torch.float32, device=device)  # [B, K, T]
    teacher_mask = _teacher_mask(teacher_prompt_ids, width_k, device)  # [B, K]
    if width_t == 0:
        return logp, teacher_mask
    for pairs, packed in _teacher_chunks(teacher_prompt_ids, completion_ids, chunk_rows, pad_id, device):
        hidden = _completion_hidden(parts, packed)  # [N, H]
        flat = _chunked_token_logp(parts, hidden, packed.targets[packed.valid], chunk_size * len(pairs))
        _put_rows(logp, pairs, packed, flat)
    return logp, teacher_mask


def _teacher_chunks(teacher_prompt_ids, completion_ids, chunk_rows: int, pad_id: int, device):
    """(problem, teacher) pairs `chunk_rows` at a time, longest prompts first, each with its packed
    batch; chunks whose completions are all empty are skipped."""
    order = _teacher_rows(teacher_prompt_ids)
    for a, b in _chunks(len(order), chunk_rows):
        pairs = order[a:b]
        completions = [completion_ids[p] for p, _ in pairs]
        if max(len(c) for c in completions) == 0:
            continue
        yield pairs, _pack([teacher_prompt_ids[p][k] for p, k in pairs], completions, pad_id, device)


def _put_rows(target: torch.Tensor, pairs, packed: _Packed, flat: torch.Tensor) -> None:
    """Scatter a chunk's per-token values `flat` [N] (packed order) into `target` [B, K, T]."""
    grid = torch.zeros(packed.valid.shape, dtype=torch.float32, device=target.device)  # [r, T_chunk]
    grid[packed.valid] = flat
    problems = torch.tensor([p for p, _ in pairs], device=target.device)
    teachers = torch.tensor([k for _, k in pairs], device=target.device)
    target[problems, teachers, : grid.shape[1]] = grid


# ---------------------------------------------------------------------------------------------------
# The expected gap under the rollout sampler (support estimator `expected`).


def sampler_distribution(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's distribution q over the tokens it can draw, as transformers' `generate` samples:
    logits / temperature, then top-k (ties with the k-th value kept), then top-p (the smallest set of
    most likely tokens whose mass reaches top_p; at least one token); temperature 0 is greedy.

    `logits` `[n, V]` (upcast to fp32, as `generate` does). Returns `(ids [n, m], q [n, m])`: for each
    row the m candidate ids and their probabilities, 0 where a candidate is cut: about k with top-k;
    with top-p alone NUCLEUS_CANDIDATES when every row's nucleus lies among that many most likely
    tokens (`nucleus_candidates`), else V; V without either; 1 when greedy. With top-k, or top-p
    alone in narrow rows, only `[n, m]` tensors and one `[n, V]` fp32 copy are made.
    """
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"bad sampler: temperature {temperature}, top_k {top_k}, top_p {top_p}")
    vocab = logits.shape[-1]
    if temperature == 0:
        ids = logits.argmax(-1, keepdim=True)  # [n, 1]
        return ids, torch.ones(ids.shape, dtype=torch.float32, device=logits.device)
    logits = logits.float()  # [n, V]
    if top_k and top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [n, 1]  (dividing by T > 0 keeps the order)
        width = int((logits >= kth).sum(-1).max())  # ties with the k-th value stay, as in transformers
        values, ids = logits.topk(width, dim=-1)  # [n, m] descending
        values = values.masked_fill(values < kth, float("-inf")) / temperature  # [n, m]
        # top-p then works on the top-k distribution: the candidates hold all of its mass
        return ids, top_p_cut(values, values.logsumexp(-1, keepdim=True), 0.0, top_p).softmax(-1)
    if top_p < 1.0:
        z = logits / temperature  # [n, V]
        nucleus = nucleus_candidates(z, top_p)
        if bool(nucleus.wide.any()):  # some nucleus may be wider than the candidates: sort everything
            values, ids = z.sort(dim=-1, descending=True)  # [n, V]
            return ids, top_p_cut(values, nucleus.log_total, 0.0, top_p).softmax(-1)
        return nucleus.ids, nucleus.cut(top_p).softmax(-1)
    ids = torch.arange(vocab, device=logits.device).expand(logits.shape[0], vocab)  # [n, V]
    return ids, torch.softmax(logits / temperature, dim=-1)


def top_p_cut(values: torch.Tensor, log_total: torch.Tensor, outside, top_p: float) -> torch.Tensor:
    """transformers' top-p rule on candidates `values` `[n, m]` (descending, -inf padded) of a
    distribution with log-normaliser `log_total` `[n, 1]` whose other tokens hold `outside` (`[n, 1]`
    or 0): a token is cut when the ascending cumulative probability up to it is <= 1 - top_p; the
    most likely always stays. Returns the values with the cut ones at -inf `[n, m]`."""
    if top_p >= 1.0:
        return values
    ascending = values.flip(-1)  # [n, m]
    mass = outside + (ascending - log_total).exp().cumsum(-1)  # [n, m]
    cut = mass <= 1.0 - top_p  # [n, m]
    cut[:, -1] = False  # the most likely token always stays
    return values.masked_fill(cut.flip(-1), float("-inf"))  # [n, m]


NUCLEUS_CANDIDATES = 64  # the most likely tokens looked at first for a top-p nucleus


@dataclass
class NucleusCandidates:
    """The `width` most likely tokens of each row of z = logits / T, for top-p without top-k.

    values, ids `[n, w]` descending; log_total `[n, 1]` the log-normaliser over the whole vocabulary;
    outside `[n, 1]` the probability of every other token; wide `[n]` True where the candidates hold
    less than top_p, so that the nucleus may reach beyond them. In the other rows the nucleus (the
    smallest set of most likely tokens whose mass reaches top_p) lies among the candidates, and
    `cut(top_p)` applies transformers' rule exactly, without sorting the vocabulary (on a CPU, sorting
    Qwen's V = 151,936 logits costs more than the 0.5B model's decoding step; benchmarks/README.md,
    "Sampling among the candidates")."""

    values: torch.Tensor
    ids: torch.Tensor
    log_total: torch.Tensor
    outside: torch.Tensor
    wide: torch.Tensor

    def cut(self, top_p: float) -> torch.Tensor:
        return top_p_cut(self.values, self.log_total, self.outside, top_p)  # [n, w]


def nucleus_candidates(z: torch.Tensor, top_p: float, width: int | None = None) -> NucleusCandidates:
    """`z` `[n, V]` fp32; `width` defaults to NUCLEUS_CANDIDATES (capped at V)."""
    width = min(NUCLEUS_CANDIDATES if width is None else width, z.shape[-1])
    log_total = torch.logsumexp(z, dim=-1, keepdim=True)  # [n, 1]
    values, ids = z.topk(width, dim=-1)  # [n, w] descending
    held = (values - log_total).exp().sum(-1, keepdim=True)  # [n, 1]
    outside = (1.0 - held).clamp_min(0.0)  # [n, 1]
    return NucleusCandidates(values, ids, log_total, outside, wide=held[:, 0] < top_p)


def _gap_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor | None,
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(teacher log p(token) `[n]` or None, expected gap b `[n]`) for logits `[n, V]`, with log-probs
    taken as logit - logsumexp so that no `[n, V]` log-softmax is kept."""
    ids, q = sampler_distribution(student_logits, temperature, top_k, top_p)  # [n, m] each
    s = student_logits.float()  # [n, V]
    s_gap = s.gather(-1, ids) - torch.logsumexp(s, dim=-1, keepdim=True)  # [n, m]  log p_S
    del s
    t = teacher_logits.float()  # [n, V]
    lse_t = torch.logsumexp(t, dim=-1, keepdim=True)  # [n, 1]
    gap = t.gather(-1, ids) - lse_t - s_gap  # [n, m]  log p_T - log p_S
    token_logp = None if tokens is None else (t.gather(-1, tokens[:, None]) - lse_t).squeeze(1)  # [n]
    return token_logp, torch.where(q > 0, q * gap, 0.0).sum(-1)  # [n], [n]


def expected_gap(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """b = sum_v q(v) (log p_T(v) - log p_S(v)) per position: logits `[n, V]` -> `[n]` fp32.

    q is the sampler's distribution on the student's logits (`sampler_distribution`); p_S and p_T are
    the plain softmaxes the gaps Delta_t are computed with, so b is the expectation of Delta_t over the
    token the sampler draws. Temperature 1 without truncation gives b = -KL(p_S || p_T).
    """
    return _gap_terms(student_logits, teacher_logits, None, temperature, top_k, top_p)[1]


def _sampled_and_expected(parts, teacher_hidden, student_hidden, tokens, sampler, teacher_context):
    """Teacher log p(token) and the expected gap b for hidden states `[n, H]` -> `([n], [n])`."""
    with teacher_context() if teacher_context else contextlib.nullcontext():
        teacher_logits = parts.logits(teacher_hidden)  # [n, V]
    student_logits = parts.logits(student_hidden)  # [n, V]
    return _gap_terms(student_logits, teacher_logits, tokens, *sampler)


@torch.no_grad()
def score_teachers_expected(
    model: torch.nn.Module,
    student_prompt_ids: TokenIds,
    teacher_prompt_ids: Sequence[TokenIds],
    completion_ids: TokenIds,
    pad_id: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_rows: int = 4,
    chunk_size: int = 128,
    teacher_context: ContextFactory = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`score_teachers` plus the per-token expected gap of every teacher under the rollout sampler.

    Besides each teacher's log-prob of the sampled token, returns `baseline [B, K, T]`: at every
    completion position, b_t = sum_v q_t(v) (log p_T(v) - log p_S(v)) with q_t the sampler
    (`temperature`, `top_k`, `top_p`, as the rollouts were drawn) applied to the student's logits, from
    full-vocabulary distributions (`expected_gap`). The student runs once per problem (its prompt,
    no grad, the weights `model` holds); teachers run inside `teacher_context` (if given), `chunk_rows`
    rows per forward, and both heads are applied `chunk_size` positions per row at a time, so at most
    a few `[chunk_rows * chunk_size, V]` fp32 tensors are alive. Returns `(teacher_logp [B, K, T],
    teacher_mask [B, K], baseline [B, K, T])`, all 0 for missing teachers and padding.
    """
    _check_batch(
        completion_ids,
        chunk_size,
        ("student_prompt_ids", student_prompt_ids),
        ("teacher_prompt_ids", teacher_prompt_ids),
    )
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be at least 1, got {chunk_rows}")
    sampler = (temperature, top_k, top_p)
    sampler_distribution(torch.zeros(1, 2), *sampler)  # a bad sampler fails before any forward
    device = _device(model)
    parts = _causal_lm_parts(model)
    rows, width_k, width_t = _teacher_shape(teacher_prompt_ids, completion_ids)
    logp = torch.zeros((rows, width_k, width_t), dtype=torch.float32, device=device)  # [B, K, T]
    baseline = torch.zeros_like(logp)  # [B, K, T]
    teacher_mask = _teacher_mask(teacher_prompt_ids, width_k, device)  # [B, K]
    if width_t == 0 or width_k == 0:
        return logp, teacher_mask, baseline
    packed_s = _pack(student_prompt_ids, completion_ids, pad_id, device)
    student_hidden = _completion_hidden(parts, packed_s)  # [N_s, H]  row-major over problems
    lengths = [len(c) for c in completion_ids]
    offsets = [sum(lengths[:b]) for b in range(rows)]
    context = teacher_context if teacher_context else contextlib.nullcontext
    for pairs, packed in _teacher_chunks(teacher_prompt_ids, completion_ids, chunk_rows, pad_id, device):
        with context():
            teacher_hidden = _completion_hidden(parts, packed)  # [N, H]
        tokens = packed.targets[packed.valid]  # [N]
        aligned = torch.cat(
            [torch.arange(offsets[p], offsets[p] + lengths[p], device=device) for p, _ in pairs]
        )  # [N]  the student's hidden state at each of these positions (same row-major order)
        flat_logp, flat_b = [], []
        for c0, c1 in _chunks(teacher_hidden.shape[0], chunk_size * len(pairs)):
            lp, base = _sampled_and_expected(
                parts, teacher_hidden[c0:c1], student_hidden[aligned[c0:c1]], tokens[c0:c1], sampler,
                teacher_context,
            )  # fmt: skip
            flat_logp.append(lp)
            flat_b.append(base)
        _put_rows(logp, pairs, packed, torch.cat(flat_logp))
        _put_rows(baseline, pairs, packed, torch.cat(flat_b))
    return logp, teacher_mask, baseline


# ---------------------------------------------------------------------------------------------------
# Top-K support variant (Section 4.5).


def _support_logp_for_teachers(
    parts: _CausalLMParts, hidden: torch.Tensor, support: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Student local log-probs for every teacher's support: hidden `[n, H]`, support `[n, K, k]`,
    tokens `[n]` -> `[n, K]`."""
    logits = parts.logits(hidden)  # [n, V]
    per_teacher = [topk_support_logprobs(logits, support[:, k], tokens) for k in range(support.shape[1])]
    return torch.stack(per_teacher, dim=1)  # [n, K]


def _local_terms_for_teachers(
    parts: _CausalLMParts,
    hidden: torch.Tensor,
    support: torch.Tensor,
    gathered: torch.Tensor,
    tokens: torch.Tensor,
) -> torch.Tensor:
    """Student local log-prob, teacher local log-prob and local KL per teacher (the official top-K
    gate): hidden `[n, H]`, support `[n, K, k]`, teacher logits at the local support `[n, K, k+1]`,
    tokens `[n]` -> `[n, K, 3]`."""
    logits = parts.logits(hidden)  # [n, V]
    per_teacher = [
        torch.stack(local_support_terms_from_gathered(logits, gathered[:, j], support[:, j], tokens), dim=-1)
        for j in range(support.shape[1])
    ]  # K x [n, 3]
    return torch.stack(per_teacher, dim=1)  # [n, K, 3]


def score_topk_support(
    model: torch.nn.Module,
    prompt_ids: TokenIds,
    teacher_prompt_ids: Sequence[TokenIds],
    completion_ids: TokenIds,
    pad_id: int,
    k: int = 100,
    chunk_rows: int = 4,
    chunk_size: int = 128,
    teacher_context: ContextFactory = None,
    local_kl: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Sampled-token log-probs renormalised on a local support, per teacher (Section 4.5).

    For teacher j and position t the support is the teacher's top-k tokens ∪ {y_t}; both the teacher's
    and the student's distributions are renormalised on it. Returns `(student_local_logp [B, K, T]
    with grad, teacher_local_logp [B, K, T], teacher_mask [B, K])`, logp 0 for missing teachers and
    padding. `teacher_context` (e.g. `model.disable_adapter`) is entered around the teacher forwards
    only. k larger than the vocabulary means the whole vocabulary.

    With `local_kl=True` (the official top-K gate, `objective.topk_gate=local_kl`) the teacher pass also
    keeps its logits at the k+1 local-support ids, and a fourth tensor is returned: the local forward KL
    KL_S(p_T || p_S) per teacher and position `[B, K, T]` with grad through the student
    (`sgsd.objectives.local_support_terms_from_gathered`).
    """
    _check_batch(
        completion_ids, chunk_size, ("prompt_ids", prompt_ids), ("teacher_prompt_ids", teacher_prompt_ids)
    )
    if k < 1:
        raise ConfigError(f"top-k support size must be at least 1, got {k}")
    device = _device(model)
    parts = _causal_lm_parts(model)
    rows, width_k, width_t = _teacher_shape(teacher_prompt_ids, completion_ids)
    teacher_local = torch.zeros((rows, width_k, width_t), dtype=torch.float32, device=device)  # [B, K, T]
    student_local = torch.zeros((rows, width_k, width_t), dtype=torch.float32, device=device)  # [B, K, T]
    teacher_mask = _teacher_mask(teacher_prompt_ids, width_k, device)  # [B, K]
    if width_t == 0 or width_k == 0:
        return student_local, teacher_local, teacher_mask
    k = min(k, parts.head.weight.shape[0])
    support = torch.zeros((rows, width_k, width_t, k), dtype=torch.long, device=device)  # [B, K, T, k]
    gathered = None  # [B, K, T, k+1] teacher logits at the local support (local_kl only)
    if local_kl:
        gathered = torch.zeros((rows, width_k, width_t, k + 1), dtype=torch.float32, device=device)

    # Teachers (no grad): top-k support and local log-prob per position.
    with torch.no_grad(), teacher_context() if teacher_context else contextlib.nullcontext():
        order = _teacher_rows(teacher_prompt_ids)
        for a, b in _chunks(len(order), chunk_rows):
            pairs = order[a:b]
            packed = _pack([teacher_prompt_ids[p][j] for p, j in pairs], [completion_ids[p] for p, _ in pairs],
                           pad_id, device)  # fmt: skip
            hidden = _completion_hidden(parts, packed)  # [N, H]
            tokens = packed.targets[packed.valid]  # [N]
            row_of = torch.arange(len(pairs), device=device)[:, None].expand_as(packed.valid)[packed.valid]
            pos_of = torch.arange(packed.valid.shape[1], device=device).expand_as(packed.valid)[packed.valid]
            problems = torch.tensor([p for p, _ in pairs], device=device)[row_of]  # [N]
            teachers = torch.tensor([j for _, j in pairs], device=device)[row_of]  # [N]
            for c0, c1 in _chunks(hidden.shape[0], chunk_size * len(pairs)):
                logits = parts.logits(hidden[c0:c1])  # [n, V]
                top = logits.topk(k, dim=1).indices  # [n, k]
                idx = (problems[c0:c1], teachers[c0:c1], pos_of[c0:c1])
                support[idx] = top
                teacher_local[idx] = topk_support_logprobs(logits, top, tokens[c0:c1]).float()
                if gathered is not None:
                    gathered[idx] = logits.gather(-1, local_support_ids(top, tokens[c0:c1])).float()

    # Student (grad): one forward, every teacher's support per position chunk.
    packed = _pack(prompt_ids, completion_ids, pad_id, device)
    hidden = _completion_hidden(parts, packed)  # [N, H]
    tokens = packed.targets[packed.valid]  # [N]
    support_flat = support.permute(0, 2, 1, 3)[packed.valid]  # [N, K, k]
    if gathered is not None:
        gathered_flat = gathered.permute(0, 2, 1, 3)[packed.valid]  # [N, K, k+1]
    pieces = []
    for c0, c1 in _chunks(hidden.shape[0], chunk_size * rows):
        if gathered is None:
            fn, args = _support_logp_for_teachers, (parts, hidden[c0:c1], support_flat[c0:c1], tokens[c0:c1])
        else:
            fn = _local_terms_for_teachers
            args = (parts, hidden[c0:c1], support_flat[c0:c1], gathered_flat[c0:c1], tokens[c0:c1])
        if hidden.requires_grad:
            pieces.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            pieces.append(fn(*args))
    flat = torch.cat(pieces).float()  # [N, K] or [N, K, 3]
    grid = torch.zeros((rows, width_t, *flat.shape[1:]), dtype=torch.float32, device=device)  # [B, T, K(, 3)]
    grid[packed.valid] = flat
    present = teacher_mask[:, :, None]  # [B, K, 1]
    if gathered is None:
        student_local = grid.permute(0, 2, 1) * present  # [B, K, T]
        return student_local, teacher_local, teacher_mask
    terms = grid.permute(0, 2, 1, 3)  # [B, K, T, 3]
    student_local, local_kl_grid = terms[..., 0] * present, terms[..., 2] * present  # [B, K, T]
    return student_local, teacher_local, teacher_mask, local_kl_grid


# ---------------------------------------------------------------------------------------------------
# Full-distribution divergences (OPSD, Fig. 3(c)).


_DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd}


def _divergence_chunk(
    parts: _CausalLMParts,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    kind: str,
    beta: float,
    teacher_context: ContextFactory,
    divergence_fn: Callable | None = None,
) -> torch.Tensor:
    """Per-position divergence for student/teacher hidden states `[n, H]` -> `[n]`."""
    divergence = _DIVERGENCES[kind]
    student_logits = parts.logits(student_hidden)  # [n, V]
    with torch.no_grad(), teacher_context() if teacher_context else contextlib.nullcontext():
        teacher_logits = parts.logits(teacher_hidden)  # [n, V]
    if divergence_fn is not None:
        return divergence_fn(student_logits, teacher_logits)  # [n]
    if kind == "jsd":
        return divergence(student_logits, teacher_logits, beta=beta)  # [n]
    return divergence(student_logits, teacher_logits)  # [n]


def score_divergence(
    model: torch.nn.Module,
    student_prompt_ids: TokenIds,
    teacher_prompt_ids: TokenIds,
    completion_ids: TokenIds,
    pad_id: int,
    kind: str,
    beta: float = 0.5,
    chunk_size: int = 128,
    chunk_rows: int = 4,
    teacher_context: ContextFactory = None,
    divergence_fn: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary divergence between student and one teacher per completion position.

    `kind`: forward_kl = KL(p_T‖p_S), reverse_kl = KL(p_S‖p_T), jsd = generalized JSD(beta) (see
    `sgsd.objectives`). The teacher's hidden states are computed first under no_grad (`chunk_rows`
    rows per forward, inside `teacher_context` if given); then per position chunk, under checkpoint,
    both heads run in fp32 and only one chunk's `[n, V]` logits are alive. `divergence_fn(student_logits,
    teacher_logits) -> [n]`, when given, replaces `kind`'s function (e.g. OPSD's tempered, clamped forward
    KL, `sgsd.objectives.opsd_forward_kl`). Returns `(per_token [B, T]
    fp32 with grad, valid [B, T] bool)`, 0 at padding.
    """
    if kind not in _DIVERGENCES:
        raise ConfigError(f"unknown divergence {kind!r}; expected one of {sorted(_DIVERGENCES)}")
    _check_batch(
        completion_ids,
        chunk_size,
        ("student_prompt_ids", student_prompt_ids),
        ("teacher_prompt_ids", teacher_prompt_ids),
    )
    device = _device(model)
    parts = _causal_lm_parts(model)
    rows, width_t = len(completion_ids), max((len(c) for c in completion_ids), default=0)
    if width_t == 0:
        return _no_positions(rows, device)

    with torch.no_grad(), teacher_context() if teacher_context else contextlib.nullcontext():
        teacher_grid = None  # [B, T, H], filled per row chunk
        for a, b in _chunks(rows, chunk_rows):
            packed = _pack(teacher_prompt_ids[a:b], completion_ids[a:b], pad_id, device)
            hidden = _completion_hidden(parts, packed)  # [N, H]
            if teacher_grid is None:
                teacher_grid = hidden.new_zeros((rows, width_t, hidden.shape[1]))
            teacher_grid[a:b, : packed.valid.shape[1]][packed.valid] = hidden

    packed = _pack(student_prompt_ids, completion_ids, pad_id, device)
    student_hidden = _completion_hidden(parts, packed)  # [N, H]
    teacher_hidden = teacher_grid[packed.valid]  # [N, H]
    pieces = []
    for c0, c1 in _chunks(student_hidden.shape[0], chunk_size * rows):
        args = (
            parts,
            student_hidden[c0:c1],
            teacher_hidden[c0:c1],
            kind,
            beta,
            teacher_context,
            divergence_fn,
        )
        if student_hidden.requires_grad:
            pieces.append(checkpoint(_divergence_chunk, *args, use_reentrant=False))
        else:
            pieces.append(_divergence_chunk(*args))
    per_token = torch.zeros((rows, width_t), dtype=torch.float32, device=device)  # [B, T]
    per_token[packed.valid] = torch.cat(pieces).float()
    return per_token, packed.valid


# ---------------------------------------------------------------------------------------------------
# Token mask m_t (Section 2.4).

_MARKUP_TOKEN = re.compile(r"^<\|.*\|>$|^</?think>$")
_DROP_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _drop_table(tokenizer) -> torch.Tensor:
    """Boolean table over the tokenizer's ids: True where a token never counts in m_t. Cached."""
    try:
        return _DROP_TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    size = len(tokenizer)
    drop = torch.zeros(size, dtype=torch.bool)
    for token_id in tokenizer.all_special_ids:
        drop[token_id] = True
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special or _MARKUP_TOKEN.match(added.content) or added.content.strip() == "":
            drop[token_id] = True
    texts = tokenizer.batch_decode([[i] for i in range(size)], clean_up_tokenization_spaces=False)
    drop |= torch.tensor([text.strip() == "" for text in texts], dtype=torch.bool)
    with contextlib.suppress(TypeError):
        _DROP_TABLES[tokenizer] = drop
    return drop


def completion_token_mask(tokenizer, completion_ids, valid: torch.Tensor) -> torch.Tensor:
    """The token mask m_t of Section 2.4: True at completion tokens that count in the aggregates.

    A token is dropped (False) when:
      1. it is padding (`valid` False);
      2. it is one of the tokenizer's special tokens (`all_special_ids`: pad, bos, eos, ...);
      3. it is an added token that is marked special, looks like a chat-template marker `<|...|>`, or
         is a thinking delimiter `<think>` / `</think>` (added tokens such as these are dropped
         whether or not the tokenizer marks them special);
      4. it decodes to whitespace only ("\\n", "\\n\\n", " ", "\\t", ...) or to nothing;
      5. its id lies outside the tokenizer (a model vocabulary padded past `len(tokenizer)`).
    A thinking delimiter that the tokenizer splits into several ordinary tokens (no single `<think>`
    token) is not dropped: its pieces (`<`, `think`, `>`) are ordinary text elsewhere.

    `completion_ids`: a `[B, T]` tensor or B lists of ids (right-padded to `valid`'s width).
    The table over the vocabulary is built once per tokenizer and cached.
    """
    drop = _drop_table(tokenizer)
    if not torch.is_tensor(completion_ids):
        width_t = valid.shape[1]
        ids = torch.zeros(valid.shape, dtype=torch.long)
        for b, row in enumerate(completion_ids):
            if len(row) > width_t:
                raise DataError(f"completion {b} has {len(row)} tokens but valid has width {width_t}")
            ids[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        completion_ids = ids
    ids = completion_ids.to(drop.device)  # [B, T]
    inside = (ids >= 0) & (ids < drop.shape[0])  # [B, T]
    dropped = drop[ids.clamp(0, drop.shape[0] - 1)] | ~inside  # [B, T]
    return valid & ~dropped.to(valid.device)  # [B, T]


# ---------------------------------------------------------------------------------------------------
# Thinking boundary: teacher prompts that end where the student's prompt ends.


def _generation_suffix(tokenizer, student_enable_thinking: bool, teacher_enable_thinking: bool) -> str:
    """What the student's render has after the assistant header that the teacher's lacks.

    Renders one probe message both ways. The teacher's render must be a prefix of the student's
    (templates differ only at the end, e.g. Qwen3 without thinking appends `<think>\\n\\n</think>\\n\\n`);
    otherwise the boundary cannot be aligned by appending and a ConfigError says so.
    """
    probe = "Probe problem: 1 + 1?"
    student = render_chat(tokenizer, probe, enable_thinking=student_enable_thinking)
    teacher = render_chat(tokenizer, probe, enable_thinking=teacher_enable_thinking)
    if not student.startswith(teacher):
        shared = len(_common_prefix(student, teacher))
        raise ConfigError(
            "cannot align the thinking boundary: the teacher's chat template ends with "
            f"{teacher[shared:]!r} where the student's ends with {student[shared:]!r}; "
            "set teachers.align_think_block=false to score with the teacher's own template"
        )
    return student[len(teacher) :]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def teacher_prompt_ids(
    tokenizer,
    teacher_texts: Sequence,
    student_enable_thinking: bool = False,
    teacher_enable_thinking: bool = True,
    align_think_block: bool = True,
) -> list[list[int]]:
    """Token ids of teacher prompts, rendered with `sgsd.prompts.render_chat` (thinking as given).

    The student generates after its own template's assistant header; with Qwen3-style templates and
    thinking off that header is followed by an empty think block `<think>\\n\\n</think>\\n\\n`, so the
    student's first completion token is an answer token. A thinking teacher's template ends at
    `<|im_start|>assistant\\n` and expects `<think>` next, so it would score the student's first tokens
    at a boundary it never sees (OPSD#10).

    Decision: with `align_think_block=True` (default) every teacher prompt gets the student template's
    generation suffix appended — whatever the student's render has after the assistant header that the
    teacher's render lacks (the empty think block; nothing for templates that ignore thinking) — so the
    teacher scores each completion token in the same context the student produced it in, and only the
    privileged text differs. With `align_think_block=False` the teacher's own render is used as is (the
    reference implementation's behaviour). Prompts are tokenized without extra special tokens (the
    template adds them), as the student's prompt must be.
    """
    suffix = ""
    if align_think_block:
        suffix = _generation_suffix(tokenizer, student_enable_thinking, teacher_enable_thinking)
    texts = [
        render_chat(tokenizer, text, enable_thinking=teacher_enable_thinking) + suffix
        for text in teacher_texts
    ]
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
