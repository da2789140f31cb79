"""DeepSpeed ZeRO backend of the staged trainer (``backend.name: deepspeed``).

One object per stage wraps the single-device student in a DeepSpeed engine:

    backend = DeepSpeedBackend(model, param_groups(model, ...), stage, accumulation,
                               world_size=world_size, device=device, config=cfg.backend)
    set_learning_rate(backend.optimizer, lr)           # every step; muP groups keep their lr_scale
    for micro in range(accumulation):
        with backend.accumulating(micro == accumulation - 1):
            backend.backward(loss_of(backend.model, batch) / accumulation)
    grad_norm, applied = backend.step(loss_finite)     # reduce, clip, AdamW; skipped on non-finite gradients
    backend.save(checkpoint_dir) / backend.load(checkpoint_dir)     # every rank: its ZeRO shards
    with backend.full_weights(): model.save_pretrained(...)         # ZeRO-3 gathers the full weights

What maps where:
    backend.zero_stage / offload_optimizer / bf16   zero_optimization.stage / offload_optimizer / bf16.enabled
    stage.optimizer.grad_clip                       gradient_clipping (0 = none)
    stage.micro_batch_size, the stage's accumulation  train_micro_batch_size_per_gpu, gradient_accumulation_steps
    backend.activation_checkpointing                the model's gradient_checkpointing_enable() (the trainer)

muP learning rates. The optimizer is a torch AdamW over our parameter groups, handed to DeepSpeed as its
client optimizer (no compiled fused Adam: this runs on CPU too). ZeRO keeps that AdamW as its inner
optimizer and only replaces each group's ``params`` with the flat partition this rank owns; the group dicts,
with their ``lr_scale`` and ``weight_decay``, stay as they are, and ``engine.optimizer.param_groups`` is
that AdamW's list. So ``set_learning_rate(backend.optimizer, lr)`` sets ``lr * lr_scale`` on the groups
the update reads, as with the torch backend (tests/train/test_deepspeed.py checks both).

Non-finite guard. DeepSpeed's ZeRO optimizers skip the update when the gradient norm is inf/NaN (fp32, and
bf16 with ``check_grad_overflow``). A micro-batch whose loss is not finite gets its gradient poisoned with
NaN here, so that a bad loss also skips the step on every rank, as in the torch backend.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..train.config import BackendConfig, RecipeError, StageConfig

CHECKPOINT_FOLDER = "deepspeed"  # inside our checkpoint folder: DeepSpeed's own layout, one file per rank
CHECKPOINT_TAG = "state"
# ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's default: norms and the like
# are not worth a gather). Tests set 0 so that every parameter of a tiny model is partitioned.
ZERO3_PERSISTENCE_THRESHOLD = 100_000


def check_config(backend: BackendConfig) -> None:
    """Fail before any model or data work: DeepSpeed missing, or a ZeRO stage this backend does not run."""
    import_deepspeed()
    if backend.zero_stage not in (1, 2, 3):
        raise RecipeError(f"backend.zero_stage = {backend.zero_stage}; the deepspeed backend runs ZeRO stage 1, 2 "
                          "or 3 (backend.name=torch is plain data parallelism)")


def deepspeed_config(stage: StageConfig, accumulation: int, world_size: int, backend: BackendConfig) -> dict:
    """The DeepSpeed config of one stage (a plain dict: no JSON file to keep in sync with the recipe)."""
    check_config(backend)
    zero = {"stage": backend.zero_stage}
    if backend.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = ZERO3_PERSISTENCE_THRESHOLD
    if backend.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": stage.micro_batch_size * accumulation * world_size,
        "gradient_clipping": max(stage.optimizer.grad_clip, 0.0),
        "zero_optimization": zero,
        # our torch AdamW, also under offload: DeepSpeedCPUAdam would need a compiled extension
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own step log stays quiet
        "wall_clock_breakdown": False,
    }
    if backend.bf16:
        # bf16 weights and activations, fp32 master weights (in the ZeRO optimizer) and fp32 gradient
        # accumulation: summing many micro-batches in bf16 would lose the small ones
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def import_deepspeed():
    try:
        import deepspeed
    except ModuleNotFoundError as error:
        if error.name != "deepspeed":
            raise
        raise ModuleNotFoundError("backend.name=deepspeed needs DeepSpeed; install it with: "
                                  "pip install 'sala-train[deepspeed]'", name="deepspeed") from error
    return deepspeed


def no_compiled_ops(deepspeed) -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce (g++, needs AVX2) when
    its op table says it can, and filling that table first runs test builds with gcc. gloo does the job at
    our scale without a compiler: mark the op unavailable, in the table DeepSpeed reads (deepspeed.ops keeps
    it as a module attribute; set before the first lookup, the probe is skipped, and every op reads as not
    compatible, which on CPU is what we want: our AdamW is torch's)."""
    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    # DeepSpeed's ZeRO collectives still call the torch names that torch 2.13 deprecates; once per call site
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)


def ensure_process_group() -> None:
    """DeepSpeed needs torch.distributed (and the launcher's variables) even in one process: without torchrun,
    start a one-rank group."""
    if not dist.is_initialized():
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
            os.environ.setdefault(name, value)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedBackend:
    """A DeepSpeed engine around ``model`` for one stage; ``model`` (the engine) is what the loss calls."""

    # ZeRO hooks the module's parameters (and stage 3 partitions them in place), so the module does not go on
    # to the next stage as it is: the trainer reloads the student from the stage-end checkpoint instead.
    keeps_model = False

    def __init__(self, model: torch.nn.Module, groups: list[dict], stage: StageConfig, accumulation: int, *,
                 world_size: int, device: torch.device, config: BackendConfig):
        # device: DeepSpeed places the module on its accelerator's device for LOCAL_RANK itself
        self.deepspeed = import_deepspeed()
        ensure_process_group()
        if self.deepspeed.accelerator.get_accelerator().device_name() == "cpu":
            no_compiled_ops(self.deepspeed)
        opt = stage.optimizer
        # ZeRO swaps each group's params for a flat partition; the names would no longer line up with them
        groups = [{k: v for k, v in group.items() if k != "param_names"} for group in groups]
        optimizer = torch.optim.AdamW(groups, lr=stage.schedule.lr, betas=tuple(opt.betas), eps=opt.eps)
        self.engine, self.optimizer, _, _ = self.deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(stage, accumulation, world_size, config))
        self.model = self.engine
        self.module = self.engine.module

    def accumulating(self, last_micro_batch: bool):
        # DeepSpeed counts micro-batches itself and reduces gradients at the accumulation boundary
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (already divided by the accumulation)."""
        if not torch.isfinite(loss):  # one host sync per micro-batch
            loss = loss * float("nan")  # every gradient NaN: DeepSpeed's overflow check skips the step
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # between boundaries this only advances DeepSpeed's micro-step counter

    def step(self, loss_finite: bool) -> tuple[float, bool]:
        """The optimizer step at the accumulation boundary: (gradient norm before clipping, step applied).
        ``loss_finite`` needs no action here: backward() already poisoned the gradients of a bad loss."""
        self.engine.step()
        return float(self.engine.get_global_grad_norm()), bool(self.engine.was_step_applied())

    @contextmanager
    def full_weights(self):
        """Inside the block every rank's module holds full parameters (ZeRO-3 gathers them, all at once: the
        whole model fits on a rank at load time too; read-only)."""
        if self.engine.zero_optimization_partition_weights():
            with self.deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def save(self, directory: Path) -> None:
        """Every rank writes its ZeRO shards (optimizer state, fp32 master weights) under ``directory``."""
        self.engine.save_checkpoint(str(Path(directory) / CHECKPOINT_FOLDER), tag=CHECKPOINT_TAG,
                                    client_state={}, save_latest=False)

    def load(self, directory: Path) -> None:
        path = Path(directory) / CHECKPOINT_FOLDER
        loaded, _ = self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) to resume from; "
                                    "was this checkpoint written by another backend? Resume with the backend "
                                    "that wrote it, or start the stage afresh (resume=false)")

    def close(self) -> None:
        """Remove the engine's hooks and drop it (and its buffers) before the next stage builds its own."""
        self.engine.destroy()
        self.engine = self.model = self.module = self.optimizer = None
