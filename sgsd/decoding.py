"""Decoding that drops finished rows: sgsd's own sampling loop over a model and its KV cache.

transformers' `generate` keeps every row of a batch in every forward until the longest row ends;
finished rows are fed padding and still cost a full decoding step each. On a CPU a step's cost is
nearly proportional to its rows, and a batch of reasoning completions of very different lengths
computes about twice the row-steps its samples need (benchmarks/README.md, "Evaluation batch size,
and where an evaluation's time goes"). `decode` removes a row from the batch, its attention mask and
every layer of its KV cache as soon as it emits an end-of-sequence token, so each step costs only
the rows still running.

The loop reproduces what `HFGenerator` asked of `generate`: the prompt's positions from the left
padding (`attention_mask.cumsum - 1`, padding at 0), logits upcast to fp32, and tokens drawn with
temperature, top-k and top-p only (no repetition penalty or other processors); greedy when the
temperature is 0. With the same seed it draws other samples than `generate` (finished rows no longer
consume random numbers), from the same distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sgsd.errors import ConfigError


def forwards_are_collective(model) -> bool:
    """True when every process must run the same forwards (FSDP or DeepSpeed ZeRO-3 over several
    processes): a loop whose length depends on the rows would leave the others waiting, so such a
    model decodes with transformers' `generate`, which keeps the processes in step (`synced_gpus`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() < 2:
        return False
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model))


def token_drawer(
    temperature: float, top_k: int, top_p: float, candidate_sampling: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from fp32 logits `[r, V]` to one drawn token id per row `[r]`.

    Greedy at temperature 0; with top-k or top-p, drawn among candidates (`CandidateSampler`) or,
    with `candidate_sampling=False`, from the sorted-vocabulary distribution
    (`sgsd.scoring.sampler_distribution`, the same one); plain sampling from softmax(logits / T)."""
    from sgsd.generation import CandidateSampler
    from sgsd.scoring import sampler_distribution

    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return lambda logits: logits.argmax(-1)
    if top_k > 0 or top_p < 1.0:
        if candidate_sampling:
            sampler = CandidateSampler(temperature, top_k, top_p)
            return lambda logits: sampler.draw(logits)[:, 0]

        def sorted_draw(logits):
            ids, q = sampler_distribution(logits, temperature, top_k, top_p)  # [r, m] x2
            return ids.gather(1, torch.multinomial(q, 1))[:, 0]

        return sorted_draw
    return lambda logits: torch.multinomial((logits / temperature).softmax(-1), 1)[:, 0]


def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    draw: Callable[[torch.Tensor], torch.Tensor],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample up to `max_new_tokens` after left-padded prompts, dropping rows as they finish.

    `input_ids`, `attention_mask` `[R, P]` on the model's device; `draw` maps fp32 logits `[r, V]` to
    tokens `[r]` (`token_drawer`). `on_step`, if given, is called after every step with the tokens of
    all R rows `[R]` (finished rows show an end-of-sequence id), as a transformers streamer is.
    Returns the generated ids `[R, T]` (T <= max_new_tokens, the longest row's length): each row's
    tokens through its first end-of-sequence id, then `pad_id`."""
    from transformers import DynamicCache

    rows, device = input_ids.shape[0], input_ids.device
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    generated = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [R, N]
    live = torch.arange(rows, device=device)  # [r] the batch row of each running row
    mask = attention_mask.long()  # [r, P + t]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [R, P]
    next_position = mask.sum(-1, keepdim=True)  # [r, 1] the position of each row's next token
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits  # [R, 1, V]
    steps = 0
    for step in range(max_new_tokens):
        token = draw(logits[:, -1, :].float())  # [r]
        generated[live, step] = token
        steps = step + 1
        if on_step is not None:
            everyone = torch.full((rows,), int(eos[0]), dtype=torch.long, device=device)  # [R]
            everyone[live] = token
            on_step(everyone)
        running = ~torch.isin(token, eos)  # [r]
        if step == max_new_tokens - 1 or not bool(running.any()):
            break
        if not bool(running.all()):  # drop the finished rows from the batch and the cache
            keep = running.nonzero()[:, 0]  # [r']
            live, token, mask, next_position = live[keep], token[keep], mask[keep], next_position[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)  # [r, P + t + 1]
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_position,
            cache=cache,
            use_cache=True,
        ).logits  # [r, 1, V]
        next_position = next_position + 1
    return generated[:, :steps]
