"""Generators: one small interface over transformers, vLLM, OpenAI-compatible endpoints and scripts.

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
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


class HFGenerator:
    """Batched sampling with transformers `generate` (left padding, no grad, eval mode).

    Rows (conversation x sample) are generated `batch_size` at a time. With a seed, each batch
    draws from a forked RNG seeded with `seed + batch index`, so the same seed, inputs and
    batch size give the same completions and the global RNG is left untouched.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def prompt_ids(self, conversation: Conversation, enable_thinking: bool = False) -> list[int]:
        text = render_chat(self.tokenizer, conversation, enable_thinking=enable_thinking)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, enable_thinking: bool = False
    ) -> list[list[Completion]]:
        import torch

        prompts = [self.prompt_ids(c, enable_thinking) for c in conversations]
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]  # conversation index per row
        eos_ids = eos_token_ids(self.model, self.tokenizer)
        results: list[list[Completion]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for batch_index, start in enumerate(range(0, len(rows), self.batch_size)):
                batch_rows = rows[start : start + self.batch_size]
                seed = None if params.seed is None else params.seed + batch_index
                with torch.no_grad():
                    new_tokens = self._generate_batch([prompts[i] for i in batch_rows], params, eos_ids, seed)
                for conv_index, tokens in zip(batch_rows, new_tokens, strict=True):
                    results[conv_index].append(self._completion(prompts[conv_index], tokens, eos_ids, params))
        finally:
            self.model.train(was_training)
        return results

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, eos_ids, seed):
        """Left-pad `prompts`, sample, and return each row's generated ids (may include padding)."""
        import torch
        from transformers import GenerationConfig

        from sgsd.models import adapters_in_base_precision

        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_ids[0]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [R, P]
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [R, P]
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        greedy = params.temperature == 0
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
            min_p=0.0 if getattr(self.model.generation_config, "min_p", None) is not None else None,
        )
        devices = [device.index or 0] if device.type == "cuda" else []
        # adapters in the base precision, as sgsd.scoring runs them: rollouts are sampled with the
        # same numerics their log-probs are scored with
        with (
            torch.random.fork_rng(devices=devices, enabled=seed is not None),
            adapters_in_base_precision(self.model),
        ):
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )  # [R, P + T]
        return output[:, width:].tolist()

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

        prompts = [
            self.tokenizer(render_chat(self.tokenizer, c, enable_thinking), add_special_tokens=False)[
                "input_ids"
            ]
            for c in conversations
        ]
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
    """Build a generator: "hf" (model, tokenizer, batch_size), "vllm" (model_path, tokenizer, ...),
    "openai" (model, base_url, api_key) or "scripted" (responses)."""
    backends = {
        "hf": HFGenerator,
        "vllm": VLLMGenerator,
        "openai": OpenAIChatGenerator,
        "scripted": ScriptedGenerator,
    }
    if backend not in backends:
        raise ConfigError(f"unknown generator backend {backend!r}; use one of {', '.join(backends)}")
    return backends[backend](**kwargs)
