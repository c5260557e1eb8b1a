"""Generators: one small interface over transformers, vLLM (a colocated engine or a separate server),
OpenAI-compatible endpoints and scripts.

    generator = make_generator("hf", model=model, tokenizer=tokenizer)
    params = SamplingParams(temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=1024, n=4, seed=0)
    completions = generator.generate(["What is 12 + 7?"], params)   # [conversation][sample]

A conversation is a list of chat messages ({role, content}) or a plain string (one user
message). Prompts are rendered by `sgsd.prompts.render_chat` and tokenized with
`add_special_tokens=False`, so the generator and the scorer see the same prompt tokens.

`Completion.token_ids` are exactly the sampled tokens: no prompt, no padding, and INCLUDING the
final end-of-sequence token when the model stopped on its own (finish_reason "stop"). The scorer
scores exactly these tokens; its token mask then drops special tokens such as that EOS. With a
stop string, the tokens run up to and including the one that completed the string, and `text`
is cut just before the string (the OpenAI/vLLM convention).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from sgsd.errors import ConfigError, UserError
from sgsd.prompts import render_chat

Conversation = list[dict] | str


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 is greedy; top_k=0 and top_p=1.0 disable those filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is not None:
            object.__setattr__(self, "stop", tuple(self.stop))


def sampling_params(section, n: int = 1, seed: int | None = None) -> SamplingParams:
    """SamplingParams from a config section with temperature, top_p, top_k and max_new_tokens
    (`cfg.rollout` for training rollouts, `cfg.eval` for evaluation)."""
    return SamplingParams(
        temperature=section.temperature,
        top_p=section.top_p,
        top_k=section.top_k,
        max_new_tokens=section.max_new_tokens,
        n=n,
        seed=seed,
    )


@dataclass
class Completion:
    """One sampled completion (see the module docstring for what `token_ids` holds)."""

    prompt_ids: list[int] | None
    token_ids: list[int] | None
    text: str
    finish_reason: Literal["stop", "length"]


class Generator(Protocol):
    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, enable_thinking: bool = False
    ) -> list[list[Completion]]:
        """Sample `params.n` completions per conversation: result[i][j] is sample j of conversation i."""
        ...


def cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stop or ()) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


# ---------------------------------------------------------------------------------------------
# transformers


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and the generation config's eos ids."""
    ids = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in [
        tokenizer.eos_token_id,
        *([configured] if isinstance(configured, int) else configured or []),
    ]:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    if not ids:
        raise ConfigError("the tokenizer and the generation config define no end-of-sequence token")
    return ids


def chat_prompt_ids(tokenizer, conversation: Conversation, enable_thinking: bool = False) -> list[int]:
    """The token ids a generator samples after: the chat template rendered (`sgsd.prompts.render_chat`),
    tokenized without extra special tokens. Every backend tokenizes prompts here, so all sample after
    the same ids."""
    text = render_chat(tokenizer, conversation, enable_thinking=enable_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@contextmanager
def rows_per_batch(generator, batch_size: int) -> Iterator[None]:
    """Inside the block, a generator that batches rows itself (hf: `HFGenerator.batch_size`) generates
    `batch_size` rows at a time; restored afterwards. Others (vllm, a server) schedule their own batches
    and are left as they are. `sgsd.evaluate.evaluate_sources` uses it, so that the trainer's evaluation
    batches by `eval.batch_size`, not the rollouts' `rollout.batch_size`, as `sgsd eval` does."""
    before = getattr(generator, "batch_size", None)
    if before is None:
        yield
        return
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    generator.batch_size = batch_size
    try:
        yield
    finally:
        generator.batch_size = before


class HFGenerator:
    """Batched sampling with transformers `generate` (left padding, no grad, eval mode).

    Rows (conversation x sample) are generated `batch_size` at a time. With a seed, each batch
    draws from a forked RNG seeded with `seed + batch index`, so the same seed, inputs and
    batch size give the same completions and the global RNG is left untouched.

    `merged=True` samples a LoRA policy through a `MergedGenerationCopy` (plain linear layers that
    hold W + (alpha/r)·B·A; no adapter arithmetic per token), built on first use and rebuilt before
    a call whenever the adapter changed since the last one (an optimizer step, a resume);
    `refresh()` rebuilds it at once. A model without LoRA layers has nothing to merge and is
    sampled as is. `progress=True` shows the tokens generated, tokens/s and an ETA on a tqdm bar
    (`GenerationProgress`) when stderr is a terminal.

    `prune_finished=True` (the default) decodes with `sgsd.decoding.decode`, which drops each row
    from the batch and its KV cache once it has ended; False runs transformers' `generate`, which
    keeps finished rows to the end (same distribution, about twice the work on a CPU for completions
    of mixed lengths; benchmarks/README.md, "Dropping finished rows"). Under FSDP or ZeRO-3 over several
    processes, where every process must run the same forwards, `generate` is used either way.
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 32,
        merged: bool = False,
        progress: bool = False,
        candidate_sampling: bool = True,
        prune_finished: bool = True,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # top-k/top-p sampling draws among a few candidates (`CandidateSampler`); False = transformers'
        # own sampling over the whole vocabulary (same distribution, about twice the per-step cost)
        self.candidate_sampling = candidate_sampling
        self.prune_finished = prune_finished
        self.merged = bool(merged) and has_lora_layers(model)
        self.progress = progress
        self._merged_copy: MergedGenerationCopy | None = None

    def generation_model(self):
        """The module that generates: the merged copy (built, or rebuilt if stale) or the model itself."""
        if not self.merged:
            return self.model
        if self._merged_copy is None:
            self._merged_copy = MergedGenerationCopy(self.model)
        else:
            self._merged_copy.refresh_if_stale()
        return self._merged_copy.module

    def refresh(self) -> None:
        """Rebuild the merged copy's weights from the policy now (a no-op without a merged copy)."""
        if self._merged_copy is not None:
            self._merged_copy.refresh()

    def prompt_ids(self, conversation: Conversation, enable_thinking: bool = False) -> list[int]:
        return chat_prompt_ids(self.tokenizer, conversation, enable_thinking)

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, enable_thinking: bool = False
    ) -> list[list[Completion]]:
        import torch
        from tqdm.auto import tqdm

        prompts = [self.prompt_ids(c, enable_thinking) for c in conversations]
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]  # conversation index per row
        eos_ids = eos_token_ids(self.model, self.tokenizer)
        results: list[list[Completion]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(
            total=len(rows) * params.max_new_tokens,
            desc="generate",
            unit="tok",
            leave=False,
            disable=None if self.progress else True,  # None: off when stderr is not a terminal
        )
        progress = None if bar.disable else GenerationProgress(bar, params.max_new_tokens, eos_ids)
        try:
            with torch.no_grad():
                model = self.generation_model()
            for batch_index, start in enumerate(range(0, len(rows), self.batch_size)):
                batch_rows = rows[start : start + self.batch_size]
                seed = None if params.seed is None else params.seed + batch_index
                with torch.no_grad():
                    new_tokens = self._generate_batch(
                        model, [prompts[i] for i in batch_rows], params, eos_ids, seed, progress
                    )
                for conv_index, tokens in zip(batch_rows, new_tokens, strict=True):
                    results[conv_index].append(self._completion(prompts[conv_index], tokens, eos_ids, params))
        finally:
            bar.close()
            self.model.train(was_training)
        return results

    def _generate_batch(
        self, model, prompts: list[list[int]], params: SamplingParams, eos_ids, seed, progress=None
    ):
        """Left-pad `prompts`, sample with `model`, and return each row's generated ids (may include
        padding). `progress` (a `GenerationProgress`) is told every decoding step's tokens."""
        import torch

        from sgsd.decoding import decode, forwards_are_collective, token_drawer
        from sgsd.models import adapters_in_base_precision

        device = next(model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_ids[0]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [R, P]
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [R, P]
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        devices = [device.index or 0] if device.type == "cuda" else []
        # adapters in the base precision, as sgsd.scoring runs them: rollouts are sampled with the
        # same numerics their log-probs are scored with
        with (
            torch.random.fork_rng(devices=devices, enabled=seed is not None),
            adapters_in_base_precision(model),
        ):
            if seed is not None:
                torch.manual_seed(seed)
            if progress is not None:
                progress.start_batch(len(prompts))
            if self.prune_finished and not forwards_are_collective(model):
                output = decode(
                    model,
                    input_ids,
                    attention_mask,
                    token_drawer(params.temperature, params.top_k, params.top_p, self.candidate_sampling),
                    params.max_new_tokens,
                    eos_ids,
                    pad_id,
                    on_step=None if progress is None else progress.put,
                )  # [R, T]
                return output.tolist()
            return self._transformers_generate(
                model, input_ids, attention_mask, params, eos_ids, pad_id, progress
            )

    def _transformers_generate(self, model, input_ids, attention_mask, params, eos_ids, pad_id, progress):
        """The batch (`input_ids`, `attention_mask` `[R, P]` on the model's device) through
        transformers' `generate` (finished rows kept to the end): ids `[R][T]`."""
        from transformers import GenerationConfig, LogitsProcessorList

        greedy = params.temperature == 0
        # with top-k or top-p, a CandidateSampler draws the token and generate() only takes its argmax
        truncated = params.top_k > 0 or params.top_p < 1.0
        candidates = not greedy and truncated and self.candidate_sampling
        processors = [CandidateSampler(params.temperature, params.top_k, params.top_p)] if candidates else []
        greedy = greedy or candidates
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else params.top_k,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            # neutralise sampling knobs a model's own generation_config may carry (e.g. Qwen's
            # repetition_penalty=1.05), so SamplingParams alone decides the distribution
            repetition_penalty=1.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            no_repeat_ngram_size=0,
            min_p=0.0 if getattr(model.generation_config, "min_p", None) is not None else None,
        )
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
            streamer=progress,
        )  # [R, P + T]
        return output[:, input_ids.shape[1] :].tolist()

    def _completion(
        self, prompt: list[int], generated: list[int], eos_ids, params: SamplingParams
    ) -> Completion:
        """Trim a generated row to the sampled tokens: through the first EOS, or the stop string."""
        stop_at = next((k for k, t in enumerate(generated) if t in eos_ids), None)
        tokens = generated[: stop_at + 1] if stop_at is not None else generated[: params.max_new_tokens]
        finish: Literal["stop", "length"] = "stop" if stop_at is not None else "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if params.stop:
            text, hit = cut_at_stop(text, params.stop)
            if hit:
                tokens = tokens[: self._tokens_through_stop(tokens, params.stop)]
                finish = "stop"
        return Completion(prompt_ids=list(prompt), token_ids=tokens, text=text, finish_reason=finish)

    def _tokens_through_stop(self, tokens: list[int], stop: Sequence[str]) -> int:
        """The fewest leading tokens whose decoded text contains a stop string (binary search)."""
        low, high = 1, len(tokens)
        while low < high:
            mid = (low + high) // 2
            if cut_at_stop(self.tokenizer.decode(tokens[:mid], skip_special_tokens=True), stop)[1]:
                high = mid
            else:
                low = mid + 1
        return low


class CandidateSampler:
    """One step of top-k and/or top-p sampling, drawn among a few candidates instead of the vocabulary.

    transformers samples top-k by masking the other V - k logits, sorting the whole vocabulary for
    top-p and drawing from a softmax over V: with Qwen's V = 151,936 that costs about as much per step
    as the 0.5B model's own decoding step on a CPU (benchmarks/README.md, "Sampling among the
    candidates"). Here the same distribution is drawn over m candidates with the global torch
    generator: with top-k the k most likely (ties with the k-th kept;
    `sgsd.scoring.sampler_distribution`), then top-p among them; with top-p alone the 64 most likely
    (`sgsd.scoring.nucleus_candidates`), and only the rows whose nucleus may be wider than that are
    drawn over the sorted vocabulary. `draw(scores)` returns the tokens (used by `sgsd.decoding`);
    called as the logits processor of a greedy `generate()`, it returns logits that are -inf except
    at the drawn token, whose argmax is the sample. Plain sampling (neither top-k nor top-p) is not
    its job."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        if temperature <= 0 or top_k < 0 or not (top_k >= 1 or 0 < top_p < 1):
            raise ConfigError("CandidateSampler needs temperature > 0 and top_k >= 1 or 0 < top_p < 1")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids, scores):
        import torch

        token = self.draw(scores)  # [R, 1]
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)  # [R, V]

    def draw(self, scores):
        """One token per row `[R, 1]` drawn from logits `scores` `[R, V]`."""
        import torch

        from sgsd.scoring import nucleus_candidates, sampler_distribution

        if self.top_k:
            ids, q = sampler_distribution(scores, self.temperature, self.top_k, self.top_p)  # [R, m], [R, m]
            token = ids.gather(1, torch.multinomial(q, 1))  # [R, 1]
        else:
            nucleus = nucleus_candidates(scores.float() / self.temperature, self.top_p)
            token = nucleus.ids.gather(1, torch.multinomial(nucleus.cut(self.top_p).softmax(-1), 1))  # [R, 1]
            if bool(nucleus.wide.any()):  # nuclei that may reach beyond the candidates: drawn again
                ids, q = sampler_distribution(
                    scores[nucleus.wide], self.temperature, 0, self.top_p
                )  # [w, V] x2
                token[nucleus.wide] = ids.gather(1, torch.multinomial(q, 1))
        return token


class GenerationProgress:
    """Tokens generated, tokens/s and an ETA on a tqdm bar, advanced at every decoding step.

    A transformers streamer (`generate(..., streamer=...)` calls `put` with the prompt once, then with
    each step's `[rows]` new token ids, on the CPU). The bar counts tokens: its total starts at rows x
    max_new_tokens, an upper bound, and drops by a row's unused budget as soon as the row emits an
    end-of-sequence token, so `n` is the tokens generated so far, the rate is real tokens/s and the
    ETA an upper bound that tightens as rows finish. Call `start_batch(rows)` before each batch.
    """

    def __init__(self, bar, max_new_tokens: int, eos_ids: Sequence[int]):
        import torch

        self.bar = bar
        self.max_new_tokens = max_new_tokens
        self.eos_ids = torch.tensor(list(eos_ids), dtype=torch.long)
        self.generated = 0  # tokens generated over all batches
        self._finished = torch.zeros(0, dtype=torch.bool)  # [R] rows that emitted an EOS
        self._steps = 0  # decoding steps of the current batch

    def start_batch(self, rows: int) -> None:
        import torch

        self._finished = torch.zeros(rows, dtype=torch.bool)  # [R]
        self._steps = 0

    def put(self, value) -> None:
        import torch

        if value.dim() > 1:  # the prompt ids [R, P], sent once before decoding
            return
        live = ~self._finished  # [R] rows that produced a real token this step
        self._steps += 1
        self._finished |= torch.isin(value, self.eos_ids)
        new_tokens = int(live.sum())
        ended = int((self._finished & live).sum())
        self.generated += new_tokens
        if ended:  # their remaining budget will never be generated
            self.bar.total -= ended * (self.max_new_tokens - self._steps)
        self.bar.update(new_tokens)

    def end(self) -> None:
        pass


def has_lora_layers(model) -> bool:
    """True when `model` contains peft LoRA layers (a LoRA policy, trainable or loaded for evaluation)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


class MergedGenerationCopy:
    """A generation-only copy of a LoRA policy whose adapted linear layers hold W + (alpha/r)·B·A.

        copy = MergedGenerationCopy(policy)      # policy: a peft model (LoRA on linear layers)
        copy.module.generate(...)                # plain linear layers: no adapter work per token
        optimizer.step(); copy.refresh()         # or refresh_if_stale() before each use

    Only the weights of the LoRA-wrapped linear layers are new tensors (`extra_bytes`: one more copy
    of the targeted weights in their dtype). Everything else in `module` (embeddings, norms, the
    head, rotary tables, biases, the config and generation config) is the policy's own tensor or
    object, shared, not copied; `module` has its own module objects, so replacing its layers leaves
    the policy untouched. Each merged weight is rebuilt from the policy's untouched base weight and
    the adapters the policy currently applies (its active adapters; none while adapters are
    disabled), summed in fp32 and rounded once to the base dtype. The training weights are never
    merged into and unmerged from, which in bf16 would drift a little every step.

    `refresh_if_stale()` rebuilds when anything the merged weights depend on changed: the active
    adapters, their scaling, or a tensor's storage or version counter (every in-place update, e.g.
    an optimizer step or `load_state_dict`, bumps it; writes through `.data` do not).
    """

    def __init__(self, model):
        import copy

        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        shared = {id(t): t for t in itertools.chain(root.parameters(), root.buffers())}
        for attr in ("config", "generation_config"):
            if getattr(root, attr, None) is not None:
                shared[id(getattr(root, attr))] = getattr(root, attr)
        module = copy.deepcopy(root, shared)  # new module objects; every tensor in `shared` is reused
        self._layers: list[tuple] = []  # (the policy's LoRA layer, the copy's merged weight)
        for name, layer in root.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if not isinstance(layer, LoraLinear):
                raise ConfigError(
                    f"merged generation supports LoRA on linear layers only; {name} is a {type(layer).__name__}"
                )
            plain = module.get_submodule(name).get_base_layer()  # the copy's own base-layer object
            base_weight = layer.get_base_layer().weight
            merged = _frozen_like(base_weight)
            plain.weight = merged  # replaces the shared weight in the copy only
            module.set_submodule(name, plain)
            self._layers.append((layer, merged))
        if not self._layers:
            raise ConfigError("the model has no LoRA layers: there is nothing to merge")
        module.eval()
        self.module = module
        self._state: tuple | None = None
        self.refresh()

    @property
    def extra_bytes(self) -> int:
        """Memory the copy adds: its merged weights (the shared tensors cost nothing)."""
        return sum(merged.numel() * merged.element_size() for _, merged in self._layers)

    @staticmethod
    def _applied(layer) -> list[str]:
        """The adapters `layer`'s own forward would add, checked to be plain LoRA."""
        if layer.merged:
            raise ConfigError(
                "the policy's adapters are merged into its weights; merged generation needs them apart"
            )
        names = [] if layer.disable_adapters else [a for a in layer.active_adapters if a in layer.lora_A]
        for name in names:
            if name in layer.lora_variant or layer.lora_bias.get(name, False):
                raise ConfigError(
                    f"merged generation supports plain LoRA only; adapter {name!r} is a variant"
                )
        return names

    def _dependencies(self) -> tuple:
        """Everything the merged weights are computed from, as a comparable key."""
        key = []
        for layer, _ in self._layers:
            names = self._applied(layer)
            tensors = [layer.get_base_layer().weight]
            for name in names:
                tensors += [layer.lora_A[name].weight, layer.lora_B[name].weight]
            key.append(
                (
                    tuple(names),
                    tuple(layer.scaling[name] for name in names),
                    tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors),
                )
            )
        return tuple(key)

    def refresh(self) -> None:
        """Rebuild every merged weight: W + sum over applied adapters of scaling · B·A."""
        import torch

        from sgsd.hostmem import release_freed_memory

        with torch.no_grad():
            for layer, merged in self._layers:
                base = layer.get_base_layer().weight  # [out, in] ([in, out] with fan_in_fan_out)
                if (merged.shape, merged.dtype, merged.device) != (base.shape, base.dtype, base.device):
                    merged.data = torch.empty_like(base)  # the policy moved or changed dtype
                total = base.to(torch.float32, copy=True)  # the same layout as base
                for name in self._applied(layer):
                    a = layer.lora_A[name].weight.float()  # [r, in]
                    b = layer.lora_B[name].weight.float()  # [out, r]
                    scaling = layer.scaling[name]
                    if layer.fan_in_fan_out:
                        total.addmm_(a.T, b.T, alpha=scaling)  # (B·A)^T: [in, out]
                    else:
                        total.addmm_(b, a, alpha=scaling)  # B·A: [out, in]
                merged.copy_(total)
        release_freed_memory()  # the fp32 sums (up to [intermediate, hidden] each) would stay resident
        self._state = self._dependencies()

    def refresh_if_stale(self) -> bool:
        """Rebuild if the policy's adapters changed since the last build; True when it rebuilt."""
        if self._dependencies() == self._state:
            return False
        self.refresh()
        return True


def _frozen_like(weight):
    import torch

    return torch.nn.Parameter(torch.empty_like(weight), requires_grad=False)


# ---------------------------------------------------------------------------------------------
# vLLM (optional extra; GPU)


class VLLMGenerator:
    """Sampling with a colocated `vllm.LLM` that serves the base model plus the current LoRA adapter.

    Weight sync is by adapter folder: call `sync_adapter(path)` after saving the trainable adapter
    (`sgsd.models.save_adapter`; the trainer does it after every optimizer step); each call registers
    a new LoRA id so vLLM does not reuse a cached adapter. Without an adapter (or after
    `sync_adapter(None)`) the base model is sampled.

    Tested here only against a stand-in `vllm` module that records the calls (tests/test_generation.py,
    tests/test_trainer.py): the arguments, the token-id prompts, the adapter folders and the outputs'
    conversion. A real engine has not run in this repository's checks: vLLM is not installed on the
    CPU machines nor on the lent GPU machine (tests marked `vllm` run where it is).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer,
        max_lora_rank: int = 64,
        gpu_memory_utilization: float = 0.4,
        dtype: str = "auto",
        max_model_len: int | None = None,
    ):
        try:
            import vllm
        except ImportError as exc:
            raise UserError("the vllm backend needs vLLM: pip install -e '.[vllm]' (GPU machines)") from exc
        kwargs = {"max_model_len": max_model_len} if max_model_len else {}
        self.llm = vllm.LLM(
            model=model_path,
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            **kwargs,
        )
        self.tokenizer = tokenizer
        self._lora_request = None
        self._lora_ids = itertools.count(1)

    def sync_adapter(self, adapter_path: str | os.PathLike | None) -> None:
        """Sample from now on with the LoRA adapter saved at `adapter_path` (None: the base model)."""
        from vllm.lora.request import LoRARequest

        if adapter_path is None:
            self._lora_request = None
            return
        lora_id = next(self._lora_ids)
        self._lora_request = LoRARequest(f"policy-{lora_id}", lora_id, str(adapter_path))

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, enable_thinking: bool = False
    ) -> list[list[Completion]]:
        import vllm

        prompts = [chat_prompt_ids(self.tokenizer, c, enable_thinking) for c in conversations]
        vllm_params = vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            stop=list(params.stop) if params.stop else None,
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], vllm_params, lora_request=self._lora_request
        )
        return [
            [
                Completion(
                    prompt_ids=list(ids),
                    token_ids=list(sample.token_ids),
                    text=sample.text,
                    finish_reason="length" if sample.finish_reason == "length" else "stop",
                )
                for sample in out.outputs
            ]
            for ids, out in zip(prompts, outputs, strict=True)
        ]


# ---------------------------------------------------------------------------------------------
# vLLM as a separate server (`vllm serve MODEL --enable-lora`)


class VLLMServerError(UserError):
    """The vLLM server answered a request with an HTTP error (`status`, the server's `message`)."""

    def __init__(self, text: str, status: int, message: str):
        super().__init__(text)
        self.status, self.message = status, message


class VLLMServerGenerator:
    """Sampling from a separately started vLLM OpenAI-compatible server that serves the base model and
    loads the policy's LoRA adapter at runtime.

        generator = VLLMServerGenerator("http://gpu-host:8000", tokenizer)
        generator.check()                                   # GET /v1/models: reachable, base model name
        generator.load_adapter("sgsd-ab12-step-3", "/shared/run/rollout-adapter")
        completions = generator.generate(conversations, params)

    `load_adapter` posts the folder to `/v1/load_lora_adapter` (the server reads it from ITS filesystem,
    so the path must be visible there; it is sent absolute), unloads the adapter this generator loaded
    before (`/v1/unload_lora_adapter`), and samples with the new name from then on; `use_adapter(name)`
    samples with an adapter another process loaded; `use_base()` with the base model. The server must run
    with `--enable-lora --max-lora-rank R` (R >= the adapter's rank) and the environment variable
    `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, which enables the two endpoints.

    Prompts are rendered and tokenized here exactly as the hf backend does and sent as token ids to
    `/v1/completions` with `return_token_ids` (vLLM >= 0.10.2), so `Completion.token_ids` are the ids
    the server sampled, the final end-of-sequence token included. `VLLM_API_KEY` in the environment is
    sent as a bearer token (the key of `vllm serve --api-key`). Every failure (unreachable server, HTTP
    error, timeout, malformed answer) is a `UserError` naming the URL and what went wrong.
    """

    def __init__(self, base_url: str, tokenizer, timeout_s: float = 3600.0, api_key: str | None = None):
        url = base_url.rstrip("/")
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url  # routes below carry /v1
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.api_key = api_key or os.environ.get("VLLM_API_KEY")
        self.model: str | None = None  # the name sampled with: an adapter, or None for the base model
        self.loaded: str | None = None  # the adapter this generator loaded (and will unload)
        self._base_model: str | None = None

    # -- adapters

    def check(self) -> str:
        """Ask the server for its models (fails early when it is unreachable); returns the base model's name."""
        data = self._json("GET", "/v1/models")
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            raise UserError(
                f"vLLM server {self.base_url}/v1/models: expected a list under 'data', got {data!r:.200}"
            )
        base = [c["id"] for c in cards if isinstance(c, dict) and "id" in c and not c.get("parent")]
        if not base:
            raise UserError(f"vLLM server {self.base_url}/v1/models lists no base model: {cards!r:.200}")
        self._base_model = base[0]
        return self._base_model

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load the adapter folder `path` under `name`, unload the previous one, and sample with `name`."""
        body = {"lora_name": name, "lora_path": str(Path(path).resolve())}
        try:
            self._send("POST", "/v1/load_lora_adapter", body)
        except VLLMServerError as exc:
            if exc.status != 400 or "already" not in exc.message:
                raise
            # a name left loaded by an interrupted run (resume): replace it with this folder
            self._send("POST", "/v1/unload_lora_adapter", {"lora_name": name})
            self._send("POST", "/v1/load_lora_adapter", body)
        previous, self.loaded, self.model = self.loaded, name, name
        if previous is not None and previous != name:
            self._unload(previous)

    def use_adapter(self, name: str) -> None:
        """Sample with an adapter that another process loaded into the server under `name`."""
        self.model = name

    def use_base(self) -> None:
        """Sample with the base model (the server's model without an adapter)."""
        self.model = None

    def unload(self) -> None:
        """Unload the adapter this generator loaded, if any (the end of a run)."""
        if self.loaded is not None:
            name, self.loaded = self.loaded, None
            if self.model == name:
                self.model = None
            self._unload(name)

    def _unload(self, name: str) -> None:
        try:
            self._send("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except VLLMServerError as exc:
            if exc.status != 404:  # 404: already gone (e.g. the server restarted), nothing to free
                raise

    # -- sampling

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, enable_thinking: bool = False
    ) -> list[list[Completion]]:
        prompts = [chat_prompt_ids(self.tokenizer, c, enable_thinking) for c in conversations]
        if not prompts:
            return []
        model = self.model if self.model is not None else (self._base_model or self.check())
        body = {
            "model": model,
            "prompt": prompts,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "max_tokens": params.max_new_tokens,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        data = self._json("POST", "/v1/completions", body)
        choices = data.get("choices") if isinstance(data, dict) else None
        where = f"vLLM server {self.base_url}/v1/completions"
        if not isinstance(choices, list) or len(choices) != len(prompts) * params.n:
            got = len(choices) if isinstance(choices, list) else repr(choices)[:200]
            raise UserError(f"{where}: expected {len(prompts) * params.n} choices, got {got}")
        # vLLM numbers the choices prompt by prompt: index = prompt * n + sample
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        completions = [self._completion(c, prompts[k // params.n], where) for k, c in enumerate(choices)]
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @staticmethod
    def _completion(choice, prompt_ids: list[int], where: str) -> Completion:
        if not isinstance(choice, dict):
            raise UserError(f"{where}: a choice is not an object: {choice!r:.200}")
        ids, text, finish = choice.get("token_ids"), choice.get("text"), choice.get("finish_reason")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise UserError(
                f"{where}: a choice has no token_ids list ({ids!r:.100}); the server must honour "
                "return_token_ids (vLLM >= 0.10.2)"
            )
        if not isinstance(text, str):
            raise UserError(f"{where}: a choice has no text: {choice!r:.200}")
        if finish not in ("stop", "length"):
            raise UserError(f"{where}: a choice finished with {finish!r}, not 'stop' or 'length'")
        return Completion(prompt_ids=list(prompt_ids), token_ids=ids, text=text, finish_reason=finish)

    # -- HTTP

    def _json(self, method: str, route: str, body: dict | None = None):
        raw = self._send(method, route, body)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise UserError(
                f"vLLM server {self.base_url}{route} returned malformed JSON ({exc}): {raw[:200]!r}"
            ) from exc

    def _send(self, method: str, route: str, body: dict | None = None) -> bytes:
        """One request; the answer's body, or a UserError naming the URL and the problem."""
        import urllib.error
        import urllib.request

        url = self.base_url + route
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            message = _server_message(exc.read())
            hint = ""
            if exc.code == 404 and "lora_adapter" in route:
                hint = (
                    " (runtime LoRA loading is off: start the server with --enable-lora and the "
                    "environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
                )
            raise VLLMServerError(
                f"vLLM server {url} answered HTTP {exc.code}: {message}{hint}", exc.code, message
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
                raise UserError(
                    f"vLLM server {url} did not answer within {self.timeout_s:g} s "
                    "(rollout.vllm_server_timeout_s)"
                ) from exc
            raise UserError(
                f"cannot reach the vLLM server at {url}: {reason} (is `vllm serve` running?)"
            ) from exc


def _server_message(raw: bytes) -> str:
    """The message of an error answer: vLLM's {"error": {"message"}} or {"message"}, FastAPI's
    {"detail"}, or the start of the body."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:300].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        for value in (error.get("message") if isinstance(error, dict) else error, data.get("message"),
                      data.get("detail")):  # fmt: skip
            if value:
                return str(value)
    return json.dumps(data)[:300]


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible chat endpoints


class OpenAIChatGenerator:
    """Any OpenAI-compatible chat endpoint (e.g. a stronger model for skill extraction).

    Token ids are not available: `prompt_ids` and `token_ids` are None. top_k (when > 0) and
    thinking mode are sent as vLLM-style extra fields (`top_k`, `chat_template_kwargs`), which
    other servers may ignore. If the server returns fewer than `n` choices, it is asked again.
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 2,
    ):
        from openai import OpenAI

        self.model = model
        self.base_url = base_url
        self.client = OpenAI(
            base_url=base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
            timeout=timeout,
            max_retries=max_retries,
        )

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, enable_thinking: bool = False
    ) -> list[list[Completion]]:
        import openai

        extra_body = {}
        if params.top_k > 0:
            extra_body["top_k"] = params.top_k
        if enable_thinking:
            extra_body["chat_template_kwargs"] = {"enable_thinking": True}
        results = []
        for conversation in conversations:
            messages = (
                [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
            )
            samples: list[Completion] = []
            while len(samples) < params.n:
                try:
                    response = self.client.chat.completions.create(
                        model=self.model,
                        messages=messages,
                        n=params.n - len(samples),
                        temperature=params.temperature,
                        top_p=params.top_p,
                        max_tokens=params.max_new_tokens,
                        seed=params.seed,
                        stop=list(params.stop) if params.stop else None,
                        extra_body=extra_body or None,
                    )
                except openai.OpenAIError as exc:
                    raise UserError(f"chat endpoint {self.base_url} failed: {exc}") from exc
                if not response.choices:
                    raise UserError(f"chat endpoint {self.base_url} returned no choices")
                for choice in response.choices:
                    text, _ = cut_at_stop(choice.message.content or "", params.stop)
                    finish = "length" if choice.finish_reason == "length" else "stop"
                    samples.append(
                        Completion(prompt_ids=None, token_ids=None, text=text, finish_reason=finish)
                    )
            results.append(samples[: params.n])
        return results


# ---------------------------------------------------------------------------------------------
# Scripted (tests)


class ScriptedGenerator:
    """Returns fixed texts, for tests: a list consumed in order, or a function
    `respond(conversation, sample_index) -> str`. Every call is recorded in `calls` as
    (conversations, params, enable_thinking). Stop strings are applied to the texts."""

    def __init__(self, responses: Sequence[str] | Callable[[Conversation, int], str]):
        self._respond = responses if callable(responses) else None
        self._queue = None if callable(responses) else list(responses)
        self.calls: list[tuple[list[Conversation], SamplingParams, bool]] = []

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, enable_thinking: bool = False
    ) -> list[list[Completion]]:
        self.calls.append((list(conversations), params, enable_thinking))
        results = []
        for conversation in conversations:
            samples = []
            for j in range(params.n):
                if self._respond is not None:
                    text = self._respond(conversation, j)
                elif self._queue:
                    text = self._queue.pop(0)
                else:
                    raise RuntimeError("ScriptedGenerator ran out of scripted responses")
                text, _ = cut_at_stop(text, params.stop)
                samples.append(Completion(prompt_ids=None, token_ids=None, text=text, finish_reason="stop"))
            results.append(samples)
        return results


# ---------------------------------------------------------------------------------------------


def make_generator(backend: str, **kwargs) -> Generator:
    """Build a generator: "hf" (model, tokenizer, batch_size, merged, progress), "vllm" (model_path, tokenizer, ...),
    "vllm_server" (base_url, tokenizer, timeout_s), "openai" (model, base_url, api_key) or "scripted" (responses)."""
    backends = {
        "hf": HFGenerator,
        "vllm": VLLMGenerator,
        "vllm_server": VLLMServerGenerator,
        "openai": OpenAIChatGenerator,
        "scripted": ScriptedGenerator,
    }
    if backend not in backends:
        raise ConfigError(f"unknown generator backend {backend!r}; use one of {', '.join(backends)}")
    return backends[backend](**kwargs)
