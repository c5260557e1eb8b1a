"""The training engine: the policy, optimizer and schedule prepared by Accelerate, whichever engine
its config file selects (one process, DDP, FSDP2, DeepSpeed ZeRO-2; ZeRO-3 refused for now;
`configs/accelerate/`).

What the engine wraps is `DecoderForward`, a module whose forward is the policy's decoder: sgsd never
runs the full causal LM forward in training (it applies the output head to completion positions only,
`sgsd.scoring`), so the engine has to see the decoder call, where the data-parallel hooks live:

    engine = Engine(acc, policy, optimizer, scheduler)
    scoring_model = engine.scoring_model        # what sgsd.scoring and sgsd.teaching are given
    hidden = scoring_model.decoder(input_ids=.., attention_mask=.., position_ids=..)   # [R, L, H]

Routing of a decoder forward (`ScoringModel.decoder`):
- with grad (the student): through the prepared module, so DDP prepares its reducer for the backward
  and FSDP/ZeRO-3 gather the sharded weights;
- without grad (teachers, GRPO's old log-probs) under one process or DDP: the policy's own decoder,
  bypassing the wrapper. A no-grad forward builds no graph, so DDP would have nothing to reduce
  anyway, but DDP's forward may still run a collective (its buffer broadcast), and ranks run
  different numbers of teacher forwards; bypassing it keeps teacher scoring free of collectives;
- without grad under FSDP / ZeRO-3: through the prepared module (the weights are sharded, every
  forward gathers them), so every rank must run the same forwards, which the trainer guarantees by
  equal shares (`train.batch_size` divisible by the number of processes).

Gradient accumulation is the engine's own: `accumulate()` wraps each micro-batch, the engine skips
its gradient reduction on all but the last micro-batch of a step (DDP `no_sync`, FSDP2
`set_requires_gradient_sync(False)`, DeepSpeed's accumulation boundary), and `backward()` undoes the
engine's 1/gradient_accumulation_steps and 1/num_processes scalings, because sgsd's losses are
already normalised by the whole step's batch across processes (`Trainer.accumulate_gradients`).

Under DeepSpeed (ZeRO-2 verified on CPU, `tests/test_engines.py`) the step happens inside the last
micro-batch's `backward()`: DeepSpeed divides the loss by its own accumulation length (fixed when
prepared), averages the gradients over processes, clips them at its `gradient_clipping` (which
`check_setup` holds equal to train.max_grad_norm) and steps the optimizer; the schedule stays sgsd's.
DeepSpeed skips a step whose gradient norm is non-finite (its "overflow": gradients zeroed, norm
reported as inf), so `backward()` turns a non-finite loss into non-finite gradients, and `step()`
reports what DeepSpeed did. Checkpoints hold each rank's partition of the optimizer state; a resume
needs the same number of processes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sgsd.errors import UserError

ENGINES = ("single", "ddp", "fsdp", "deepspeed")


class DecoderForward(torch.nn.Module):
    """The module an engine wraps: the policy (a registered submodule, so every parameter is the
    engine's) whose forward runs the decoder only and returns its hidden states `[R, L, H]`."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        # FSDP's transformer-based wrap reads the layer classes from the wrapped module
        self._no_split_modules = getattr(base, "_no_split_modules", None)

    def decoder(self) -> torch.nn.Module:
        base = self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy
        return base.get_decoder()

    def forward(self, input_ids, attention_mask, position_ids):
        from sgsd.models import adapters_in_base_precision

        decoder = self.decoder()
        with adapters_in_base_precision(decoder):
            out = decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        return out.last_hidden_state  # [R, L, H]


class ScoringModel:
    """What the scoring functions are given in training: the policy's parts (head, config) for
    `sgsd.scoring`, and `decoder(...)` routed as the module docstring says."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.policy = engine.policy

    def parameters(self):
        return self.policy.parameters()

    def decoder(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        e = self.engine
        if torch.is_grad_enabled() or e.sharded:
            return e.module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return e.plain(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def engine_kind(acc) -> str:
    """'single', 'ddp', 'fsdp' or 'deepspeed' for an Accelerator's distributed type."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if acc.num_processes > 1 else "single"


def make_accelerator(cpu: bool | None = None):
    """The Accelerator of a training run. Its engine comes from `accelerate launch --config_file`
    (or the environment it sets); the two settings here keep the step's numbers those of one process:
    the schedule steps once per optimizer step (Accelerate would otherwise step it once per process),
    and DDP broadcasts no buffers in forwards (the policy's buffers are constants).
    Accelerate enables DeepSpeed on GPUs only (with its CPU flag it would run plain DDP): refused here.
    (The tests run DeepSpeed on CPU by switching Accelerate's state, tests/engine_worker.py.)"""
    import os

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cpu is None:
        cpu = not torch.cuda.is_available()
        if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            raise UserError(
                "DeepSpeed through Accelerate needs GPUs; on CPU use configs/accelerate/cpu-2proc.yaml (DDP)"
            )
    return Accelerator(
        cpu=cpu,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def check_setup(cfg, acc) -> None:
    """Refuse the settings an engine cannot run, with what to change."""
    kind, n = engine_kind(acc), acc.num_processes
    if n > 1 and cfg.train.batch_size % n:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {n} processes; every process "
            "needs an equal share (the engine's collectives need the same forwards on every rank)"
        )
    if kind not in ("fsdp", "deepspeed"):
        return
    sharded = kind == "fsdp" or deepspeed_stage(acc) == 3
    what = "FSDP" if kind == "fsdp" else f"DeepSpeed ZeRO-{deepspeed_stage(acc)}"
    if cfg.rollout.backend == "vllm":
        raise UserError(f"{what} with rollout.backend=vllm is not supported yet; use rollout.backend=hf")
    if kind == "deepspeed":
        check_deepspeed_clipping(cfg, acc)
        if deepspeed_stage(acc) == 3:  # tried on CPU: the first policy use outside the engine (retrieval's
            raise UserError(  # embeddings, generation) meets ZeRO-3's empty partitioned weights
                "DeepSpeed ZeRO-3 is not supported yet (sgsd reads the policy's weights outside the engine, "
                "and ZeRO-3 leaves them partitioned); use configs/accelerate/8gpu-fsdp.yaml for sharded "
                "weights, or 8gpu-zero2.yaml"
            )
    if sharded and cfg.rollout.merged_generation and cfg.model.lora_rank > 0:
        raise UserError(
            f"under {what} the weights are sharded and cannot be merged into a generation copy; "
            "set rollout.merged_generation=false"
        )
    if sharded and bool(cfg.data.eval_sources) and cfg.eval.k > 0:
        raise UserError(
            f"under {what} generation is collective, and in-loop evaluation runs on the main process "
            "only; set data.eval_sources=[] and evaluate the checkpoints with `sgsd eval`"
        )
    if sharded and cfg.skills.online_update and cfg.skills.extractor != "openai":
        from sgsd.methods import method_spec

        if method_spec(cfg.train.method).evolves_bank:
            raise UserError(
                f"under {what} the policy cannot extract skills on the main process alone; set "
                "skills.online_update=false or skills.extractor=openai"
            )


def check_deepspeed_clipping(cfg, acc) -> None:
    """DeepSpeed clips inside its step at the config's `gradient_clipping`: fill it from
    train.max_grad_norm when 'auto', refuse a different value (0: no clipping)."""
    config = getattr(acc.state.deepspeed_plugin, "deepspeed_config", {})
    want = float(cfg.train.max_grad_norm or 0.0)
    clip = config.get("gradient_clipping", "auto")
    if clip == "auto":
        config["gradient_clipping"] = want
    elif float(clip) != want:
        raise UserError(
            f"the DeepSpeed config clips gradients at {clip} but train.max_grad_norm={want}; set "
            "deepspeed_config.gradient_clipping in the accelerate config equal to train.max_grad_norm"
        )


def deepspeed_stage(acc) -> int:
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0)


class Engine:
    """The prepared policy, optimizer and schedule of one training run (see the module docstring)."""

    def __init__(self, acc, policy, optimizer, scheduler):
        self.acc, self.policy = acc, policy
        self.kind = engine_kind(acc)
        self.sharded = self.kind == "fsdp" or (self.kind == "deepspeed" and deepspeed_stage(acc) == 3)
        self.shards_optimizer = self.kind in ("fsdp", "deepspeed")  # each rank holds part of its state
        self.plain = DecoderForward(policy)  # the unwrapped forward (same parameters)
        if self.kind == "deepspeed":  # DeepSpeed's batch bookkeeping: one "sample" per micro-batch, the
            config = acc.state.deepspeed_plugin.deepspeed_config  # trainer's micro-batches per step
            config["train_micro_batch_size_per_gpu"] = 1
            config["gradient_accumulation_steps"] = acc.gradient_accumulation_steps
            config["train_batch_size"] = acc.gradient_accumulation_steps * acc.num_processes
        self.module, self.optimizer, self.scheduler = acc.prepare(
            DecoderForward(policy), optimizer, scheduler
        )
        self.scoring_model = ScoringModel(self)
        if self.kind == "fsdp":  # FSDP initialises its state on the wrapped module's first forward;
            self._first_forward()  # generation calls the layers directly, so run that forward now

    def _first_forward(self) -> None:
        device = next(self.policy.parameters()).device
        one = torch.ones((1, 1), dtype=torch.long, device=device)  # [1, 1]
        with torch.no_grad():
            self.module(input_ids=one, attention_mask=one, position_ids=one - 1)

    def trainable(self) -> list[torch.nn.Parameter]:
        """The trainable parameters as the engine holds them (FSDP2 replaces them by sharded ones)."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ one step

    def start_step(self, micro_batches: int) -> None:
        """Before a step's first micro-batch: the engine reduces gradients after the last one."""
        self.acc.gradient_accumulation_steps = micro_batches
        self.acc.step = 0  # Accelerate's micro-batch counter: sync on the `micro_batches`-th

    def accumulate(self):
        """Context for one micro-batch (forward and backward); reduction only on the step's last."""
        return self.acc.accumulate(self.module)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already normalised by the whole step's batch over all processes: the
        engine divides it by gradient_accumulation_steps and averages over processes, so it is scaled
        by both first and the accumulated, reduced gradient is that of one process on the batch.
        DeepSpeed divides by its own accumulation length, and steps after the step's last backward."""
        accumulation = self.acc.gradient_accumulation_steps
        if self.kind == "deepspeed":
            accumulation = self.module.gradient_accumulation_steps()
            if not torch.isfinite(loss):  # DeepSpeed skips a step by its gradient norm only
                loss = loss * float("nan")
        self.acc.backward(loss * (accumulation * self.acc.num_processes))

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the reduced gradients at `max_norm`; their norm before clipping. Under DeepSpeed the
        step has already clipped (at the config's gradient_clipping) and this reads its norm."""
        norm = self.acc.clip_grad_norm_(self.trainable(), max_norm)
        if norm is None:
            return float("nan")
        if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
            norm = norm.full_tensor()
        return float(norm)

    def step(self, ok: bool) -> bool:
        """Step the optimizer if `ok` (the loss and gradient norm finite on every rank); whether the
        step was applied. DeepSpeed stepped, or skipped, inside the last backward by the same rule."""
        if self.kind != "deepspeed":
            if ok:
                self.optimizer.step()
            return ok
        applied = self.module.was_step_applied()
        if applied != ok:
            raise RuntimeError(
                f"DeepSpeed {'applied' if applied else 'skipped'} a step sgsd did not expect to"
            )
        return applied

    # ------------------------------------------------------------------ generation

    @contextlib.contextmanager
    def generation(self):
        """Around a generation that every rank runs at once: under FSDP, gather the full weights once
        (each decoding step would otherwise all-gather every layer, in lockstep across ranks whose
        completions differ in length) and shard them again after; elsewhere nothing."""
        if self.kind != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        inner = [m for m in self.module.modules() if isinstance(m, FSDPModule) and m is not self.module]
        for m in inner:
            m.set_reshard_after_forward(False, recurse=False)
        for m in [self.module, *inner]:
            m.unshard()
        try:
            yield
        finally:
            for m in [self.module, *inner]:
                m.reshard()
            for m in inner:
                m.set_reshard_after_forward(True, recurse=False)

    # ------------------------------------------------------------------ checkpoints

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter by name, whole and on the CPU. Under FSDP the shards are gathered:
        every rank must call this (the main process writes the result)."""
        out = {}
        for name, p in self.policy.named_parameters():
            if p.requires_grad:
                out[name] = full_tensor(p).detach().cpu().contiguous()
        return out

    def save_sharded_optimizer(self, folder: Path) -> None:
        """Each rank writes its shard of the optimizer state. All ranks call this with the same folder.
        FSDP: torch.distributed.checkpoint (which can also load it into another number of ranks);
        DeepSpeed: each rank's partition of the optimizer state, `rank-NNNNN.pt`."""
        if self.kind == "deepspeed":
            Path(folder).mkdir(parents=True, exist_ok=True)
            torch.save(self._zero_optimizer().optimizer.state_dict(), self._rank_file(folder))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.module, self.optimizer.optimizer)
        dcp.save({"optimizer": state}, checkpoint_id=str(folder))

    def load_sharded_optimizer(self, folder: Path) -> None:
        """Restore what `save_sharded_optimizer` wrote, after the weights were loaded."""
        written = len(list(Path(folder).glob("rank-*.pt")))
        if self.kind == "deepspeed":
            if written != self.acc.num_processes:
                raise UserError(
                    f"{folder} holds the optimizer state of {written or 'no'} DeepSpeed processes "
                    f"(0: written under FSDP); resume it with that many DeepSpeed processes"
                )
            zero = self._zero_optimizer()
            zero.optimizer.load_state_dict(
                torch.load(self._rank_file(folder), map_location="cpu", weights_only=True)
            )
            zero.refresh_fp32_params()  # its fp32 partition of the weights, from the loaded parameters
            return
        if written:
            raise UserError(
                f"{folder} holds an optimizer state written under DeepSpeed; resume it under DeepSpeed"
            )
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(self.module, self.optimizer.optimizer)}
        dcp.load(state, checkpoint_id=str(folder))
        set_optimizer_state_dict(self.module, self.optimizer.optimizer, state["optimizer"])

    def _zero_optimizer(self):
        if deepspeed_stage(self.acc) != 2:
            raise UserError("checkpoints under DeepSpeed are supported for ZeRO-2 only")
        return self.optimizer.optimizer  # Accelerate's wrapper around DeepSpeed's ZeRO optimizer

    def _rank_file(self, folder: Path) -> Path:
        return Path(folder) / f"rank-{self.acc.process_index:05d}.pt"


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter gathered whole; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, sharding it first when the parameter is a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value.to(param.device, param.dtype))


def accelerate_config_dir() -> Path:
    from sgsd.configs import CONFIG_DIR

    return CONFIG_DIR / "accelerate"
