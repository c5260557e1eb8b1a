"""Generators: HF sampling on the tiny model, the OpenAI client against a loopback server,
the scripted generator, and (embedded, slow) real sampling from the embedded Qwen model."""

from __future__ import annotations

import contextlib
import copy as copy_module
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

import sgsd.generation as generation
from sgsd.config import ALL_PROJECTIONS
from sgsd.errors import ConfigError, UserError
from sgsd.generation import (
    GenerationProgress,
    HFGenerator,
    MergedGenerationCopy,
    OpenAIChatGenerator,
    SamplingParams,
    ScriptedGenerator,
    cut_at_stop,
    eos_token_ids,
    make_generator,
)
from sgsd.models import TeacherPolicy, adapters_in_base_precision, apply_lora, load_policy
from sgsd.prompts import render_chat

torch.set_num_threads(2)
PROBLEMS = ["What is 12 + 7?", [{"role": "user", "content": "Simplify 6/8 and explain every step please."}]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_policy(str(tiny_model_dir), dtype="float32", device="cpu")


def _tokens(results):
    return [[c.token_ids for c in samples] for samples in results]


# ---- SamplingParams and helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n": 0}, "n must"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_stop_string_becomes_tuple():
    assert SamplingParams(stop="</answer>").stop == ("</answer>",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("abc</s>def", ["</s>"], ("abc", True)),
        ("x STOP y END", ["END", "STOP"], ("x ", True)),  # the earliest hit wins
        ("nothing here", ["END"], ("nothing here", False)),
        ("text", None, ("text", False)),
    ],
)
def test_cut_at_stop(text, stop, expected):
    assert cut_at_stop(text, stop) == expected


def test_eos_ids_merge_tokenizer_and_generation_config(tiny):
    model, tokenizer = tiny
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
        assert eos_token_ids(model, tokenizer) == [tokenizer.eos_token_id, 7]
    finally:
        model.generation_config.eos_token_id = saved


# ---- HF backend on the tiny model -------------------------------------------------------------


def test_hf_shapes_prompt_ids_and_seed(tiny):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, batch_size=3)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=6, n=2, seed=11)
    results = generator.generate(PROBLEMS, params)
    assert [len(samples) for samples in results] == [2, 2]
    for conversation, samples in zip(PROBLEMS, results, strict=True):
        rendered = render_chat(tokenizer, conversation, enable_thinking=False)
        expected_prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        for completion in samples:
            assert completion.prompt_ids == expected_prompt
            assert completion.finish_reason == "length"  # a random model does not emit EOS in 6 tokens
            assert len(completion.token_ids) == 6
            assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert _tokens(generator.generate(PROBLEMS, params)) == _tokens(results)  # same seed, same samples
    other = generator.generate(PROBLEMS, SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=12))
    assert _tokens(other) != _tokens(results)


def test_hf_restores_train_mode_and_global_rng(tiny):
    model, tokenizer = tiny
    model.train()
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    HFGenerator(model, tokenizer).generate(["hi"], SamplingParams(max_new_tokens=3, seed=1))
    assert torch.equal(torch.rand(1), expected_next)  # seeded sampling forks the RNG
    assert model.training
    model.eval()


def test_hf_left_padding_does_not_change_greedy_output(tiny):
    model, tokenizer = tiny
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    alone = HFGenerator(model, tokenizer, batch_size=1).generate([PROBLEMS[0]], greedy)
    batched = HFGenerator(model, tokenizer, batch_size=2).generate(PROBLEMS, greedy)  # row 0 gets padded
    assert len(batched[1][0].prompt_ids) > len(batched[0][0].prompt_ids)
    assert batched[0][0].token_ids == alone[0][0].token_ids


def test_hf_stops_at_generation_config_eos_and_keeps_it(tiny):
    """Declare the 3rd greedy token an EOS id: generation stops there and token_ids end with it."""
    model, tokenizer = tiny
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    free_run = HFGenerator(model, tokenizer).generate([PROBLEMS[0]], greedy)[0][0].token_ids
    third = free_run[2]
    assume_new = third not in free_run[:2]
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, third]
        stopped = HFGenerator(model, tokenizer).generate([PROBLEMS[0]], greedy)[0][0]
    finally:
        model.generation_config.eos_token_id = saved
    assert assume_new, "the tiny model repeated a token; pick another position"
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run[:3]


def test_hf_stop_string_cuts_text_and_tokens(tiny):
    model, tokenizer = tiny
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    free_run = HFGenerator(model, tokenizer).generate([PROBLEMS[0]], greedy)[0][0]
    piece = tokenizer.decode(free_run.token_ids[3:5], skip_special_tokens=True)  # text of tokens 4-5
    stopped = HFGenerator(model, tokenizer).generate(
        [PROBLEMS[0]], SamplingParams(temperature=0.0, max_new_tokens=8, stop=[piece])
    )[0][0]
    assert stopped.finish_reason == "stop"
    assert piece not in stopped.text and free_run.text.startswith(stopped.text)
    assert piece in tokenizer.decode(stopped.token_ids, skip_special_tokens=True)
    assert piece not in tokenizer.decode(stopped.token_ids[:-1], skip_special_tokens=True)


def _transformers_probabilities(logits, temperature, top_k, top_p):
    """transformers' own sampling distribution over the vocabulary: its warpers, then softmax."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return torch.softmax(LogitsProcessorList(warpers)(ids, logits.clone()), -1)  # [R, V]


@pytest.mark.parametrize(
    "row, top_p",
    [
        # a tie at the 4th largest logit: both kept, as transformers keeps them (top-p off: which of two
        # tied tokens a top-p cut removes depends on the sort's order of equal values)
        ([3.0, 2.5, 2.0, 1.0, 1.0, 0.5, -1.0, -2.0, 0.0, 0.2], 1.0),
        # top-p cuts inside the top-k candidates
        ([0.1, 0.3, 0.2, 4.0, 0.0, 0.4, 0.5, 0.6, 0.7, 3.5], 0.9),
    ],
)
def test_candidate_sampler_draws_transformers_distribution(row, top_p):
    logits = torch.tensor([row])  # [1, V]
    temperature, top_k, draws = 1.1, 4, 20_000
    expected = _transformers_probabilities(logits, temperature, top_k, top_p)[0]  # [V]
    assert int((expected > 0).sum()) == (5 if top_p == 1.0 else 2)  # the tie kept; the top-p cut
    torch.manual_seed(0)
    out = generation.CandidateSampler(temperature, top_k, top_p)(None, logits.expand(draws, -1))  # [draws, V]
    assert torch.equal((out == 0).sum(-1), torch.ones(draws, dtype=torch.long))  # one token per row
    assert torch.isinf(out).sum() == draws * (logits.shape[1] - 1)  # -inf everywhere else
    frequency = torch.bincount(out.argmax(-1), minlength=logits.shape[1]).float() / draws  # [V]
    assert torch.all(frequency[expected == 0] == 0)  # nothing outside the sampler's support
    assert torch.allclose(frequency, expected, atol=0.012)  # 20k draws: standard error <= 0.0036


def test_candidate_sampler_with_top_p_alone_draws_transformers_distribution():
    # at T 0.8 the five most likely hold 0.903 >= 0.9: the nucleus (the evaluation sampler's form)
    logits = torch.tensor([[0.1, 2.0, 0.2, 1.5, -1.0, 1.0, 0.0, 2.2, -0.5, 0.3]])  # [1, V]
    temperature, top_p, draws = 0.8, 0.9, 20_000
    expected = _transformers_probabilities(logits, temperature, 0, top_p)[0]  # [V]
    assert int((expected > 0).sum()) == 5
    torch.manual_seed(0)
    out = generation.CandidateSampler(temperature, 0, top_p)(None, logits.expand(draws, -1))  # [draws, V]
    assert torch.equal((out == 0).sum(-1), torch.ones(draws, dtype=torch.long))  # one token per row
    frequency = torch.bincount(out.argmax(-1), minlength=logits.shape[1]).float() / draws  # [V]
    assert torch.all(frequency[expected == 0] == 0)  # nothing outside the nucleus
    assert torch.allclose(frequency, expected, atol=0.012)  # 20k draws: standard error <= 0.0036


def test_candidate_sampler_refuses_plain_sampling():
    with pytest.raises(ConfigError, match="top_k >= 1 or 0 < top_p < 1"):
        generation.CandidateSampler(1.0, 0, 1.0)


@pytest.mark.parametrize("candidate_sampling", [True, False])
@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (0, 1e-6)])
def test_hf_sampling_down_to_one_candidate_is_greedy(tiny, candidate_sampling, top_k, top_p):
    model, tokenizer = tiny
    greedy = HFGenerator(model, tokenizer).generate(
        PROBLEMS, SamplingParams(temperature=0.0, max_new_tokens=8)
    )
    generator = HFGenerator(model, tokenizer, candidate_sampling=candidate_sampling)
    params = SamplingParams(temperature=1.3, top_k=top_k, top_p=top_p, max_new_tokens=8, seed=4)
    assert _tokens(generator.generate(PROBLEMS, params)) == _tokens(greedy)


def test_hf_overrides_model_sampling_defaults(tiny):
    """A model's own generation_config (top_k, repetition_penalty) must not leak into sampling."""
    model, tokenizer = tiny
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    plain = HFGenerator(model, tokenizer).generate([PROBLEMS[0]], greedy)
    saved = model.generation_config.repetition_penalty
    try:
        model.generation_config.repetition_penalty = 50.0
        again = HFGenerator(model, tokenizer).generate([PROBLEMS[0]], greedy)
    finally:
        model.generation_config.repetition_penalty = saved
    assert _tokens(again) == _tokens(plain)


# ---- merged generation copy (hf backend) ------------------------------------------------------

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _lora_policy(tiny_model_dir, dtype, targets=TARGETS, std=0.3):
    """A fresh tiny policy with rank-4 (alpha 8, scaling 2) LoRA adapters whose lora_B ~ N(0, std^2)."""
    model, tokenizer = load_policy(str(tiny_model_dir), dtype=dtype, device="cpu")
    torch.manual_seed(0)  # lora_A's random init
    model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return model, tokenizer


def _forward(module, ids, context=None):
    with torch.no_grad(), context or contextlib.nullcontext():
        return module(input_ids=ids).logits.float()  # [1, T, V]


def _ids(tokenizer):
    return torch.tensor(
        [tokenizer("What is 12 + 7? Think step by step.", add_special_tokens=False)["input_ids"]]
    )


def test_merged_weight_is_w_plus_scaled_ba_by_hand(tiny_model_dir):
    """One layer with hand-set adapters: rank 4, alpha 8, so scaling = 2; A has a single 1 at [0, 5]
    and B a single 3 at [7, 0], so B·A is 3 at [7, 5] and the merged weight is W + 6 there, W elsewhere."""
    model, _ = _lora_policy(tiny_model_dir, "float32")
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()[0, 5] = 1.0
        layer.lora_B["default"].weight.zero_()[7, 0] = 3.0
    w = layer.base_layer.weight.detach().clone()
    copy = MergedGenerationCopy(model)
    merged = copy.module.model.layers[0].self_attn.q_proj.weight
    expected = w.clone()
    expected[7, 5] += 6.0
    assert layer.scaling["default"] == 2.0
    assert torch.equal(merged, expected)
    assert torch.equal(layer.base_layer.weight, w)  # the training weight is not touched


def test_merged_copy_equals_unmerged_policy_in_fp32_and_shares_the_rest(tiny_model_dir):
    model, tokenizer = _lora_policy(tiny_model_dir, "float32")
    model.eval()
    copy = MergedGenerationCopy(model)
    base = model.get_base_model()
    ids = _ids(tokenizer)
    assert torch.allclose(_forward(copy.module, ids), _forward(model, ids), atol=1e-4)  # fp32 reassociation

    # shared, not copied: embeddings, norms and the head are the policy's own tensors
    assert copy.module.model.embed_tokens.weight is base.model.embed_tokens.weight
    assert copy.module.lm_head.weight is base.lm_head.weight
    assert copy.module.model.norm.weight is base.model.norm.weight
    assert copy.module.model.layers[1].mlp.down_proj.weight is base.model.layers[1].mlp.down_proj.weight
    # the copy's targeted layers are plain linear layers; the policy keeps its LoRA layers
    assert type(copy.module.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert hasattr(base.model.layers[0].self_attn.q_proj, "lora_A")
    # extra memory = the targeted weights once: per layer q 64x64, v 32x64 (2 KV heads x 16), up 128x64;
    # 2 layers, fp32
    assert copy.extra_bytes == 2 * (64 * 64 + 32 * 64 + 128 * 64) * 4

    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    unmerged = HFGenerator(model, tokenizer, batch_size=2).generate(PROBLEMS, greedy)
    merged = HFGenerator(model, tokenizer, batch_size=2, merged=True).generate(PROBLEMS, greedy)
    assert _tokens(merged) == _tokens(unmerged)


def test_merged_copy_bf16_is_as_close_to_exact_as_the_unmerged_policy(tiny_model_dir):
    """In bf16 the merged weights round W + s·B·A once; the unmerged policy keeps W exact and rounds
    B·(A·x). Against the same weights computed in fp32, the merged copy's logits are no further off
    than those of the unmerged forward the generator runs (adapters in the base precision), and its
    greedy choice (the argmax at each of 4 x 48 teacher-forced positions) agrees with the fp32 one as
    often. Free-running greedy sequences are not compared: this random tiny model has near-ties that
    either bf16 path flips now and then, after which the sequences differ."""
    model, tokenizer = _lora_policy(tiny_model_dir, "bfloat16", targets=ALL_PROJECTIONS, std=0.05)
    model.eval()
    exact_model = copy_module.deepcopy(model).float()
    ids = torch.randint(100, 40_000, (4, 48), generator=torch.Generator().manual_seed(0))  # [4, 48]
    exact = _forward(exact_model, ids)  # [4, 48, V]
    unmerged = _forward(model, ids, adapters_in_base_precision(model))
    merged = MergedGenerationCopy(model)
    assert merged.module.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    ours = _forward(merged.module, ids)

    def error(a, b):
        return float((a - b).norm() / b.norm())

    def greedy_agreement(logits):
        return float((logits.argmax(-1) == exact.argmax(-1)).float().mean())

    assert error(unmerged, exact) < 0.05
    assert error(ours, exact) < 1.25 * error(unmerged, exact)  # measured 0.0232 (merged), 0.0222 (unmerged)
    assert greedy_agreement(unmerged) > 0.9
    assert greedy_agreement(ours) >= greedy_agreement(unmerged) - 0.03  # measured 0.948 both


def test_merged_copy_follows_optimizer_steps_and_active_adapters(tiny_model_dir):
    """After an optimizer step the generator rebuilds the copy before sampling (the adapter's version
    counter moved) and samples what the updated policy samples; a call with nothing changed does not
    rebuild; a second (teacher) adapter does not leak in, and disabling the adapters gives the base."""
    model, tokenizer = _lora_policy(tiny_model_dir, "float32")
    TeacherPolicy(model, "ema", ema_decay=0.5)  # adds a second adapter, as the trainer's ema teacher does
    generator = HFGenerator(model, tokenizer, merged=True)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    before = generator.generate(PROBLEMS, greedy)
    copy = generator._merged_copy
    assert not copy.refresh_if_stale()  # nothing changed since the build

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(input_ids=_ids(tokenizer)).logits.float().square().mean().backward()
    optimizer.step()
    weight = copy.module.model.layers[0].self_attn.q_proj.weight.clone()
    after = generator.generate(PROBLEMS, greedy)
    assert not torch.equal(copy.module.model.layers[0].self_attn.q_proj.weight, weight)  # rebuilt
    assert _tokens(after) == _tokens(HFGenerator(model, tokenizer).generate(PROBLEMS, greedy))
    assert _tokens(after) != _tokens(before)
    assert model.training  # the generator restores train mode

    with model.disable_adapter():
        base_only = generator.generate(PROBLEMS, greedy)
    plain_model, _ = load_policy(str(tiny_model_dir), dtype="float32", device="cpu")
    assert _tokens(base_only) == _tokens(HFGenerator(plain_model, tokenizer).generate(PROBLEMS, greedy))
    generator.refresh()  # explicit rebuild: back to the adapter
    assert _tokens(generator.generate(PROBLEMS, greedy)) == _tokens(after)


def test_merged_is_off_without_lora(tiny):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, merged=True)
    assert not generator.merged and generator.generation_model() is model
    generator.refresh()  # nothing to refresh: no error
    with pytest.raises(ConfigError, match="no LoRA layers"):
        MergedGenerationCopy(model)


# ---- progress ---------------------------------------------------------------------------------


class _Bar:
    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, k):
        self.n += k


def test_generation_progress_counts_tokens_and_drops_unused_budget_by_hand():
    """3 rows, 5 new tokens at most, EOS id 9 (also the pad id after a row ends). Step 1: [1, 9, 2]:
    3 tokens, row 1 ends with 4 of its 5 slots unused (total 15 -> 11). Step 2: [3, 9, 9]: 2 tokens
    (row 1 is padding), row 2 ends with 3 unused (total 8). Steps 3-5: row 0 alone, 1 token each:
    8 tokens in all, reaching the total."""
    bar = _Bar(3 * 5)
    progress = GenerationProgress(bar, max_new_tokens=5, eos_ids=[9])
    progress.start_batch(3)
    progress.put(torch.tensor([[4, 4], [4, 4], [4, 4]]))  # the prompt: ignored
    assert (bar.n, bar.total) == (0, 15)
    progress.put(torch.tensor([1, 9, 2]))
    assert (bar.n, bar.total) == (3, 11)
    progress.put(torch.tensor([3, 9, 9]))
    assert (bar.n, bar.total) == (5, 8)
    for _ in range(3):
        progress.put(torch.tensor([7, 9, 9]))
    progress.end()
    assert (bar.n, bar.total, progress.generated) == (8, 8, 8)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_hf_progress_bar_on_a_terminal_counts_the_generated_tokens(tiny, monkeypatch):
    """With progress on and a terminal, the bar ends at exactly the tokens generated (the 3rd greedy
    token of the first prompt is declared an EOS, so that row ends early and gives back its budget)."""
    model, tokenizer = tiny
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    third = HFGenerator(model, tokenizer).generate([PROBLEMS[0]], greedy)[0][0].token_ids[2]
    seen = []

    class Recording(GenerationProgress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(generation, "GenerationProgress", Recording)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, third]
        results = HFGenerator(model, tokenizer, batch_size=2, progress=True).generate(PROBLEMS, greedy)
    finally:
        model.generation_config.eos_token_id = saved
    generated = sum(len(c.token_ids) for samples in results for c in samples)
    assert results[0][0].finish_reason == "stop" and generated < 2 * 8
    assert len(seen) == 1 and seen[0].generated == generated
    assert seen[0].bar.n == seen[0].bar.total == generated
    assert "generate" in terminal.getvalue() and "tok" in terminal.getvalue()

    # quiet: progress off, or on but stderr is not a terminal
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    HFGenerator(model, tokenizer, progress=True).generate([PROBLEMS[0]], greedy)
    monkeypatch.setattr(sys, "stderr", terminal)
    HFGenerator(model, tokenizer, progress=False).generate([PROBLEMS[0]], greedy)
    assert len(seen) == 1


# ---- scripted ---------------------------------------------------------------------------------


def test_scripted_list_and_function():
    generator = make_generator("scripted", responses=["first", "second END tail", "third"])
    out = generator.generate(["a", "b"], SamplingParams(n=1, stop=["END"]))
    assert [[c.text for c in s] for s in out] == [["first"], ["second "]]
    assert generator.calls[0][0] == ["a", "b"]
    assert generator.generate(["c"], SamplingParams())[0][0].text == "third"
    with pytest.raises(RuntimeError, match="ran out"):
        generator.generate(["d"], SamplingParams())
    echo = ScriptedGenerator(lambda conversation, j: f"{conversation}#{j}")
    assert [c.text for c in echo.generate(["q"], SamplingParams(n=3))[0]] == ["q#0", "q#1", "q#2"]


def test_unknown_backend():
    with pytest.raises(ConfigError, match="unknown generator backend"):
        make_generator("tgi")


# ---- OpenAI-compatible endpoint on loopback ---------------------------------------------------


class _ChatHandler(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body})
        if body["model"] == "broken":
            self.send_response(400)
            payload = {"error": {"message": "bad model", "type": "invalid_request_error"}}
        else:
            self.send_response(200)
            # this server honours at most 2 choices per request, so n=3 needs a second request
            count = min(body.get("n", 1), 2)
            last = body["messages"][-1]["content"]
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": f"echo {last} #{i} STOP tail"},
                    "finish_reason": "length" if i == 1 else "stop",
                }
                for i in range(count)
            ]
            payload = {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": choices,
            }
        data = json.dumps(payload).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    _ChatHandler.requests = []
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _ChatHandler.requests
    server.shutdown()
    server.server_close()


def test_openai_generator_against_loopback(chat_server):
    base_url, requests = chat_server
    generator = OpenAIChatGenerator("judge-model", base_url, api_key="k", timeout=10, max_retries=0)
    params = SamplingParams(
        temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=64, n=3, seed=4, stop=["STOP"]
    )
    out = generator.generate(["hello", [{"role": "user", "content": "world"}]], params, enable_thinking=True)
    assert [[c.text for c in s] for s in out] == [
        ["echo hello #0 ", "echo hello #1 ", "echo hello #0 "],
        ["echo world #0 ", "echo world #1 ", "echo world #0 "],
    ]
    assert [c.finish_reason for c in out[0]] == ["stop", "length", "stop"]
    assert all(c.token_ids is None and c.prompt_ids is None for s in out for c in s)
    assert len(requests) == 4  # 2 conversations x (2 choices + 1 more)
    first = requests[0]
    assert first["path"] == "/v1/chat/completions"
    body = first["body"]
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (
        3,
        0.7,
        0.9,
        64,
        4,
    )
    assert body["top_k"] == 20 and body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["stop"] == ["STOP"]
    assert requests[1]["body"]["n"] == 1  # only the missing sample is asked for again


def test_openai_error_is_a_user_error(chat_server):
    base_url, _ = chat_server
    generator = OpenAIChatGenerator("broken", base_url, api_key="k", timeout=10, max_retries=0)
    with pytest.raises(UserError, match="bad model"):
        generator.generate(["x"], SamplingParams())


# ---- vLLM (GPU) -------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.gpu
def test_vllm_generator_samples(tiny_model_dir):
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    generator = make_generator("vllm", model_path=str(tiny_model_dir), tokenizer=tokenizer, max_lora_rank=8)
    out = generator.generate(PROBLEMS, SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=0))
    assert [len(s) for s in out] == [2, 2]
    assert all(len(c.token_ids) <= 6 and c.prompt_ids for s in out for c in s)


# ---- embedded model ---------------------------------------------------------------------------


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_qwen_samples_reproducibly():
    """4 completions for 2 problems from the embedded Qwen2.5-Coder-0.5B on CPU, seeded.

    The first run converts the model into the user cache (about 45 s, ~5.4 GB peak RAM)."""
    pytest.importorskip("gguf")
    model, tokenizer = load_policy("embedded:qwen2.5-coder-0.5b", device="cpu")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_token_ids(model, tokenizer)
    generator = HFGenerator(model, tokenizer, batch_size=8)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, max_new_tokens=24, n=4, seed=0)
    problems = ["What is 12 + 7? Answer with the number only.", "What is 3 * 5? Answer with the number only."]
    first = generator.generate(problems, params)
    assert [len(s) for s in first] == [4, 4]
    assert _tokens(generator.generate(problems, params)) == _tokens(first)
    texts = [c.text for s in first for c in s]
    assert all(c.finish_reason in ("stop", "length") and c.token_ids for s in first for c in s)
    for samples in first:
        for c in samples:
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in eos_token_ids(model, tokenizer)
    assert any("19" in t for t in texts[:4]), texts  # the model can add: at least one sample says 19


def test_vllm_generator_drives_the_engine_with_token_prompts_and_adapters(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Against the stand-in engine (tests/fake_vllm.py): what sgsd sends to vLLM and what it makes of
    the answer. Prompts go as token ids rendered exactly as the hf backend renders them."""
    from fake_vllm import FakeEngine

    from sgsd.models import apply_lora, save_adapter

    model, tokenizer = load_policy(str(tiny_model_dir), dtype="float32", device="cpu")  # LoRA goes on it
    reply = tokenizer("x = 3", add_special_tokens=False)["input_ids"]
    engine = FakeEngine(reply, "x = 3").install(monkeypatch)
    generator = make_generator(
        "vllm", model_path="/models/m", tokenizer=tokenizer, max_lora_rank=8, gpu_memory_utilization=0.3
    )
    assert engine.init_kwargs == [
        {"model": "/models/m", "enable_lora": True, "max_lora_rank": 8, "gpu_memory_utilization": 0.3,
         "dtype": "auto"}
    ]  # fmt: skip
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=5, n=2, seed=3, stop=["Q:"])
    out = generator.generate(PROBLEMS, params, enable_thinking=False)

    call = engine.calls[-1]
    expected = [
        tokenizer(render_chat(tokenizer, p, False), add_special_tokens=False)["input_ids"] for p in PROBLEMS
    ]
    assert call.prompts == [{"prompt_token_ids": ids} for ids in expected]
    assert vars(call.params) == {
        "n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 5, "seed": 3, "stop": ["Q:"]
    }  # fmt: skip
    assert call.lora is None  # no adapter synced: the base model
    assert [len(samples) for samples in out] == [2, 2]
    assert all(
        c.token_ids == reply and c.text == "x = 3" and c.finish_reason == "stop" for s in out for c in s
    )
    assert [out[i][0].prompt_ids for i in range(2)] == expected

    adapter = save_adapter(apply_lora(model, rank=4, alpha=8, target_modules=["q_proj"]), tmp_path / "a")
    generator.sync_adapter(adapter)
    generator.generate(PROBLEMS[:1], SamplingParams())
    generator.sync_adapter(adapter)  # the same folder rewritten by a later step: a new id, not vLLM's cache
    generator.generate(PROBLEMS[:1], SamplingParams())
    assert [(c.lora.lora_int_id, c.lora.lora_path) for c in engine.calls[1:]] == [
        (1, str(adapter)),
        (2, str(adapter)),
    ]
    assert len({c.lora.lora_name for c in engine.calls[1:]}) == 2 and engine.calls[1].adapter
    generator.sync_adapter(None)
    generator.generate(PROBLEMS[:1], SamplingParams())
    assert engine.calls[-1].lora is None
