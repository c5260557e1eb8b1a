"""rollout.backend=vllm_server against a loopback stand-in for `vllm serve --enable-lora`
(tests/fake_vllm_server.py): the client's requests and error messages, the trainer loading each step's
adapter and sampling with it, and `sgsd eval` through the server."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from fake_vllm_server import BASE_MODEL, FakeVLLMServer
from grading_stub import alternate_grades
from safetensors.torch import load_file

from sgsd.cli import main
from sgsd.config import load_config
from sgsd.errors import ConfigError, UserError
from sgsd.fileio import read_jsonl
from sgsd.generation import SamplingParams, VLLMServerGenerator, make_generator
from sgsd.prompts import render_chat

PROBLEMS = ["What is 2 + 3?", [{"role": "user", "content": "Name a prime."}]]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def _prompt_ids(tokenizer, conversation, thinking=False):
    return tokenizer(render_chat(tokenizer, conversation, thinking), add_special_tokens=False)["input_ids"]


def _adapter(folder, value: float):
    """A minimal adapter folder (what the stand-in reads at load time)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"lora_B": torch.full((2, 2), value)}, str(folder / "adapter_model.safetensors"))
    return folder


# ---- the client --------------------------------------------------------------------------------


def test_generate_sends_token_prompts_and_the_sampler_and_groups_the_choices(tokenizer):
    def reply(prompt, j):  # distinct per prompt and sample, so the grouping is checked
        return [100 + len(prompt) % 7, 200 + j, tokenizer.eos_token_id]

    with FakeVLLMServer(reply) as server:
        generator = make_generator("vllm_server", base_url=server.url + "/v1/", tokenizer=tokenizer)
        assert generator.check() == BASE_MODEL
        params = SamplingParams(
            temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=5, n=3, seed=11, stop=["Q:"]
        )
        out = generator.generate(PROBLEMS, params, enable_thinking=False)

    expected = [_prompt_ids(tokenizer, p) for p in PROBLEMS]
    (sample,) = server.completions
    assert sample.model == BASE_MODEL  # no adapter: the base model
    body = sample.body
    assert body["prompt"] == expected
    assert {k: body[k] for k in ("n", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop")} == {
        "n": 3, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 5, "seed": 11, "stop": ["Q:"]
    }  # fmt: skip
    assert body["return_token_ids"] is True
    assert [len(s) for s in out] == [3, 3]
    for i, samples in enumerate(out):
        assert [c.token_ids for c in samples] == [reply(expected[i], j) for j in range(3)]
        assert all(c.prompt_ids == expected[i] and c.finish_reason == "stop" for c in samples)
        assert samples[1].text == " ".join(map(str, reply(expected[i], 1)))


def test_seed_and_stop_are_left_out_when_unset_and_top_k_is_passed(tokenizer):
    with FakeVLLMServer(lambda p, j: [7]) as server:
        generator = VLLMServerGenerator(server.url, tokenizer)
        out = generator.generate(["hi"], SamplingParams(top_k=20, max_new_tokens=1), enable_thinking=True)
    body = server.completions[0].body
    assert "seed" not in body and "stop" not in body and body["top_k"] == 20
    assert body["prompt"] == [_prompt_ids(tokenizer, "hi", thinking=True)]
    assert out[0][0].token_ids == [7]


def test_load_adapter_samples_with_it_and_unloads_the_previous_one(tokenizer, tmp_path):
    first, second = _adapter(tmp_path / "a", 1.0), _adapter(tmp_path / "b", 2.0)
    with FakeVLLMServer(lambda p, j: [7]) as server:
        generator = VLLMServerGenerator(server.url, tokenizer)
        generator.load_adapter("step-1", first)
        generator.generate(["x"], SamplingParams())
        generator.load_adapter("step-2", second)
        generator.generate(["x"], SamplingParams())
        generator.use_base()
        generator.generate(["x"], SamplingParams())
        generator.unload()
        assert server.loaded == {}
    assert [(load.name, load.path) for load in server.loads] == [
        ("step-1", str(first)),
        ("step-2", str(second)),
    ]
    assert [float(load.tensors["lora_B"][0, 0]) for load in server.loads] == [1.0, 2.0]
    assert server.unloads == ["step-1", "step-2"]
    assert [s.model for s in server.completions] == ["step-1", "step-2", BASE_MODEL]


def test_adapter_paths_are_sent_absolute(tokenizer, tmp_path, monkeypatch):
    _adapter(tmp_path / "rel", 1.0)
    monkeypatch.chdir(tmp_path)
    with FakeVLLMServer(lambda p, j: [7]) as server:
        VLLMServerGenerator(server.url, tokenizer).load_adapter("a", "rel")
    assert server.loads[0].path == str(tmp_path / "rel")


def test_a_name_already_loaded_is_replaced(tokenizer, tmp_path):
    """A resumed run meets its own adapter name, left loaded by the interrupted run: unload, load again."""
    with FakeVLLMServer(lambda p, j: [7]) as server:
        VLLMServerGenerator(server.url, tokenizer).load_adapter("run-step-3", _adapter(tmp_path / "old", 1.0))
        VLLMServerGenerator(server.url, tokenizer).load_adapter("run-step-3", _adapter(tmp_path / "new", 2.0))
        assert list(server.loaded) == ["run-step-3"]
        assert float(server.loaded["run-step-3"].tensors["lora_B"][0, 0]) == 2.0
    assert server.unloads == ["run-step-3"]


def test_an_adapter_the_server_already_forgot_is_not_an_error_to_unload(tokenizer, tmp_path):
    """A restarted server no longer holds the previous adapter: loading the next one still works."""
    with FakeVLLMServer(lambda p, j: [7]) as server:
        generator = VLLMServerGenerator(server.url, tokenizer)
        generator.load_adapter("step-1", _adapter(tmp_path / "a", 1.0))
        server.loaded.clear()  # the restart
        generator.load_adapter("step-2", _adapter(tmp_path / "b", 2.0))
        generator.unload()
        assert server.loaded == {} and server.unloads == ["step-2"]
        server.fail["/v1/unload_lora_adapter"] = (500, b'{"error": {"message": "engine dead"}}')
        generator.load_adapter("step-3", _adapter(tmp_path / "c", 3.0))
        with pytest.raises(UserError, match="HTTP 500: engine dead"):  # other errors are not swallowed
            generator.unload()


# ---- errors ------------------------------------------------------------------------------------


def test_a_server_that_is_down_is_named(tokenizer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    generator = VLLMServerGenerator(f"http://127.0.0.1:{port}", tokenizer, timeout_s=5)
    with pytest.raises(
        UserError, match=rf"cannot reach the vLLM server at http://127.0.0.1:{port}/v1/models"
    ):
        generator.check()


def test_runtime_lora_loading_off_says_how_to_turn_it_on(tokenizer, tmp_path):
    with FakeVLLMServer(lambda p, j: [7]) as server:
        server.fail["/v1/load_lora_adapter"] = (404, b'{"detail":"Not Found"}')
        with pytest.raises(UserError, match="HTTP 404: Not Found.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            VLLMServerGenerator(server.url, tokenizer).load_adapter("a", _adapter(tmp_path / "a", 1.0))


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"message": "LoRA rank 64 is greater than max_lora_rank 16", "type": "BadRequestError", "code": 400}}',
        b'{"object": "error", "message": "LoRA rank 64 is greater than max_lora_rank 16", "code": 400}',
    ],
)
def test_an_http_error_carries_the_servers_message(tokenizer, tmp_path, body):
    with FakeVLLMServer(lambda p, j: [7]) as server:
        server.fail["/v1/load_lora_adapter"] = (400, body)
        with pytest.raises(UserError) as caught:
            VLLMServerGenerator(server.url, tokenizer).load_adapter("a", _adapter(tmp_path / "a", 1.0))
    assert str(caught.value) == (
        f"vLLM server {server.url}/v1/load_lora_adapter answered HTTP 400: "
        "LoRA rank 64 is greater than max_lora_rank 16"
    )


def test_a_missing_adapter_folder_is_the_servers_404(tokenizer, tmp_path):
    with FakeVLLMServer(lambda p, j: [7]) as server:
        with pytest.raises(UserError, match="HTTP 404: No adapter found for"):
            VLLMServerGenerator(server.url, tokenizer).load_adapter("a", tmp_path / "nowhere")


def test_an_unknown_model_is_the_servers_404(tokenizer):
    with FakeVLLMServer(lambda p, j: [7]) as server:
        generator = VLLMServerGenerator(server.url, tokenizer)
        generator.use_adapter("never-loaded")
        with pytest.raises(
            UserError, match="completions answered HTTP 404: The model `never-loaded` does not"
        ):
            generator.generate(["x"], SamplingParams())


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"<html>502 Bad Gateway</html>", "returned malformed JSON"),
        (b'{"choices": "none"}', "expected 2 choices, got 'none'"),
        (
            b'{"choices": [{"index": 0, "text": "a", "finish_reason": "stop", "token_ids": [1]}]}',
            "expected 2 choices, got 1",
        ),
        (
            b'{"choices": [{"index": 0, "text": "a", "finish_reason": "stop"},'
            b' {"index": 1, "text": "b", "finish_reason": "stop"}]}',
            r"no token_ids list .*return_token_ids \(vLLM >= 0.10.2\)",
        ),
        (
            b'{"choices": [{"index": 0, "text": "a", "finish_reason": "abort", "token_ids": [1]},'
            b' {"index": 1, "text": "b", "finish_reason": "stop", "token_ids": [1]}]}',
            "finished with 'abort'",
        ),
    ],
)
def test_a_malformed_completion_answer_is_named(tokenizer, payload, message):
    with FakeVLLMServer(lambda p, j: [7]) as server:
        server.fail["/v1/completions"] = (200, payload)
        generator = VLLMServerGenerator(server.url, tokenizer)
        generator.use_adapter("a")
        with pytest.raises(UserError, match=message) as caught:
            generator.generate(["x", "y"], SamplingParams())
    assert f"{server.url}/v1/completions" in str(caught.value)


def test_a_slow_server_times_out_with_the_setting_named(tokenizer):
    with FakeVLLMServer(lambda p, j: time.sleep(2) or [7]) as server:
        generator = VLLMServerGenerator(server.url, tokenizer, timeout_s=0.3)
        generator.use_adapter("a")
        server.loaded["a"] = None  # known to the stand-in, so it samples (slowly)
        with pytest.raises(UserError, match=r"did not answer within 0.3 s \(rollout.vllm_server_timeout_s\)"):
            generator.generate(["x"], SamplingParams())


def test_the_api_key_is_sent_as_a_bearer_token(tokenizer, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "secret-1")
    with FakeVLLMServer(lambda p, j: [7]) as server:
        VLLMServerGenerator(server.url, tokenizer).check()
    assert server.requests == [("GET", "/v1/models", "Bearer secret-1")]


def test_the_config_needs_a_server_url():
    with pytest.raises(ConfigError, match="rollout.backend=vllm_server needs rollout.vllm_server_url"):
        load_config(None, ["rollout.backend=vllm_server"])
    with pytest.raises(ConfigError, match="eval.backend=vllm_server needs rollout.vllm_server_url"):
        load_config(None, ["eval.backend=vllm_server", "rollout.vllm_server_url=gpu-host:8000"])
    cfg = load_config(None, ["rollout.backend=vllm_server", "rollout.vllm_server_url=http://gpu-host:8000"])
    assert cfg.rollout.vllm_server_timeout_s == 3600.0


# ---- the trainer and `sgsd eval` end to end ----------------------------------------------------


@pytest.mark.slow
def test_training_samples_each_step_with_that_steps_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """Two steps of the real trainer with rollout.backend=vllm_server: before every use after an optimizer
    step the adapter is saved and loaded into the server under a new name, the previous one unloaded,
    and the rollouts and evaluations ask for exactly that name with the configured sampler."""
    from transformers import AutoTokenizer

    alternate_grades(monkeypatch)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reply = tok("The sum is \\boxed{3}.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    run = tmp_path / "run"
    with FakeVLLMServer(
        lambda p, j: reply, decode=lambda ids: tok.decode(ids, skip_special_tokens=True)
    ) as server:
        args = ["train", "-c", "tiny", "-o", str(run), f"model.name={tiny_model_dir}",
                "rollout.backend=vllm_server", f"rollout.vllm_server_url={server.url}",
                "skills.online_update=false"]  # fmt: skip
        assert main(args) == 0
        assert server.loaded == {}  # the run unloaded its last adapter at the end

        names = [load.name for load in server.loads]
        prefix = names[0].rsplit("-step-", 1)[0]
        assert prefix.startswith("sgsd-")
        assert names == [f"{prefix}-step-{n}" for n in (0, 1, 2)]
        assert server.unloads == names  # each replaced by the next; the last at the end
        assert all(load.path == str(run.resolve() / "rollout-adapter") for load in server.loads)
        # the adapter folder as loaded: step 0 untrained (lora_B = 0), then a new adapter every step
        assert all(float(v.abs().max()) == 0 for k, v in server.loads[0].tensors.items() if "lora_B" in k)
        final = load_file(str(run / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors"))
        assert server.loads[2].tensors.keys() == final.keys()
        assert all(torch.equal(server.loads[2].tensors[k], final[k]) for k in final)
        assert any(not torch.equal(server.loads[1].tensors[k], final[k]) for k in final)

        # eval at step 0, rollouts of steps 1 and 2, eval at step 2: each with that step's adapter
        assert [s.model for s in server.completions] == [names[0], names[0], names[1], names[2]]
        cfg = load_config(run / "config.yaml")
        r, e = cfg.rollout, cfg.eval
        for round_index, sample in enumerate(server.completions[1:3]):
            body = sample.body
            assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"], body["n"]) == (
                r.temperature, r.top_p, r.top_k, r.max_new_tokens, r.num_generations
            )  # fmt: skip
            assert body["seed"] == cfg.train.seed * 7919 + round_index * 104_729
            assert len(body["prompt"]) == cfg.train.batch_size
        for sample in (server.completions[0], server.completions[3]):
            body = sample.body
            assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"], body["n"]) == (
                e.temperature, e.top_p, -1, e.max_new_tokens, e.k
            )  # fmt: skip
        assert server.completions[3].adapter is server.loads[2]

        rows = read_jsonl(run / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2]
        assert all(r["completion_tokens"] == len(reply) for r in rows)

        # `sgsd eval --run` through the same server: the base model, then each checkpoint's adapter
        loads_before = len(server.loads)
        out = tmp_path / "eval"
        assert main(["eval", "--run", str(run), "--out", str(out), "eval.backend=vllm_server"]) == 0
        sweep = server.loads[loads_before:]
        assert [load.path for load in sweep] == [
            str((run / "checkpoints" / f"step-{n:06d}" / "adapter").resolve()) for n in (1, 2)
        ]
        assert all(torch.equal(sweep[1].tensors[k], final[k]) for k in final)
        assert [s.model for s in server.completions[4:]] == [BASE_MODEL] + [load.name for load in sweep]
        assert server.loaded == {}
        summary = json.loads((out / "step-000002" / "summary.json").read_text())
        assert summary["results"]


@pytest.mark.slow
def test_training_fails_fast_when_the_server_is_down(tmp_path, tiny_model_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["train", "-c", "tiny", "-o", str(tmp_path / "r"), f"model.name={tiny_model_dir}",
               "rollout.backend=vllm_server", f"rollout.vllm_server_url=http://127.0.0.1:{port}"])  # fmt: skip
    assert rc == 2
    assert f"cannot reach the vLLM server at http://127.0.0.1:{port}/v1/models" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_load_once_per_step_and_both_sample_with_it(tmp_path, tiny_model_dir):
    """torchrun, 2 CPU ranks (tests/dist_worker.py): the main process loads each step's adapter once; both
    ranks sample their own problems with it, never before it is loaded (the stand-in answers 404 for an
    adapter it does not hold, which would fail the run)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reply = tok("\\boxed{3}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    run = tmp_path / "ddp"
    with FakeVLLMServer(
        lambda p, j: reply, decode=lambda ids: tok.decode(ids, skip_special_tokens=True)
    ) as server:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).with_name("dist_worker.py")), str(run), f"model.name={tiny_model_dir}",
               "train.steps=2", "train.batch_size=4", "skills.online_update=false", "data.eval_sources=[]",
               "rollout.backend=vllm_server", f"rollout.vllm_server_url={server.url}"]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [load.name for load in server.loads]
    assert len(names) == 2 and names[0].endswith("-step-0") and names[1].endswith("-step-1")
    assert server.unloads == names
    assert [s.model for s in server.completions] == [names[0], names[0], names[1], names[1]]
    assert all(len(s.body["prompt"]) == 2 for s in server.completions)  # each rank: its half of the batch
    assert {s.body["seed"] for s in server.completions[:2]} == {42 * 7919, 42 * 7919 + 1}  # seeded per rank
    ranks = [json.loads((run / f"rank-{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
