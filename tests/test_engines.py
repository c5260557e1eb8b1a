"""Training engines through Accelerate (sgsd.engine): the shipped launcher configs load, teacher
forwards stay out of DDP's reducer, and 2 CPU processes under DDP, FSDP2 and DeepSpeed ZeRO-2 (when
the deepspeed package is installed) end with the weights of one process at the same global batch,
straight and across a resume.

Tolerance: 1e-5 absolute on every trainable tensor (measured: under 1e-6 after 3 AdamW steps; the
processes add the same per-rollout gradients in a different order, so float rounding differs)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgsd.configs import CONFIG_DIR, available_configs
from sgsd.errors import UserError

ROOT = Path(__file__).parents[1]
ACCEL = CONFIG_DIR / "accelerate"
SHIPPED = ["1gpu", "8gpu-ddp", "8gpu-zero2", "8gpu-zero3", "8gpu-fsdp", "cpu-2proc", "cpu-2proc-fsdp",
           "cpu-2proc-zero2"]  # fmt: skip
TOLERANCE = 1e-5
TRAIN = ["train.method=sgsd", "train.batch_size=4", "train.micro_batch_size=1", "skills.online_update=false",
         "data.eval_sources=[]", "rollout.merged_generation=false", "train.steps=3"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCEL / f"{name}.yaml"))
    expected = {"1gpu": "NO", "8gpu-ddp": "MULTI_GPU", "8gpu-zero2": "DEEPSPEED", "8gpu-zero3": "DEEPSPEED",
                "8gpu-fsdp": "FSDP", "cpu-2proc": "MULTI_GPU", "cpu-2proc-fsdp": "FSDP",
                "cpu-2proc-zero2": "DEEPSPEED"}[name]  # fmt: skip
    assert str(cfg.distributed_type).split(".")[-1] == expected
    assert cfg.mixed_precision == "no"  # precision is model.dtype's
    if expected == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == (2 if "zero2" in name else 3)
        assert cfg.deepspeed_config["gradient_clipping"] == 1.0  # configs/tiny.yaml's train.max_grad_norm
    if expected == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
    assert (ROOT / "configs" / "accelerate" / f"{name}.yaml").is_file()  # the repository's configs/ link


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_build_a_deepspeed_plugin(stage):
    """The ZeRO configs' deepspeed_config section becomes Accelerate's DeepSpeed plugin (needs the
    deepspeed package; running it needs GPUs, see the gpu-marked check in benchmarks/gpu)."""
    pytest.importorskip("deepspeed")
    import yaml
    from accelerate.utils import DeepSpeedPlugin

    section = yaml.safe_load((ACCEL / f"8gpu-zero{stage}.yaml").read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(zero_stage=section["zero_stage"], gradient_clipping=section["gradient_clipping"],
                             offload_optimizer_device=section["offload_optimizer_device"],
                             offload_param_device=section["offload_param_device"])  # fmt: skip
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage


def test_deepspeed_clipping_auto_is_filled_from_max_grad_norm():
    from sgsd.config import load_config
    from sgsd.configs import resolve_config_path
    from sgsd.engine import check_setup

    acc = _Acc(2, "DEEPSPEED", 2, clip="auto")
    check_setup(
        load_config(resolve_config_path("tiny"), ["train.batch_size=2", "train.max_grad_norm=0.5"]), acc
    )
    assert acc.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.5


def test_accelerate_configs_are_not_training_configs():
    assert not any(n.startswith("accelerate") for n in available_configs())


class _Acc:
    def __init__(self, n, kind="MULTI_GPU", stage=0, clip=1.0):
        from types import SimpleNamespace

        self.num_processes, self.distributed_type = n, kind
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={"gradient_clipping": clip})
        self.state = SimpleNamespace(deepspeed_plugin=plugin)


@pytest.mark.parametrize(
    "overrides, acc, message",
    [
        (["train.batch_size=3"], _Acc(2), "not divisible"),
        (["rollout.merged_generation=true"], _Acc(2, "FSDP"), "merged_generation=false"),
        (["rollout.merged_generation=false", "data.eval_sources=[reasoning_gym:chain_sum]"], _Acc(2, "FSDP"),
         "data.eval_sources=[]"),
        (["rollout.merged_generation=false", "data.eval_sources=[]", "rollout.backend=vllm"], _Acc(2, "DEEPSPEED", 3),
         "rollout.backend=hf"),
        (["rollout.merged_generation=false", "data.eval_sources=[]", "train.max_grad_norm=0.5"],
         _Acc(2, "DEEPSPEED", 2), "gradient_clipping"),
        (["rollout.merged_generation=false", "data.eval_sources=[]"], _Acc(2, "DEEPSPEED", 3), "ZeRO-3 is not supported"),
    ],
)  # fmt: skip
def test_setups_an_engine_cannot_run_are_refused(overrides, acc, message):
    from sgsd.config import load_config
    from sgsd.configs import resolve_config_path
    from sgsd.engine import check_setup

    cfg = load_config(resolve_config_path("tiny"), ["train.batch_size=2", *overrides])
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_setup(cfg, acc)


# ---------------------------------------------------------------------------------------------- processes


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _free_port() -> int:
    """A port nothing listens on now: each launch gets its own rendezvous port, so a launch never meets
    the previous one's socket still closing on Accelerate's default port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(config, script, *args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config),
           "--main_process_port", str(_free_port()), str(Path(__file__).with_name(script)),
           *map(str, args)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _one_process(run, *args):
    cmd = [sys.executable, str(Path(__file__).with_name("engine_worker.py")), str(run), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]


def _final(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final.safetensors"))


def _assert_same(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOLERANCE, worst
    return worst


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, tiny_model_dir):
    """Reference runs of one process: LoRA and full fine-tuning (lora_rank=0), 3 steps."""
    root = tmp_path_factory.mktemp("one")
    runs = {}
    for name, extra in (("lora", []), ("full", ["model.lora_rank=0"])):
        _one_process(root / name, f"model.name={tiny_model_dir}", *TRAIN, *extra)
        runs[name] = _final(root / name)
    assert any(v.abs().max() > 0 for k, v in runs["lora"].items() if "lora_B" in k)  # the adapter moved
    return runs


@pytest.mark.slow
def test_teacher_forwards_stay_out_of_ddp_hooks(tmp_path, tiny_model_dir):
    """Unequal numbers of teacher forwards per rank (EMA adapter, no grad) then a student backward
    through DDP: no collective hangs, no reducer error, and each rank's gradient is the average."""
    _launch("cpu-2proc.yaml", "ddp_hooks_worker.py", tmp_path, tiny_model_dir)
    for rank in range(2):
        result = json.loads((tmp_path / f"hooks-rank-{rank}.json").read_text())
        assert result["params"] > 0 and result["max_diff"] <= 1e-6


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None  # not imported here: its import is slow


CONFIGS = {"cpu-2proc.yaml": "ddp", "cpu-2proc-fsdp.yaml": "fsdp", "cpu-2proc-zero2.yaml": "deepspeed"}
ENGINE_CONFIGS = [
    "cpu-2proc.yaml",
    "cpu-2proc-fsdp.yaml",
    pytest.param(
        "cpu-2proc-zero2.yaml",
        marks=pytest.mark.skipif(
            not _has_deepspeed(),
            reason="the deepspeed package is not installed (pip install deepspeed; see README, Scaling out)",
        ),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("config", ENGINE_CONFIGS)
def test_two_processes_match_one_process_straight_and_resumed(
    tmp_path, tiny_model_dir, one_process_runs, config
):
    """LoRA, 3 steps: 2 processes end with the adapter of one process; so does a 2-process run stopped
    after step 2 and resumed (under FSDP and DeepSpeed the optimizer state is sharded in the checkpoint;
    under DeepSpeed the step, clipping included, runs inside its backward)."""
    args = [f"model.name={tiny_model_dir}", *TRAIN]
    _launch(config, "engine_worker.py", tmp_path / "straight", *args)
    kind = CONFIGS[config]
    assert (tmp_path / "straight" / "engine.txt").read_text() == kind
    _assert_same(_final(tmp_path / "straight"), one_process_runs["lora"])
    _launch(config, "engine_worker.py", tmp_path / "resumed", *args, "--stop-after", 2)
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-000002"
    assert (ckpt / "optimizer").is_dir() == (kind != "ddp")
    if kind == "deepspeed":  # each rank's partition of the optimizer state
        assert sorted(p.name for p in (ckpt / "optimizer").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    _launch(config, "engine_worker.py", tmp_path / "resumed", *args, "--resume")
    _assert_same(_final(tmp_path / "resumed"), one_process_runs["lora"])


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_deepspeed(), reason="the deepspeed package is not installed (pip install deepspeed)"
)
def test_deepspeed_skips_a_non_finite_step_as_one_process_does(tmp_path, tiny_model_dir):
    """A NaN loss on one rank at step 1: DeepSpeed, which steps inside the backward, skips that step
    (schedule included) on every rank, and the run ends with the adapter of one process that skipped it."""
    args = [f"model.name={tiny_model_dir}", *TRAIN, "--nan-step", 1]
    _one_process(tmp_path / "one", *map(str, args))
    _launch("cpu-2proc-zero2.yaml", "engine_worker.py", tmp_path / "ds", *args)
    for run in ("one", "ds"):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["skipped_step"] for r in rows] == [1.0, 0.0, 0.0], run
        assert rows[0]["grad_norm"] != rows[0]["grad_norm"] or rows[0]["grad_norm"] == float("inf")
    _assert_same(_final(tmp_path / "ds"), _final(tmp_path / "one"))


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_deepspeed(), reason="the deepspeed package is not installed (pip install deepspeed)"
)
def test_deepspeed_clips_as_one_process_does(tmp_path, tiny_model_dir, one_process_runs):
    """Clipping at 0.1 (below the tiny run's gradient norms, about 0.5): DeepSpeed's clipping inside its
    step ends with the adapter of one process clipping at train.max_grad_norm=0.1 (measured 4e-7),
    which differs from the unclipped run (by about 6e-4)."""
    config = tmp_path / "zero2-clip.yaml"
    config.write_text(
        (ACCEL / "cpu-2proc-zero2.yaml")
        .read_text()
        .replace("gradient_clipping: 1.0", "gradient_clipping: 0.1")
    )
    args = [f"model.name={tiny_model_dir}", *TRAIN, "train.max_grad_norm=0.1"]
    _one_process(tmp_path / "one", *args)
    _launch(config, "engine_worker.py", tmp_path / "ds", *args)
    clipped = _final(tmp_path / "one")
    assert max((clipped[k] - one_process_runs["lora"][k]).abs().max().item() for k in clipped) > 1e-4
    _assert_same(_final(tmp_path / "ds"), clipped)


@pytest.mark.slow
@pytest.mark.parametrize("config", ENGINE_CONFIGS)
def test_full_fine_tuning_two_processes_match_one_process(tmp_path, tiny_model_dir, one_process_runs, config):
    """model.lora_rank=0: every weight trains; 2 processes end with the full weights of one process."""
    _launch(config, "engine_worker.py", tmp_path, f"model.name={tiny_model_dir}", *TRAIN, "model.lora_rank=0")
    final = _final(tmp_path)
    assert len(final) == len(one_process_runs["full"]) > 10
    _assert_same(final, one_process_runs["full"])


def test_single_process_engine_is_the_plain_module(tmp_path, tiny_model_dir):
    """One process: no wrapper, teachers and student run the same decoder (the numbers of before)."""
    from sgsd.engine import DecoderForward, Engine, make_accelerator
    from sgsd.models import apply_lora, load_policy

    policy, _ = load_policy(str(tiny_model_dir), dtype="float32")
    policy = apply_lora(policy, rank=4, alpha=8)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
    engine = Engine(
        make_accelerator(cpu=True), policy, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1)
    )
    assert engine.kind == "single" and isinstance(engine.module, DecoderForward)
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(3)[None])
    with torch.no_grad():
        a = engine.scoring_model.decoder(**kw)
    b = engine.scoring_model.decoder(**kw)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
