"""The staged trainer: one loop, stage logic in small functions, state checkpointed atomically.

    trainer = Trainer(cfg)      # validates the recipe before touching a model or data
    trainer.run()               # every stage from cfg.start_stage (or from the latest checkpoint), in order

Backends (``backend.name``): "torch" (one process, or DDP under torchrun: gloo on CPU, NCCL on GPU),
"deepspeed" (ZeRO 1/2/3, sala_train.parallel.deepspeed) and "megatron" (tensor and context parallelism,
sala_train.parallel.megatron: the ranks of one TP x CP group read the same batches, so the data is sharded
over the data-parallel ranks only). A backend is one small object per stage that owns
the optimizer and the wrapping; the loop only calls its hooks (accumulating, backward, step, save, load,
full_weights, close). A killed run restarted with the same command continues from its latest checkpoint with
the same batches and losses.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import atomic_directory, write_json_atomic
from ..data.loader import PackedLoader
from .config import BackendConfig, RecipeError, StageConfig, TrainConfig
from .losses import kl_distillation, next_token_mask
from .params import param_groups, select_trainable
from .preemption import MARKER_NAME, watch_preemption
from .schedules import build_schedule, set_learning_rate

log = logging.getLogger(__name__)

DENSE_EVERYWHERE = 2**62  # dense_len that keeps InfLLM-V2 off at any length


def model_class_of(path) -> type:
    """The model class of a checkpoint, by config.json's model_type: "minicpm_sala" trains the SALA hybrid,
    "minicpm" the dense MiniCPM-4 (pretraining a teacher from a random `sala-make-teacher` checkpoint)."""
    from ..models import MiniCPMForCausalLM, MiniCPMSALAForCausalLM

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json in the checkpoint directory {path} (student=DIR)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    classes = {"minicpm_sala": MiniCPMSALAForCausalLM, "minicpm": MiniCPMForCausalLM}
    if model_type not in classes:
        raise RecipeError(f"{config_file}: model_type {model_type!r} cannot be trained; expected one of {list(classes)}")
    return classes[model_type]


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many bad steps); the message says why and where."""


def set_sparse(model, on: bool) -> None:
    """InfLLM-V2 on (each sparse mixer's configured dense_len) or off (dense attention at any length)."""
    dense_len = model.config.sparse_config["dense_len"] if on else DENSE_EVERYWHERE
    for module in model.modules():
        if hasattr(module, "sparse_config") and isinstance(module.sparse_config, dict):
            module.sparse_config["dense_len"] = dense_len


class TorchBackend:
    """AdamW in this process; DDP across processes under torchrun (gloo on CPU, NCCL on GPU)."""

    keeps_model = True  # the module goes on to the next stage as it is

    def __init__(self, model, groups: list[dict], stage: StageConfig, accumulation: int, *, world_size: int,
                 device: torch.device, config: BackendConfig):
        opt = stage.optimizer
        self.module = model
        self.optimizer = torch.optim.AdamW(groups, lr=stage.schedule.lr, betas=tuple(opt.betas), eps=opt.eps)
        self.grad_clip = opt.grad_clip
        self.model = model  # what the loss calls
        if world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=None if device.type == "cpu" else [device.index])

    def accumulating(self, last_micro_batch: bool):
        # DDP all-reduces the gradients once, after the last micro-batch of the step
        return nullcontext() if last_micro_batch or self.model is self.module else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss_finite: bool) -> tuple[float, bool]:
        """Clip, then AdamW unless the loss or the gradient is not finite: (norm before clipping, applied)."""
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad],
                                                   self.grad_clip if self.grad_clip > 0 else float("inf"))
        applied = loss_finite and bool(torch.isfinite(grad_norm))
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), applied

    def full_weights(self):
        return nullcontext()  # every rank holds the full model

    def save(self, directory: Path) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))

    def close(self) -> None:
        pass


def data_parallel_size(config: BackendConfig, world_size: int) -> int:
    """Ranks that read different batches: the world, divided by the ranks that split one model replica
    (megatron's tensor x context parallel)."""
    if config.name != "megatron":
        if config.tensor_parallel != 1 or config.context_parallel != 1:
            raise RecipeError(f"backend.tensor_parallel / context_parallel need backend.name=megatron, "
                              f"not {config.name}")
        return world_size
    model_parallel = config.tensor_parallel * config.context_parallel
    if model_parallel < 1 or world_size % model_parallel:
        raise RecipeError(f"the world size {world_size} is not a multiple of backend.tensor_parallel x "
                          f"backend.context_parallel = {config.tensor_parallel} x {config.context_parallel}")
    return world_size // model_parallel


def backend_class(config: BackendConfig, world_size: int = 1):
    """The backend class of ``backend.name``, once the settings are known to be possible (RecipeError if not).
    DeepSpeed and megatron-core are imported only when they are the one asked for."""
    if config.name == "torch":
        for key in ("bf16", "offload_optimizer"):
            if getattr(config, key):
                raise RecipeError(f"backend.{key} = true needs backend.name=deepspeed; the torch backend trains in "
                                  "fp32 with the optimizer on the device")
        return TorchBackend
    if config.name == "deepspeed":
        from ..parallel.deepspeed import DeepSpeedBackend, check_config

        check_config(config)
        return DeepSpeedBackend
    if config.name == "megatron":
        from ..parallel.megatron import MegatronBackend, check_config

        check_config(config, world_size)
        return MegatronBackend
    raise RecipeError(f"backend.name = {config.name!r} is not implemented in the trainer; use torch, deepspeed "
                      "or megatron")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.started = time.monotonic()  # time_limit_minutes counts from here
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.data_world = data_parallel_size(cfg.backend, self.world)
        cfg.validate(self.data_world)  # impossible recipes fail here, before any model or data work
        self.backend_class = backend_class(cfg.backend, self.world)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        self.run_dir = Path(cfg.run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        if self.rank == 0:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._barrier()
        from ..tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.student)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self.teacher = None
        self._check_trainable_patterns()

    def _check_trainable_patterns(self) -> None:
        """Every stage's trainable / frozen pattern must match a parameter of the student: checked on a
        meta-device copy built from config.json, so a typo fails before any weights or data are loaded."""
        from .params import TrainableSelectionError, match_parameters

        model_class = model_class_of(self.cfg.student)
        config = model_class.load_config(self.cfg.student)
        with torch.device("meta"):
            skeleton = model_class(config)
        for stage in self.cfg.stages:
            for key, patterns in (("trainable", stage.trainable), ("frozen", stage.frozen)):
                for pattern in patterns:
                    if not match_parameters(skeleton, pattern):
                        raise TrainableSelectionError(
                            f"stages[{stage.name}].{key}: pattern {pattern!r} matches no parameter of "
                            f"{self.cfg.student} (shortcuts: all, lightning, sparse, mixers, mlp, norms, "
                            f"embeddings; or a glob over names like model.layers.0.self_attn.q_proj.weight)")

    # -- helpers ------------------------------------------------------------------------------------
    def _barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def _load_student(self, path: Path):
        model = model_class_of(path).from_pretrained(path, dtype="float32", device=self.device)
        if self.cfg.backend.activation_checkpointing:
            model.gradient_checkpointing_enable(layers=self.cfg.backend.checkpoint_layers)
        return model.train()

    def _load_teacher(self):
        if self.teacher is None and self.cfg.teacher:
            from ..models import MiniCPMForCausalLM

            self.teacher = MiniCPMForCausalLM.from_pretrained(self.cfg.teacher, dtype="float32", device=self.device)
            self.teacher.requires_grad_(False)
        return self.teacher

    def _peak_memory_gib(self) -> float:
        """The largest peak of allocated GPU memory over the ranks since the start (GiB; a collective)."""
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.device) / 2**30], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return float(peak)

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["global_step"])

    def _start_wandb(self):
        mode = self.cfg.logging.wandb
        if mode == "disabled" or self.rank != 0:
            return
        try:
            import wandb
        except ImportError:
            log.warning("logging.wandb = %s but wandb is not installed (pip install 'sala-train[wandb]'); "
                        "metrics go to %s only", mode, self.metrics_file)
            return
        from omegaconf import OmegaConf

        self.wandb = wandb.init(project=self.cfg.logging.project, name=self.cfg.logging.run_name, mode=mode,
                                dir=str(self.run_dir), config=OmegaConf.to_container(OmegaConf.structured(self.cfg)),
                                resume="allow", id=self._wandb_id())

    def _wandb_id(self) -> str:
        id_file = self.run_dir / "wandb_id.txt"
        if not id_file.exists():
            id_file.write_text(f"sala-{int(time.time())}-{random.randrange(1 << 30):x}")
        return id_file.read_text().strip()

    # -- checkpoints --------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        found = sorted(p for p in self.checkpoints.glob("stage-*-step-*") if (p / "trainer_state.json").exists())
        return found[-1] if found else None

    def save_checkpoint(self, backend, loader, state: dict, optimizer: bool = True) -> Path:
        """model (HF layout), optimizer (optimizer=False: left out), loader position, RNG and counters in one
        atomically written folder. Every rank calls it: a backend may write one file per rank (ZeRO shards),
        first into a scratch folder beside the checkpoints (a filesystem all ranks share) that rank 0 then
        moves into the staging folder it renames into place."""
        name = f"stage-{state['stage_index']:02d}-step-{state['step']:08d}"
        path = self.checkpoints / name
        loader_state = loader.state_dict() if loader is not None else None
        scratch = self.checkpoints / f".{name}.backend"
        if self.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)  # left by a run killed while saving
            scratch.mkdir()
        self._barrier()
        if optimizer:
            backend.save(scratch)
        self._barrier()
        with backend.full_weights():
            if self.rank == 0:
                with atomic_directory(path) as staging:
                    backend.module.save_pretrained(staging / "model")
                    for entry in scratch.iterdir():
                        entry.rename(staging / entry.name)
                    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, staging / "rng.pt")
                    write_json_atomic(staging / "trainer_state.json", {**state, "loader": loader_state})
                scratch.rmdir()
                for old in sorted(self.checkpoints.glob("stage-*-step-*"))[: -self.cfg.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return path

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Every stage; on SIGUSR1 / SIGTERM, a checkpoint after the current step, then Preempted (exit code 75)."""
        if self.rank == 0:
            (self.run_dir / MARKER_NAME).unlink(missing_ok=True)  # left by a preempted run that this one resumes
        with watch_preemption() as self.preemption:
            self.preemption.set_time_limit(self.started, self.cfg.time_limit_minutes)
            return self._run_stages()

    def _run_stages(self) -> Path:
        cfg = self.cfg
        self._start_wandb()
        resume = self.latest_checkpoint() if cfg.resume else None
        if resume is not None:
            state = json.loads((resume / "trainer_state.json").read_text())
            log.info("resuming from %s (stage %d, step %d)", resume, state["stage_index"], state["step"])
            model = self._load_student(resume / "model")
        else:
            state = {"stage_index": cfg.start_stage, "step": 0, "global_step": 0, "bad_steps": 0}
            model = self._load_student(Path(cfg.student))
        for index in range(state["stage_index"], len(cfg.stages)):
            at_start = resume is None or index != state["stage_index"] or state["step"] == 0
            model = self.run_stage(index, model, None if at_start else (resume, state), state)
            state = {"stage_index": index + 1, "step": 0, "global_step": state["global_step"], "bad_steps": 0}
        self._finish()
        return self.run_dir

    def run_stage(self, index: int, model, resume, state: dict):
        cfg = self.cfg
        stage: StageConfig = cfg.stages[index]
        accumulation, steps = stage.plan(self.data_world)
        set_sparse(model, stage.sparse)
        select_trainable(model, stage.trainable, stage.frozen)
        opt = stage.optimizer
        flops_per_token = training_flops_per_token(model, stage.seq_len)  # of the whole model, before any split
        backend = self.backend_class(model, param_groups(model, stage.schedule.lr, opt.weight_decay, mup=opt.mup),
                                     stage, accumulation, world_size=self.world, device=self.device,
                                     config=cfg.backend)
        schedule = build_schedule(replace(stage.schedule, total_steps=stage.schedule.total_steps or steps))
        data_cfg = replace(stage.data, seq_len=stage.seq_len, batch_size=stage.micro_batch_size,
                           seed=stage.data.seed + 1000 * index)
        loader = PackedLoader(data_cfg, self.tokenizer, rank=getattr(backend, "data_parallel_rank", self.rank),
                              world_size=self.data_world)
        step = 0
        if resume is not None:
            path, saved = resume
            step = saved["step"]
            backend.load(path)
            loader.load_state_dict(saved["loader"])
            rng = torch.load(path / "rng.pt", weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
        else:
            torch.manual_seed(cfg.seed + index)
        teacher = self._load_teacher() if "kl" in stage.loss else None
        progress = None
        if cfg.logging.progress and self.rank == 0:
            from tqdm import tqdm

            progress = tqdm(total=steps, initial=step, desc=f"stage {index} {stage.name}", unit="step")
        tokens_per_step = stage.seq_len * stage.micro_batch_size * self.data_world * accumulation
        peak = (peak_flops(self.device) or 0.0) * self.world
        bad = state.get("bad_steps", 0)
        last_line = time.perf_counter()
        while step < steps:
            started = time.perf_counter()
            lr = schedule.lr_at(step)
            set_learning_rate(backend.optimizer, lr)
            total_loss = 0.0
            for micro in range(accumulation):
                batch = {k: v.to(self.device) for k, v in next(loader).items()}
                with backend.accumulating(micro == accumulation - 1):
                    loss = self._loss(backend.model, teacher, batch, stage) / accumulation
                    backend.backward(loss)
                total_loss += loss.detach()
            if self.world > 1:
                dist.all_reduce(total_loss)
                total_loss /= self.world
            grad_norm, finite = backend.step(loss_finite=bool(torch.isfinite(total_loss)))
            if finite:
                bad = 0
            else:
                bad += 1
                log.warning("stage %s step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped "
                            "(%d in a row)", stage.name, step, float(total_loss), float(grad_norm), bad)
                if bad >= cfg.max_bad_steps:
                    raise TrainingStopped(f"stage {stage.name}: {bad} consecutive non-finite steps at step {step}; "
                                          f"the last checkpoint is in {self.checkpoints}")
            step += 1
            state["global_step"] += 1
            elapsed = time.perf_counter() - started
            record = {"stage": stage.name, "stage_index": index, "loss_kind": stage.loss, "step": step,
                      "global_step": state["global_step"],
                      "loss": float(total_loss), "lr": lr, "grad_norm": float(grad_norm), "skipped": not finite,
                      "tokens_per_s": tokens_per_step / max(elapsed, 1e-9)}
            record["model_tflops"] = record["tokens_per_s"] * flops_per_token / 1e12
            if peak:
                record["mfu"] = record["tokens_per_s"] * flops_per_token / peak
            if step % max(stage.log_every, 1) == 0 or step == steps:  # the same steps on every rank
                if self.device.type == "cuda":
                    record["peak_memory_gib"] = self._peak_memory_gib()  # a collective: only on logged steps
                self._log(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            elif self.rank == 0 and (time.perf_counter() - last_line >= cfg.logging.log_seconds or step in (1, steps)):
                last_line = time.perf_counter()
                remaining = (steps - step) * elapsed
                log.info("stage %d %s: step %d/%d, loss %.4f, lr %.2e, %.0f tokens/s, about %d min %02d s left",
                         index, stage.name, step, steps, record["loss"], lr, record["tokens_per_s"],
                         remaining // 60, remaining % 60)
            preempted = self.preemption.requested()  # the same answer on every rank
            if preempted or (stage.save_every and step % stage.save_every == 0 and step < steps):
                saved = {"stage_index": index, "step": step, "global_step": state["global_step"], "bad_steps": bad}
                self.save_checkpoint(backend, loader, saved)
            if preempted:
                self.preemption.stop(self.run_dir, self.rank, saved)
        if progress is not None:
            progress.close()
        path = self.save_checkpoint(backend, None, {"stage_index": index + 1, "step": 0,
                                                    "global_step": state["global_step"], "bad_steps": 0},
                                    optimizer=False)
        backend.close()
        if not backend.keeps_model:  # the backend hooked or partitioned the module: go on from the saved weights
            model = self._load_student(path / "model")
        if stage.export and self.rank == 0:
            model.save_pretrained(self.run_dir / "export" / stage.name, tokenizer=self.tokenizer)
        if self.cfg.eval_lengths and self.rank == 0:
            self._log({"stage": stage.name, "stage_index": index, "global_step": state["global_step"],
                       **evaluate_at_lengths(model, self.tokenizer, self.cfg.eval_lengths)})
        self._barrier()
        return model

    def _loss(self, model, teacher, batch: dict, stage: StageConfig) -> torch.Tensor:
        out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
        if stage.loss in ("ce", "sft"):
            return out.loss
        with torch.no_grad():
            teacher_logits = teacher(batch["input_ids"], position_ids=batch["position_ids"]).logits
        mask = next_token_mask(batch["labels"], position_ids=batch["position_ids"])
        kl = kl_distillation(out.logits, teacher_logits, mask, temperature=stage.kl_temperature)
        return kl * stage.kl_weight if stage.loss == "kl" else out.loss + stage.kl_weight * kl

    def _finish(self) -> None:
        if self.rank == 0:
            plot_losses(self.metrics_file, self.run_dir / "loss_curve.png")
        if self.wandb is not None:
            self.wandb.finish()
        self._barrier()


# bf16 dense tensor-core peaks (FLOP/s) by device name; MFU is reported where the card is known
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "H800": 989e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def training_flops_per_token(model, seq_len: int) -> float:
    """Model FLOPs of one trained token: 6 x parameters (forward + backward matmuls; embeddings excluded), plus
    the mixers' sequence terms: causal softmax attention 6 * 2 * T/2 * H*d per sparse layer (dense bound; the
    sparse kernels do less), and the lightning chunked form ~ 6 * 2 * 2 * d * H*d per lightning layer."""
    config = model.config
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    flops = 6.0 * params
    inner = config.num_attention_heads * config.head_dim
    for kind in getattr(config, "mixer_types", ["minicpm4"] * config.num_hidden_layers):
        if kind == "lightning-attn":
            flops += 6 * 4 * config.lightning_head_dim * config.lightning_nh * config.lightning_head_dim
        else:
            flops += 6 * 2 * (seq_len / 2) * inner
    return flops


@torch.no_grad()
def evaluate_at_lengths(model, tokenizer, lengths, *, num_sequences: int = 2, text_file=None) -> dict[str, float]:
    """Stage-end evaluation: held-out loss and passkey retrieval (mean answer log-probability) at each
    context length, on the text committed with sala-train unless ``text_file`` is given."""
    from ..layer_selection.corpus import load_corpus
    from ..layer_selection.tasks import HeldoutLoss, passkey_examples, score_answers
    from ..tokenizer import DEFAULT_SAMPLE_TEXT

    was_training = model.training
    model.eval()
    corpus = load_corpus([text_file or DEFAULT_SAMPLE_TEXT], tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = {}
    for length in lengths:
        if corpus.heldout_tokens.numel() >= length:
            results[f"eval/loss@{length}"] = HeldoutLoss(corpus.heldout_tokens, length, num_sequences, 1)(
                model, tokenizer)["loss"]
        examples = passkey_examples(tokenizer, num_sequences, length, seed=0)
        results[f"eval/passkey_logprob@{length}"] = score_answers(model, examples, 1, pad)["logprob"]
    model.train(was_training)
    return results


def plot_losses(metrics_file: Path, out: Path) -> Path | None:
    """Loss per global step from metrics.jsonl: one panel per kind of loss (KL and cross-entropy live on
    different scales), one colour per stage."""
    if not metrics_file.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in (json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip())
               if "loss" in r]
    kinds = list(dict.fromkeys(r.get("loss_kind", "loss") for r in records))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows_of_kind = [r for r in records if r.get("loss_kind", "loss") == kind]
        for stage in dict.fromkeys(r["stage"] for r in rows_of_kind):
            rows = [r for r in rows_of_kind if r["stage"] == stage]
            ax.plot([r["global_step"] for r in rows], [r["loss"] for r in rows], marker=".", label=stage)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"training loss ({kind})")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
