"""Context parallelism (CP) of our own for the hybrid model (SPEC 7): the sequence of every row is cut into
2 * cp chunks and rank r holds chunks r and 2 * cp - 1 - r ("zigzag": every rank gets one early and one late
chunk, so the causal work is balanced). The model stays single-device; ``ContextParallelModel`` splits the
batch, installs the CP ops below in place of each mixer's op, and computes the loss over the whole sequence.

    shard = ContextParallelShard.of(position_ids, group)       # what every op needs to know about the split
    local = zigzag_split(x, shard.rank, shard.size)            # [B, T, ...] -> [B, T / cp, ...]
    full  = zigzag_unsplit(gather(local), shard.size)          # the inverse, from every rank's piece

Lightning layers (LASP-2). Each local chunk runs the lightning op with a zero initial state, its documents as
cu_seqlens: a local output and the state at the chunk's end. One all-gather of those states [2, B, H, D, D]
per layer (traffic independent of the length); then every rank combines, in *sequence* order of the chunks
(not rank order: zigzag puts chunks i and 2cp-1-i together), the prefix

    S_end(c) = a(c) * S_end(c - 1) + B(c),    a(c) = 0 if a document starts in chunk c, else gamma^C

and adds the incoming state's contribution ``scale * gamma^(t+1) * q_t S_end(c - 1)`` to the tokens of the
chunk's first document piece (none when a document starts at the chunk's first token: varlen documents
never see states from before their start). The backward pass is autograd's: the all-gather's backward is
the reduce-scatter (sum) of the state gradients, i.e. LASP-2's suffix combination.

Sparse layers. K and V are all-gathered (differentiable, backward = reduce-scatter); each rank attends for
its own queries over the keys of their document up to themselves: dense causal below ``dense_len`` (by the
document's full length, as the single-device op decides), else InfLLM-V2's selection and block-sparse
attention on the document's prefix, compressed keys pooled from the gathered K. The kernels take queries and
keys of one length: the local queries stand at the end of their document's prefix behind zero rows that the
kernels skip (``q_start``), so each rank scores and attends only for its own queries.

Loss. Targets are shifted on the whole sequence before the split (a document's last token predicts nothing,
also across a rank border); each rank's cross-entropy sum is divided by the global count, and the value
reported is the CP total while the gradient is the local part (the backend sums gradients over the CP
group). The cross-entropy runs the head in chunks (``chunked_cross_entropy_sum``): a rank's fp32 logits are
never whole (19 GB at 64K tokens and V = 73448). Logits, when asked for (KL distillation), are computed from
the rank's hidden states then and gathered with a backward that keeps the local slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------
# Zigzag placement
# ---------------------------------------------------------------------------------------------------------

def zigzag_chunks(rank: int, size: int) -> tuple[int, int]:
    """The two chunks (of 2 * size) that ``rank`` holds, in the order they are stored locally."""
    return rank, 2 * size - 1 - rank


def _check_divisible(length: int, size: int, what: str = "sequence length") -> int:
    if length % (2 * size):
        raise ValueError(f"context parallelism over {size} ranks cuts every sequence into {2 * size} equal "
                         f"chunks, but the {what} {length} is not a multiple of {2 * size}; pick a seq_len "
                         f"divisible by 2 * backend.context_parallel")
    return length // (2 * size)


def zigzag_split(x: torch.Tensor, rank: int, size: int, dim: int = 1) -> torch.Tensor:
    """[.., T, ..] -> [.., T / size, ..]: chunks ``rank`` and ``2 * size - 1 - rank`` of 2 * size along ``dim``."""
    if size == 1:
        return x
    _check_divisible(x.shape[dim], size)
    chunks = x.chunk(2 * size, dim)
    first, second = zigzag_chunks(rank, size)
    return torch.cat([chunks[first], chunks[second]], dim)


def zigzag_unsplit(pieces, size: int, dim: int = 1) -> torch.Tensor:
    """The inverse of zigzag_split: ``pieces`` every rank's local tensor, in rank order (a list, or a tensor
    stacked along a new dim 0)."""
    pieces = list(pieces)
    if len(pieces) != size:
        raise ValueError(f"zigzag_unsplit needs one piece per rank ({size}), got {len(pieces)}")
    if size == 1:
        return pieces[0]
    chunks = [None] * (2 * size)
    for rank, piece in enumerate(pieces):
        first, second = zigzag_chunks(rank, size)
        chunks[first], chunks[second] = piece.chunk(2, dim)
    return torch.cat(chunks, dim)


def zigzag_token_index(seq_len: int, rank: int, size: int, device=None) -> torch.Tensor:
    """Global positions (within the row) of the local tokens of ``rank``: [seq_len / size]."""
    return zigzag_split(torch.arange(seq_len, device=device)[None], rank, size)[0]


def zigzag_split_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int, rank: int, size: int) -> torch.Tensor:
    """Packed documents of one row (cu_seqlens over ``seq_len`` tokens) -> the local cu_seqlens of ``rank``:
    each document piece on the rank is its own segment (the two local chunks never join)."""
    chunk = _check_divisible(seq_len, size)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    local = [0]
    for index, c in enumerate(zigzag_chunks(rank, size)):
        start, end = c * chunk, (c + 1) * chunk
        cuts = [b - start for b in bounds if start < b < end]
        local += [index * chunk + cut for cut in cuts] + [(index + 1) * chunk]
    return torch.tensor(local, dtype=cu_seqlens.dtype, device=cu_seqlens.device)


# ---------------------------------------------------------------------------------------------------------
# Differentiable all-gathers
# ---------------------------------------------------------------------------------------------------------

def _gather(x: torch.Tensor, group) -> torch.Tensor:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.stack(out)


class _Gather(torch.autograd.Function):
    """x -> [world, *x.shape]; the subclasses say where the gradient goes."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)


class _GatherReduceScatter(_Gather):
    """Backward: the sum over ranks of the gradients of this rank's slice (every rank's loss is a part of the
    total, so each part's gradient reaches the rank that owns the input)."""

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty_like(grad[0])
            dist.reduce_scatter(out, [g.contiguous() for g in grad.unbind(0)], group=ctx.group)
            return out, None
        grad = grad.contiguous()  # gloo has no reduce-scatter: all-reduce and keep this rank's slice
        dist.all_reduce(grad, group=ctx.group)
        return grad[rank], None


class _GatherKeepSlice(_Gather):
    """Backward: this rank's slice of the gradient only, for a result that every rank uses in the same,
    replicated computation (counted once in the total)."""

    @staticmethod
    def backward(ctx, grad):
        return grad[dist.get_rank(ctx.group)].contiguous(), None


def all_gather_parts(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``x`` stacked along a new dim 0; gradients are summed back to their owner."""
    return _GatherReduceScatter.apply(x, group)


def all_gather_replicated(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``x`` stacked along a new dim 0, for a computation all ranks repeat identically."""
    return _GatherKeepSlice.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; every rank uses the sum, so the backward sums the gradients as well."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


# ---------------------------------------------------------------------------------------------------------
# The split of one batch
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Segment:
    """A piece of one document inside one chunk: tokens [start, end) of the row (global positions), of the
    document [doc_start, doc_end); ``local`` the offset of ``start`` in the rank's local tokens."""

    start: int
    end: int
    doc_start: int
    doc_end: int
    local: int


@dataclass
class ContextParallelShard:
    """How one batch [B, T] is split over the CP group, and where its documents are."""

    group: object
    rank: int
    size: int
    batch: int
    seq_len: int
    doc_bounds: list[list[int]]  # per row: the start of every document, then T

    @property
    def chunk_len(self) -> int:
        return self.seq_len // (2 * self.size)

    @classmethod
    def of(cls, position_ids: torch.Tensor, group) -> "ContextParallelShard":
        """From the global position_ids [B, T] (documents start where the position is 0, and at every row)."""
        B, T = position_ids.shape
        distributed = dist.is_initialized()  # without a process group: one rank, the whole sequence
        size = dist.get_world_size(group) if distributed else 1
        rank = dist.get_rank(group) if distributed else 0
        _check_divisible(T, size)
        starts = (position_ids == 0).cpu()
        starts[:, 0] = True
        bounds = [torch.nonzero(row).flatten().tolist() + [T] for row in starts]
        return cls(group, rank, size, B, T, bounds)

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return zigzag_split(x, self.rank, self.size, dim)

    def chunk_segments(self, row: int, chunk: int, local_offset: int) -> list[Segment]:
        """The document pieces of chunk ``chunk`` of row ``row``, in order."""
        C = self.chunk_len
        start, end = chunk * C, (chunk + 1) * C
        bounds = self.doc_bounds[row]
        segments = []
        for doc_start, doc_end in zip(bounds[:-1], bounds[1:]):
            s, e = max(start, doc_start), min(end, doc_end)
            if s < e:
                segments.append(Segment(s, e, doc_start, doc_end, local_offset + s - start))
        return segments

    def resets(self, row: int, chunk: int) -> bool:
        """True when a document starts inside the chunk (its first token included)."""
        C = self.chunk_len
        return any(chunk * C <= b < (chunk + 1) * C for b in self.doc_bounds[row][:-1])

    def local_chunks(self, row: int) -> list[tuple[int, list[Segment]]]:
        """(global chunk index, its segments) of the two local chunks."""
        return [(c, self.chunk_segments(row, c, i * self.chunk_len))
                for i, c in enumerate(zigzag_chunks(self.rank, self.size))]


def _rows(x: torch.Tensor, shard: ContextParallelShard) -> torch.Tensor:
    """The mixers flatten packed batches to [1, B*T_local, ...]; the CP ops work on [B, T_local, ...]."""
    return x.reshape(shard.batch, -1, *x.shape[2:])


# ---------------------------------------------------------------------------------------------------------
# Lightning attention over the CP group (LASP-2)
# ---------------------------------------------------------------------------------------------------------

def lightning_attention_cp(op, q, k, v, decay, shard: ContextParallelShard, scale=None):
    """The lightning attention of the local tokens q, k, v [B, T_local, H, D] of a zigzag-split batch, as
    ``op`` (a LightningOps.attention) would give on the whole sequence; returns o [B, T_local, H, D]."""
    shape = q.shape
    q, k, v = (_rows(x, shard) for x in (q, k, v))
    B, _, H, D = q.shape
    C = shard.chunk_len
    scale = D**-0.5 if scale is None else scale
    g = decay.to(device=q.device, dtype=torch.float32)

    # 1. every local chunk from a zero state: local outputs, and the state at the chunk's end
    outputs, end_states = [], []  # end_states: [2][B] of [H, D, D]
    for i in range(2):
        chunk_outputs, chunk_states = [], []
        for b in range(B):
            rows = slice(i * C, (i + 1) * C)
            segments = shard.local_chunks(b)[i][1]
            cu = torch.tensor([0] + [s.end - s.start for s in segments], device=q.device).cumsum(0)
            o, final = op(q[b : b + 1, rows], k[b : b + 1, rows], v[b : b + 1, rows], decay, scale=scale,
                          output_final_state=True, cu_seqlens=cu)
            chunk_outputs.append(o)
            chunk_states.append(final[-1])  # the last document piece's state
        outputs.append(chunk_outputs)
        end_states.append(torch.stack(chunk_states))
    if shard.size == 1:
        return torch.cat([torch.cat(o, dim=1) for o in outputs], dim=1).reshape(shape)

    # 2. one all-gather of the chunk states, then the prefix combination in sequence order
    gathered = all_gather_parts(torch.stack(end_states), shard.group)  # [cp, 2, B, H, D, D]
    by_chunk = {}
    for rank in range(shard.size):
        for i, c in enumerate(zigzag_chunks(rank, shard.size)):
            by_chunk[c] = gathered[rank, i]
    chunk_decay = torch.exp(g * C)[:, None, None]  # gamma^C per head
    result = []
    for i, c in enumerate(zigzag_chunks(shard.rank, shard.size)):
        rows = []
        for b in range(B):
            o = outputs[i][b]
            first = shard.local_chunks(b)[i][1][0]
            if first.doc_start == c * C:  # the chunk starts a document: nothing comes in
                rows.append(o)
                continue
            incoming = None
            for previous in range(c):
                state = by_chunk[previous][b]
                if incoming is None or shard.resets(b, previous):
                    incoming = state
                else:
                    incoming = chunk_decay * incoming + state
            n = first.end - first.start
            t = torch.arange(1, n + 1, device=q.device, dtype=torch.float32)
            qs = q[b, i * C : i * C + n].float()  # [n, H, D]
            with torch.autocast(q.device.type, enabled=False):  # q S_in with the fp32 state, also under bf16 autocast
                extra = scale * torch.exp(g[None, :] * t[:, None])[..., None] * torch.einsum("thk,hkv->thv", qs,
                                                                                               incoming)
            rows.append(torch.cat([(o[0, :n].float() + extra).to(o.dtype), o[0, n:]])[None])
        result.append(torch.cat(rows))
    return torch.cat(result, dim=1).reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# Sparse (InfLLM-V2) and dense softmax attention over the CP group
# ---------------------------------------------------------------------------------------------------------

def _selection(sparse_config: dict) -> dict:
    return dict(block_size=sparse_config["block_size"], kernel_size=sparse_config["kernel_size"],
                kernel_stride=sparse_config["kernel_stride"], init_blocks=sparse_config["init_blocks"],
                local_blocks=sparse_config["window_size"] // sparse_config["block_size"],
                topk=sparse_config["topk"])


def _select_reference(q, k, q_start=0, **selection):
    from ..kernels.sparse.naive import select_blocks_reference

    return select_blocks_reference(q, k, **selection)  # computes the leading rows too: only slower


def _attend_reference(q, k, v, block_indices, q_start=0, **options):
    from ..kernels.sparse.naive import sparse_attention_reference

    return sparse_attention_reference(q, k, v, block_indices, **options)


def sparse_pieces(backend_op) -> tuple:
    """(select_blocks, sparse_attention) that match a mixer's sparse op: the plain references beside the
    torch op, the kernels' public ops (Triton on CUDA) otherwise. Both take ``q_start``."""
    from ..kernels.sparse import select_blocks, sparse_attention
    from ..models.sala.modeling_minicpm_sala import sparse_attention_torch

    if backend_op is sparse_attention_torch:
        return _select_reference, _attend_reference
    return select_blocks, sparse_attention


def _attend_document_rows(q, k, v, sparse_config: dict, doc_len: int, scale: float, pieces) -> torch.Tensor:
    """Queries q [1, n, H_q, D] at the last n of the S positions of one document's prefix k, v [1, S, H_kv, D]:
    dense causal when the whole document is shorter than dense_len, else InfLLM-V2 on the prefix (a row's
    selection depends only on its query and the keys up to it, so the prefix gives the rows of the full
    document; zero queries stand in front of the local ones, and ``q_start`` tells the kernels to skip
    their rows)."""
    from torch.nn.attention.bias import causal_lower_right

    from ..models.attention import masked_attention

    select, attend = pieces
    n, S = q.shape[1], k.shape[1]
    if doc_len < sparse_config["dense_len"]:
        return masked_attention(q, k, v, causal_lower_right(n, S), scale=scale)
    padded = torch.cat([q.new_zeros(1, S - n, *q.shape[2:]), q], dim=1)
    with torch.no_grad():  # the selection is not differentiated (SPEC 4)
        blocks = select(padded, k, scale=scale, q_start=S - n, **_selection(sparse_config))
    return attend(padded, k, v, blocks, block_size=sparse_config["block_size"], scale=scale,
                  q_start=S - n)[:, S - n :]


def sparse_attention_cp(q, k, v, sparse_config: dict, shard: ContextParallelShard, scale=None, pieces=None):
    """Softmax attention (dense / InfLLM-V2 by document length) of the local queries q [B, T_local, H_q, D]
    over the keys of the whole sequence: K and V [B, T_local, H_kv, D] are all-gathered over the CP group.
    ``pieces`` = (select_blocks, sparse_attention), default the kernels' public ops (see sparse_pieces)."""
    if pieces is None:
        from ..kernels.sparse import select_blocks, sparse_attention

        pieces = (select_blocks, sparse_attention)
    shape = q.shape
    q, k, v = (_rows(x, shard) for x in (q, k, v))
    B, T_local, Hq, D = q.shape
    scale = D**-0.5 if scale is None else scale
    kv = all_gather_parts(torch.stack([k, v]), shard.group) if shard.size > 1 else torch.stack([k, v])[None]
    k_full, v_full = zigzag_unsplit(kv, shard.size, dim=2).unbind(0)  # [B, T, H_kv, D] each
    rows = []
    # Documents at or above dense_len: the selection and the sparse kernels take queries and keys of one length,
    # so the local queries go in at the end of their document's prefix behind zero queries, whose rows the
    # kernels skip (q_start); the work left per rank is its own rows (plus the pooling of the prefix's keys).
    for b in range(B):
        for _, segments in shard.local_chunks(b):
            for s in segments:
                rows.append(_attend_document_rows(
                    q[b : b + 1, s.local : s.local + s.end - s.start], k_full[b : b + 1, s.doc_start : s.end],
                    v_full[b : b + 1, s.doc_start : s.end], sparse_config, s.doc_end - s.doc_start, scale, pieces))
    return torch.cat(rows, dim=1).reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# The model wrapper
# ---------------------------------------------------------------------------------------------------------

class ContextParallelOps:
    """The mixers' ops while a batch is split: the same call signatures as LightningOps / SparseOps.attention,
    with the split of the current batch in ``shard`` (set by ContextParallelModel before each forward; it
    stays valid for the backward, and for activation checkpointing's recomputation)."""

    def __init__(self):
        self.shard: ContextParallelShard | None = None

    def _current(self) -> ContextParallelShard:
        if self.shard is None:
            raise RuntimeError("a context-parallel op ran outside ContextParallelModel.forward: the model's "
                               "mixers use the CP ops, call the model through its ContextParallelModel")
        return self.shard

    def lightning(self, base_op):
        def attention(q, k, v, decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
            if initial_state is not None or output_final_state:
                raise ValueError("context-parallel lightning attention is for training (no cache states)")
            return lightning_attention_cp(base_op, q, k, v, decay, self._current(), scale), None

        return attention

    def sparse(self, base_op):
        pieces = sparse_pieces(base_op)

        def attention(q, k, v, sparse_config, cu_seqlens=None, scale=None):
            return sparse_attention_cp(q, k, v, sparse_config, self._current(), scale, pieces)

        return attention


def install_context_parallel_ops(model) -> ContextParallelOps:
    """Swap every mixer's training op for its CP version (decode and prefill ops stay: generation runs unsplit)."""
    from ..models.sala.modeling_minicpm_sala import LightningMixer, SparseMixer

    ops = ContextParallelOps()
    for module in model.modules():
        if isinstance(module, LightningMixer):
            module.ops = module.ops._replace(attention=ops.lightning(module.ops.attention))
        elif isinstance(module, SparseMixer):
            module.ops = module.ops._replace(attention=ops.sparse(module.ops.attention))
    return ops


HEAD_CHUNK = 2048  # positions per chunk of the cross-entropy's head: 0.6 GB of fp32 logits at V = 73448


class ContextParallelOutput:
    """The loss of the whole sequence; ``logits`` computed from this rank's hidden states, gathered and put
    back in sequence order on first use (``local_logits``: a function that returns this rank's part)."""

    def __init__(self, loss, local_logits, shard: ContextParallelShard):
        self.loss = loss
        self._local_logits = local_logits
        self._shard = shard
        self._logits = None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            shard = self._shard
            local = self._local_logits()
            gathered = all_gather_replicated(local, shard.group) if shard.size > 1 else local[None]
            self._logits = zigzag_unsplit(gathered, shard.size, dim=1)
        return self._logits


def next_token_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]; IGNORE_INDEX at the last token of every row and every document."""
    from ..train.losses import next_token_targets as targets

    return targets(labels, position_ids=position_ids)


class ContextParallelModel(torch.nn.Module):
    """Calls a single-device causal LM with its batch split over the CP group.

    ``forward(input_ids, position_ids=, labels=)`` takes the whole batch [B, T] (the same on every rank of the
    group) and returns an object with ``loss`` (the mean next-token cross-entropy of the whole batch, equal on
    every rank; its gradient is this rank's part) and ``logits`` [B, T, V] (gathered when read).
    """

    def __init__(self, module, group):
        super().__init__()
        self.module = module
        self.group = group
        self.ops = install_context_parallel_ops(module)
        rope_scaling = getattr(module.config, "rope_scaling", None)
        if rope_scaling is not None:
            # LongRoPE picks its factors by the largest position of the forward, which differs between ranks
            raise ValueError("context parallelism needs rope_scaling = null (SALA's lightning RoPE has none); "
                             f"the model's config has {rope_scaling}")

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **unused):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("context parallelism takes packed batches without padding (attention_mask has zeros)")
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        shard = ContextParallelShard.of(position_ids, self.group)
        self.ops.shard = shard
        module = self.module
        hidden, _, _ = module.model(input_ids=shard.split(input_ids), position_ids=shard.split(position_ids))
        loss = None
        if labels is not None:
            # the head in chunks: at 64K tokens per rank the fp32 logits alone would take 19 GB (V = 73448)
            from ..train.losses import chunked_cross_entropy_sum

            targets = next_token_targets(labels, position_ids)
            count = (targets != IGNORE_INDEX).sum().clamp(min=1)
            local = chunked_cross_entropy_sum(hidden, module.lm_head.weight, shard.split(targets), chunk=HEAD_CHUNK,
                                              width_multiplier=module.config.width_multiplier) / count
            total = local.detach().clone()
            if shard.size > 1:
                dist.all_reduce(total, group=self.group)
            loss = local + (total - local.detach())  # the value of the whole batch, the gradient of this part
        # the logits only when read (KL distillation), as the model's head computes them, under this autocast
        device_type = hidden.device.type
        autocast = dict(enabled=torch.is_autocast_enabled(device_type), dtype=torch.get_autocast_dtype(device_type))

        def local_logits() -> torch.Tensor:
            with torch.autocast(device_type, **autocast):
                return module.lm_head(hidden / module.config.width_multiplier).float()

        return ContextParallelOutput(loss, local_logits, shard)
