"""Megatron-core backend of the staged trainer (``backend.name: megatron``): tensor parallelism (TP) with
megatron-core's parallel layers and process groups, and our context parallelism (CP, context_parallel.py)
on megatron's CP group, for the long-context stages.

    backend:
      name: megatron
      tensor_parallel: 2        # heads and MLP columns split over 2 ranks
      context_parallel: 2       # every sequence split (zigzag) over 2 ranks
    # data-parallel size = world size / (tensor_parallel * context_parallel)

Ranks are laid out as megatron's default order tp-cp-dp (TP neighbours adjacent). The single-device model is
parallelised here, from outside, in one place (``tensor_parallelize``):

    column parallel (output split)   q_proj, k_proj, v_proj, o_gate, z_proj, gate_proj, up_proj
    row parallel (input split)       o_proj, down_proj (their output all-reduced over TP)
    split like the heads             lightning o_norm (variance all-reduced over TP: the norm is over all H*d),
                                     lightning per-head decay (gamma depends on the head index)
    replicated                       embeddings, lm_head, the layer norms, q_norm / k_norm (their gradients are
                                     partial sums over each rank's heads: all-reduced over TP before the step)

Gradients: every rank's loss is its CP part of the whole sequence (context_parallel.ContextParallelModel),
so gradients are summed over CP and averaged over DP in one all-reduce on megatron's data-parallel-with-CP
group, after the last micro-batch; the clipping norm is taken over these full gradients.
``backend.bf16``: the forward runs under bf16 autocast (matmuls and attention in bf16); weights, gradients
and AdamW stay fp32.

Optimizer: torch's AdamW over our muP groups. The ranks of one data-parallel-with-CP group hold the same
parameters (one TP shard); with ``backend.shard_optimizer`` (default: on wherever that group has more than
one rank) torch's ZeroRedundancyOptimizer splits the AdamW state over them (ZeRO-1): each parameter is
owned by one rank of the group (whole parameters, greedily balanced by size), that rank's AdamW updates it
and broadcasts it to the others. The state, 8 bytes per parameter in fp32, drops to about 1/N of it per rank;
weights and gradients stay whole (megatron's DistributedOptimizer, which would also shard those, needs CUDA
and its own DDP wrapper). The cost: a broadcast of the parameters after every step, on top of the gradient
all-reduce (1.5x the traffic of plain data parallelism). Off, AdamW is replicated on every rank.

Checkpoints: ``save`` writes, per TP rank, that rank's parameter shards (``megatron/tp-RR-of-TT.pt``, by the
first CP and DP rank) with the optimizer state when it is replicated; sharded, every rank writes its own AdamW
state (``megatron/tp-RR-of-TT-optimizer-SS-of-NN.pt``, SS its rank in the data-parallel-with-CP group of size
NN). All files go to the trainer's scratch folder, which becomes part of the atomically renamed checkpoint.
The trainer's HF export gathers the full weights (``full_weights``). Any TP/CP layout starts from an HF
checkpoint: every rank loads it whole and keeps its slices. Resuming needs the same tensor_parallel, and for
a sharded optimizer the same context_parallel x data-parallel size and trainable parameters.

KL distillation (stage 1, short sequences) runs the frozen teacher unsplit on every rank of a CP group and
compares it with the student's gathered logits; the long stages' cross-entropy never gathers the logits.

The model code knows nothing of this: TP replaces modules, CP replaces the mixers' ops.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..train.config import BackendConfig, RecipeError, StageConfig
from .context_parallel import ContextParallelModel, all_reduce_sum
from .deepspeed import ensure_process_group

CHECKPOINT_FOLDER = "megatron"
GRADIENT_BUCKET = 2**26  # elements per all-reduce (256 MiB in fp32): no full flat copy of the gradients
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "o_gate", "z_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def import_megatron():
    try:
        from megatron.core import parallel_state, tensor_parallel
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("megatron"):
            raise
        raise ModuleNotFoundError("backend.name=megatron needs megatron-core; install it with: "
                                  "pip install 'sala-train[megatron]'", name="megatron") from error
    return parallel_state, tensor_parallel


def model_parallel_size(backend: BackendConfig) -> int:
    return backend.tensor_parallel * backend.context_parallel


def check_config(backend: BackendConfig, world_size: int) -> None:
    """Fail before any model or data work: megatron-core missing, or sizes that do not divide the world."""
    import_megatron()
    for key in ("tensor_parallel", "context_parallel"):
        if getattr(backend, key) < 1:
            raise RecipeError(f"backend.{key} = {getattr(backend, key)} must be >= 1")
    if world_size % model_parallel_size(backend):
        raise RecipeError(f"the world size {world_size} is not a multiple of backend.tensor_parallel x "
                          f"backend.context_parallel = {backend.tensor_parallel} x {backend.context_parallel}")
    if backend.bf16 and not torch.cuda.is_available():
        # megatron's parallel linears restore autocast in their backward pass for CUDA only
        raise RecipeError("backend.bf16 = true on the megatron backend is CUDA bf16 autocast; without a GPU train "
                          "in fp32 (backend.bf16=false)")
    if backend.offload_optimizer:
        raise RecipeError("backend.offload_optimizer is a deepspeed setting; the megatron backend keeps the "
                          "optimizer on the device")


def check_stage(stage: StageConfig, backend: BackendConfig) -> None:
    chunks = 2 * backend.context_parallel
    if backend.context_parallel > 1 and stage.seq_len % chunks:
        raise RecipeError(f"stages[{stage.name}].seq_len = {stage.seq_len} must be a multiple of 2 x "
                          f"backend.context_parallel = {chunks} (the zigzag split cuts every sequence in {chunks})")


@dataclass
class ParallelLayout:
    """This rank's place in the megatron layout and its process groups."""

    tensor_parallel: int
    context_parallel: int
    data_parallel: int
    tensor_rank: int
    context_rank: int
    data_rank: int
    tensor_group: object
    context_group: object
    data_context_group: object  # data parallel x context parallel: where gradients are reduced


def initialize_parallel_state(tensor_parallel: int, context_parallel: int) -> ParallelLayout:
    """megatron's process groups for these sizes (initialised once per process, kept across stages)."""
    parallel_state, _ = import_megatron()
    ensure_process_group()
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel
                or parallel_state.get_context_parallel_world_size() != context_parallel):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 context_parallel_size=context_parallel,
                                                 create_gloo_process_groups=False)
    ps = parallel_state
    return ParallelLayout(
        tensor_parallel, context_parallel, ps.get_data_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(), ps.get_data_parallel_rank(),
        ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group(),
        ps.get_data_parallel_group(with_context_parallel=True))


# ---------------------------------------------------------------------------------------------------------
# Tensor parallelism
# ---------------------------------------------------------------------------------------------------------

@functools.cache
def parallel_linear_classes():
    """megatron's Column/RowParallelLinear returning only the output (their forward returns (output, bias));
    subclasses, so that the weight keeps the name ``<proj>.weight`` of the nn.Linear it replaces."""
    _, tensor_parallel = import_megatron()

    class ColumnParallel(tensor_parallel.ColumnParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    class RowParallel(tensor_parallel.RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    return ColumnParallel, RowParallel


class TensorParallelRMSNorm(nn.Module):
    """RMSNorm over a vector split across the TP group: the sum of squares is all-reduced, so each rank
    normalises its slice by the variance of the whole vector (the lightning o_norm over all H*d)."""

    def __init__(self, weight: torch.Tensor, eps: float, full_size: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.eps, self.full_size, self.group = eps, full_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        square_sum = all_reduce_sum(x.pow(2).sum(-1, keepdim=True), self.group)
        x = x * torch.rsqrt(square_sum / self.full_size + self.eps)
        return self.weight * x.to(input_dtype)


def _slice(tensor: torch.Tensor, dim: int, rank: int, size: int, what: str) -> torch.Tensor:
    if tensor.shape[dim] % size:
        raise ValueError(f"{what}: dimension {dim} of size {tensor.shape[dim]} does not split over "
                         f"tensor_parallel = {size}")
    return tensor.detach().chunk(size, dim)[rank].clone()


def _divide(value: int, size: int, what: str) -> int:
    if value % size:
        raise ValueError(f"{what} = {value} is not divisible by backend.tensor_parallel = {size}; pick a "
                         "tensor-parallel size that divides the heads (KV heads included)")
    return value // size


def tensor_parallelize(model: nn.Module, layout: ParallelLayout) -> tuple[dict[str, int], list[str]]:
    """Split ``model`` (a single-device MiniCPMSALAForCausalLM, full weights) over the TP group, in place.

    Returns (``shard_dims``: parameter name -> the dim it is split along, ``partial``: replicated parameters
    whose gradients are partial sums over each rank's heads). requires_grad is kept.
    """
    from megatron.core.model_parallel_config import ModelParallelConfig

    from ..models.layers import SwiGLU
    from ..models.sala.modeling_minicpm_sala import LightningMixer, SparseMixer

    size, rank, group = layout.tensor_parallel, layout.tensor_rank, layout.tensor_group
    dtype = next(model.parameters()).dtype
    config = ModelParallelConfig(tensor_model_parallel_size=size, context_parallel_size=layout.context_parallel,
                                 use_cpu_initialization=True, perform_initialization=False,
                                 gradient_accumulation_fusion=False, sequence_parallel=False, params_dtype=dtype)
    column, row = parallel_linear_classes()
    shard_dims, partial = {}, []
    for prefix, module in list(model.named_modules()):
        if not isinstance(module, (SparseMixer, LightningMixer, SwiGLU)):
            continue
        where = f"{prefix}." if prefix else ""
        for name in COLUMN_PARALLEL + ROW_PARALLEL:
            linear = getattr(module, name, None)
            if not isinstance(linear, nn.Linear):
                continue
            dim = 0 if name in COLUMN_PARALLEL else 1
            weight = _slice(linear.weight, dim, rank, size, f"{where}{name}.weight")
            if dim == 0:
                parallel = column(linear.in_features, linear.out_features, config=config, init_method=nn.init.zeros_,
                                  bias=False, gather_output=False, skip_bias_add=True)
            else:
                parallel = row(linear.in_features, linear.out_features, config=config, init_method=nn.init.zeros_,
                               bias=False, input_is_parallel=True, skip_bias_add=True)
            with torch.no_grad():
                parallel.weight.copy_(weight)
            parallel.to(linear.weight.device)
            parallel.weight.requires_grad_(linear.weight.requires_grad)
            setattr(module, name, parallel)
            shard_dims[f"{where}{name}.weight"] = dim
        if isinstance(module, SparseMixer):
            module.num_heads = _divide(module.num_heads, size, f"{where}num_heads")
            module.num_kv_heads = _divide(module.num_kv_heads, size, f"{where}num_key_value_heads")
        if isinstance(module, LightningMixer):
            heads = module.num_heads
            module.num_heads = _divide(heads, size, f"{where}lightning_nh")
            module.decay = module.decay.chunk(size)[rank].clone()
            module._decay_on_device = {}
            if module.o_norm is not None:
                norm = module.o_norm
                tp_norm = TensorParallelRMSNorm(_slice(norm.weight, 0, rank, size, f"{where}o_norm.weight"),
                                                norm.eps, norm.weight.shape[0], group)
                tp_norm.weight.requires_grad_(norm.weight.requires_grad)
                module.o_norm = tp_norm
                shard_dims[f"{where}o_norm.weight"] = 0
        if isinstance(module, (SparseMixer, LightningMixer)):
            partial += [f"{where}{name}.weight" for name in ("q_norm", "k_norm") if getattr(module, name) is not None]
    return shard_dims, partial


def gather_full(tensors: dict[str, torch.Tensor], shard_dims: dict[str, int], layout: ParallelLayout) -> dict:
    """Full tensors from every TP rank's shards (collective over the TP group); others are returned as they are."""
    full = {}
    for name, tensor in tensors.items():
        dim = shard_dims.get(name)
        if dim is None or layout.tensor_parallel == 1:
            full[name] = tensor
            continue
        pieces = [torch.empty_like(tensor) for _ in range(layout.tensor_parallel)]
        dist.all_gather(pieces, tensor.contiguous(), group=layout.tensor_group)
        full[name] = torch.cat(pieces, dim).cpu()  # one tensor at a time on the device
    return full


# ---------------------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------------------

class Autocast(nn.Module):
    """Runs the wrapped model's forward under autocast (bf16 compute, fp32 weights)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.inner, self.device_type, self.dtype = model, device.type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(*args, **kwargs)


def shards_optimizer(config: BackendConfig, layout: ParallelLayout) -> bool:
    """ZeRO-1 or not: ``backend.shard_optimizer``; null means on wherever several ranks hold the same parameters."""
    if config.shard_optimizer is None:
        return layout.data_parallel * layout.context_parallel > 1
    return config.shard_optimizer


def build_optimizer(groups: list[dict], stage: StageConfig, shard_group=None) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (each with ``lr_scale`` and ``weight_decay``); with ``shard_group`` a
    ZeroRedundancyOptimizer that gives each rank of that group the AdamW state of its share of the parameters.
    Its ``param_groups`` are the whole groups, so ``set_learning_rate`` works as on a plain AdamW; it copies
    their hyperparameters to the local AdamW at every step."""
    opt = stage.optimizer
    hyper = dict(lr=stage.schedule.lr, betas=tuple(opt.betas), eps=opt.eps)
    if shard_group is None:
        return torch.optim.AdamW(groups, **hyper)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    # each rank's AdamW gets a subset of every group's parameters: the names would no longer line up with them
    groups = [{key: value for key, value in group.items() if key != "param_names"} for group in groups]
    return ZeroRedundancyOptimizer(groups, torch.optim.AdamW, process_group=shard_group, **hyper)


class MegatronBackend:
    """TP x CP x DP around ``model`` for one stage; ``model`` (a ContextParallelModel when CP > 1) is what the
    loss calls, with the whole batch of this data-parallel rank."""

    keeps_model = False  # modules are replaced by their TP shards: the next stage reloads the saved weights

    def __init__(self, model: nn.Module, groups: list[dict], stage: StageConfig, accumulation: int, *,
                 world_size: int, device: torch.device, config: BackendConfig):
        check_config(config, world_size)
        check_stage(stage, config)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL communicators live on the current device
        self.layout = initialize_parallel_state(config.tensor_parallel, config.context_parallel)
        self.shard_dims, self.partial_grads = {}, []
        if self.layout.tensor_parallel > 1:
            self.shard_dims, self.partial_grads = tensor_parallelize(model, self.layout)
        self._module = model.to(device)
        self._export = None
        self.model = ContextParallelModel(model, self.layout.context_group) if self.layout.context_parallel > 1 else model
        if config.bf16:
            self.model = Autocast(self.model, device)
        # the groups were built on the full model: point them at the parameters that replaced those
        params = dict(model.named_parameters())
        groups = [{**group, "params": [params[name] for name in group["param_names"]]} for group in groups]
        self.sharded = shards_optimizer(config, self.layout)
        self.optimizer = build_optimizer(groups, stage, self.layout.data_context_group if self.sharded else None)
        self.grad_clip = stage.optimizer.grad_clip

    @property
    def data_parallel_rank(self) -> int:
        return self.layout.data_rank

    @property
    def module(self) -> nn.Module:
        """The parallel model; inside ``full_weights()`` (on global rank 0) the full single-device model."""
        return self._export if self._export is not None else self._module

    def accumulating(self, last_micro_batch: bool):
        return nullcontext()  # gradients are reduced once, in step()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self._module.named_parameters() if p.requires_grad]

    def reduce_gradients(self) -> None:
        """Sum over CP and mean over DP (flat all-reduces of buckets), and sum the partial gradients over TP."""
        trainable = self._trainable()
        for _, p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        layout = self.layout
        if layout.data_parallel * layout.context_parallel > 1:
            bucket, size = [], 0
            for _, p in trainable:
                bucket.append(p.grad)
                size += p.numel()
                if size >= GRADIENT_BUCKET:
                    self._all_reduce_bucket(bucket)
                    bucket, size = [], 0
            if bucket:
                self._all_reduce_bucket(bucket)
        if layout.tensor_parallel > 1:
            for name, p in trainable:
                if name in self.partial_grads:
                    dist.all_reduce(p.grad, group=layout.tensor_group)

    def _all_reduce_bucket(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.layout.data_context_group)
        flat /= self.layout.data_parallel
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of the whole model's gradient: TP shards summed over the TP group, replicas counted once."""
        squares = torch.zeros(2, dtype=torch.float64, device=self._device())  # sharded, replicated
        for name, p in self._trainable():
            squares[0 if name in self.shard_dims else 1] += p.grad.detach().double().pow(2).sum()
        if self.layout.tensor_parallel > 1:
            dist.all_reduce(squares[:1], group=self.layout.tensor_group)
        return squares.sum().sqrt().cpu()

    def _device(self) -> torch.device:
        return next(self._module.parameters()).device

    def step(self, loss_finite: bool) -> tuple[float, bool]:
        """Reduce, clip, AdamW unless the loss or the gradient is not finite: (norm before clipping, applied)."""
        self.reduce_gradients()
        norm = self.grad_norm()
        applied = loss_finite and bool(torch.isfinite(norm))
        if applied:
            if self.grad_clip > 0 and float(norm) > self.grad_clip:
                coefficient = self.grad_clip / (float(norm) + 1e-6)
                for _, p in self._trainable():
                    p.grad.mul_(coefficient)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), applied

    def full_state(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Full tensors (collective over the TP group): the parameters, or ``tensors`` named like them."""
        if tensors is None:
            tensors = {name: p.detach() for name, p in self._module.named_parameters(remove_duplicate=False)}
        return gather_full(tensors, self.shard_dims, self.layout)

    @contextmanager
    def full_weights(self):
        """Inside the block, ``module`` on global rank 0 is a single-device model with the full weights (for
        the HF export); every rank must enter it (the shards are gathered over the TP groups)."""
        if self.layout.context_rank == 0 and self.layout.data_rank == 0:  # the TP group of global rank 0
            state = self.full_state()
            if dist.get_rank() == 0:
                self._export = self._single_device_copy({name: t.cpu() for name, t in state.items()})
        try:
            yield
        finally:
            self._export = None

    def _single_device_copy(self, state: dict[str, torch.Tensor]) -> nn.Module:
        module = self._module
        with torch.device("meta"):
            full = type(module)(module.config)
        expected = full.state_dict().keys()
        missing = [name for name in expected if name not in state]
        if missing:
            raise RuntimeError(f"the gathered weights lack {missing[:5]}... (of {len(missing)}); was a module "
                               "added to the model without a rule in tensor_parallelize?")
        full.load_state_dict({name: state[name] for name in expected}, assign=True)
        if module.config.tie_word_embeddings:
            full.lm_head.weight = full.model.embed_tokens.weight
        return full

    @property
    def local_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW whose state this rank keeps: its shard's (sharded), or the whole one."""
        return self.optimizer.optim if self.sharded else self.optimizer

    def owned_parameters(self) -> list[str]:
        """Names of the parameters whose AdamW state this rank keeps, in the local optimizer's order."""
        names = {id(p): name for name, p in self._module.named_parameters()}
        return [names[id(p)] for group in self.local_optimizer.param_groups for p in group["params"]]

    def _shard_file(self, directory: Path) -> Path:
        layout = self.layout
        return (Path(directory) / CHECKPOINT_FOLDER
                / f"tp-{layout.tensor_rank:02d}-of-{layout.tensor_parallel:02d}.pt")

    def _optimizer_file(self, directory: Path) -> Path:
        zero = self.optimizer  # its rank and size: this rank's place in the data-parallel-with-CP group
        shard = self._shard_file(directory)
        return shard.with_name(f"{shard.stem}-optimizer-{zero.rank:02d}-of-{zero.world_size:02d}.pt")

    def save(self, directory: Path) -> None:
        """The first CP and DP rank of each TP rank writes that rank's parameter shards, with the optimizer
        state if it is replicated; sharded, every rank writes its own AdamW state."""
        (Path(directory) / CHECKPOINT_FOLDER).mkdir(exist_ok=True)
        if self.layout.context_rank == 0 and self.layout.data_rank == 0:
            model = {name: p.detach().cpu() for name, p in self._module.named_parameters()}
            torch.save({"tensor_parallel": self.layout.tensor_parallel, "model": model,
                        "optimizer": None if self.sharded else self.optimizer.state_dict()},
                       self._shard_file(directory))
        if self.sharded:
            torch.save({"parameters": self.owned_parameters(), "optimizer": self.local_optimizer.state_dict()},
                       self._optimizer_file(directory))

    def load(self, directory: Path) -> None:
        path = self._shard_file(directory)
        found = sorted(p.name for p in (Path(directory) / CHECKPOINT_FOLDER).glob("*.pt"))
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no megatron shard for tensor-parallel rank {self.layout.tensor_rank} of "
                f"{self.layout.tensor_parallel} (found: {found or 'none'}). Resume with the backend and "
                "backend.tensor_parallel that wrote it, or start the stage afresh from its HF weights (resume=false)")
        # on the CPU (memory-mapped): the ranks of a TP shard read the same file, and the device keeps room
        saved = torch.load(path, weights_only=False, map_location="cpu", mmap=True)
        params = dict(self._module.named_parameters())
        with torch.no_grad():
            for name, tensor in saved["model"].items():
                params[name].copy_(tensor)
        if not self.sharded:
            if saved["optimizer"] is None:
                raise FileNotFoundError(
                    f"{path} was written with a sharded optimizer (backend.shard_optimizer; found: {found}); "
                    "resume with the same backend.shard_optimizer and layout, or start the stage afresh (resume=false)")
            self.optimizer.load_state_dict(saved["optimizer"])
            return
        shard = self._optimizer_file(directory)
        if not shard.exists():
            raise FileNotFoundError(
                f"{shard}: no optimizer shard for rank {self.optimizer.rank} of the {self.optimizer.world_size} "
                f"ranks that share the parameters of tensor-parallel rank {self.layout.tensor_rank} (found: {found}). "
                "Resume with the backend.shard_optimizer, tensor_parallel, context_parallel and number of GPUs that "
                "wrote it, or start the stage afresh (resume=false)")
        saved = torch.load(shard, weights_only=False, map_location="cpu")
        owned = self.owned_parameters()
        if saved["parameters"] != owned:
            raise RuntimeError(
                f"{shard} holds the AdamW state of {len(saved['parameters'])} parameters "
                f"({saved['parameters'][:3]}...), but this rank now owns {len(owned)} ({owned[:3]}...): the "
                "trainable parameters or the layout changed since the checkpoint was written")
        self.local_optimizer.load_state_dict(saved["optimizer"])  # moves the state to the parameters' device

    def close(self) -> None:
        self._module = self._export = self.model = self.optimizer = None
