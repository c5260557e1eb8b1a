"""A stand-in for the `vllm` package: records how sgsd drives an engine, without a GPU or vLLM.

It checks OUR side of the contract (constructor arguments, token-id prompts, sampling parameters,
LoRA requests and the adapter folders behind them, the conversion of outputs); whether vLLM itself
honours that contract is for the `vllm`-marked tests on a machine that has it.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Call:
    prompts: list
    params: object
    lora: object  # the LoRARequest or None
    adapter: dict = field(default_factory=dict)  # tensors of the adapter folder at call time


class FakeEngine:
    """Answers every prompt with the same reply (token ids and text) n times."""

    def __init__(self, reply_ids: list[int], reply_text: str):
        self.reply_ids, self.reply_text = reply_ids, reply_text
        self.init_kwargs: list[dict] = []
        self.calls: list[Call] = []

    def module(self) -> types.ModuleType:
        engine = self

        class LLM:
            def __init__(self, **kwargs):
                engine.init_kwargs.append(kwargs)

            def generate(self, prompts, sampling_params, lora_request=None):
                adapter = {}
                if lora_request is not None:
                    from safetensors.torch import load_file

                    adapter = load_file(str(Path(lora_request.lora_path) / "adapter_model.safetensors"))
                engine.calls.append(Call(list(prompts), sampling_params, lora_request, adapter))
                sample = types.SimpleNamespace(
                    token_ids=list(engine.reply_ids), text=engine.reply_text, finish_reason="stop"
                )
                return [types.SimpleNamespace(outputs=[sample] * sampling_params.n) for _ in prompts]

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        @dataclass
        class LoRARequest:
            lora_name: str
            lora_int_id: int
            lora_path: str

        vllm = types.ModuleType("vllm")
        vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
        lora = types.ModuleType("vllm.lora")
        request = types.ModuleType("vllm.lora.request")
        request.LoRARequest = LoRARequest
        vllm.lora, lora.request = lora, request
        return vllm

    def install(self, monkeypatch) -> FakeEngine:
        vllm = self.module()
        monkeypatch.setitem(sys.modules, "vllm", vllm)
        monkeypatch.setitem(sys.modules, "vllm.lora", vllm.lora)
        monkeypatch.setitem(sys.modules, "vllm.lora.request", vllm.lora.request)
        return self
