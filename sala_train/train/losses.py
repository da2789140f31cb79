"""Training losses: next-token and SFT cross-entropy, KL distillation from a frozen teacher, layer-alignment MSE.

Shapes: B batch rows, T tokens per row, V vocabulary, H hidden size. Packed batches mark their documents
with ``cu_seqlens`` (document starts over the flattened B*T tokens, plus B*T) or with ``position_ids`` [B, T]
that restart at 0 at every document, as the models take them; no loss crosses a document boundary.

Labels are the input ids (``IGNORE_INDEX`` where a token must not be predicted); the losses shift them inside:
the logits at position t predict labels[t + 1], and the last position of every row and of every packed
document predicts nothing. ``reduction="mean"`` averages over the positions that predict something;
``"sum"`` returns the sum, for a trainer that divides by the token count of the whole global batch.

The chunked variants take the final hidden states and the head weight instead of logits and never hold the
fp32 logits of more than ``chunk`` positions: each chunk's logits are computed, reduced to a scalar and freed,
and computed again in the backward pass, which writes each chunk's hidden-state gradient into one [N, H]
buffer and sums the head gradient in fp32 (``_ChunkedHeadLoss``). At 520K tokens and V = 73448 the full fp32
logits would take 153 GB; a chunk of 2048 positions takes 0.6 GB. The price is one more head matmul per chunk
in the backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")
DEFAULT_CHUNK = 2048


# -- targets and masks ----------------------------------------------------------------------------------

def next_token_targets(labels: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """labels [B, T] -> targets [B, T] with targets[:, t] = labels[:, t + 1], and IGNORE_INDEX at the last
    position of every row and of every packed document (``cu_seqlens`` or restarting ``position_ids``)."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be [batch, tokens], got shape {list(labels.shape)}")
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        if position_ids.shape != labels.shape:
            raise ValueError(f"position_ids {list(position_ids.shape)} must have the shape of labels "
                             f"{list(labels.shape)}")
        document_starts = position_ids[:, 1:] == 0
        targets[:, :-1].masked_fill_(document_starts, IGNORE_INDEX)
    if cu_seqlens is not None:
        if int(cu_seqlens[-1]) != labels.numel():
            raise ValueError(f"cu_seqlens must end at the number of tokens B*T = {labels.numel()}, "
                             f"got {int(cu_seqlens[-1])}")
        targets.view(-1)[cu_seqlens[1:].to(labels.device) - 1] = IGNORE_INDEX
    return targets


def next_token_mask(labels: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the positions the cross-entropy scores (pass it to the KL losses to score the same ones)."""
    return next_token_targets(labels, cu_seqlens=cu_seqlens, position_ids=position_ids) != IGNORE_INDEX


def assistant_labels(input_ids: torch.Tensor, assistant_mask: torch.Tensor) -> torch.Tensor:
    """SFT labels: input_ids [B, T] where ``assistant_mask`` [B, T] is True (tokens the assistant wrote, to be
    predicted), IGNORE_INDEX elsewhere (system, user, tool turns and padding)."""
    if assistant_mask.shape != input_ids.shape:
        raise ValueError(f"assistant_mask {list(assistant_mask.shape)} must have the shape of input_ids "
                         f"{list(input_ids.shape)}")
    return input_ids.masked_fill(~assistant_mask.bool(), IGNORE_INDEX)


def _reduce(total: torch.Tensor, count: torch.Tensor | int, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return total
    if reduction == "mean":
        # An empty batch (everything ignored) gives 0, not NaN; the graph stays connected for backward.
        return total / (count.clamp(min=1) if torch.is_tensor(count) else max(count, 1))
    raise ValueError(f"reduction = {reduction!r}: expected one of {list(REDUCTIONS)}")


# -- cross-entropy ----------------------------------------------------------------------------------------

def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy. logits [B, T, V] (computed in fp32), labels [B, T] -> scalar.

    The same value as the models' ``.loss`` (``sala_train.models.minicpm.causal_lm_loss``)."""
    B, T, V = logits.shape
    if labels.shape != (B, T):
        raise ValueError(f"labels {list(labels.shape)} must be [batch, tokens] = [{B}, {T}] like the logits")
    targets = next_token_targets(labels, cu_seqlens=cu_seqlens, position_ids=position_ids)
    total = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return _reduce(total, (targets != IGNORE_INDEX).sum(), reduction)


def sft_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, assistant_mask: torch.Tensor, *,
                      cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on the assistant tokens only. logits [B, T, V], input_ids and assistant_mask [B, T]."""
    return cross_entropy(logits, assistant_labels(input_ids, assistant_mask), cu_seqlens=cu_seqlens,
                         position_ids=position_ids, reduction=reduction)


# -- KL distillation --------------------------------------------------------------------------------------

def _kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, V], [N, V] -> [N]: T^2 * KL(softmax(teacher / T) || softmax(student / T)), in fp32."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)
    # T^2 keeps the gradient size independent of the temperature (Hinton et al. 2015).
    return kl * temperature**2


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature!r}: expected a positive number")


def _row_weights(mask: torch.Tensor | None, shape: tuple[int, ...], device) -> torch.Tensor:
    """mask [B, T] (None: all) -> [B * T] fp32 0/1 weights of the positions that count."""
    if mask is None:
        return torch.ones(shape[0] * shape[1], device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask {list(mask.shape)} must be [batch, tokens] = {list(shape)}")
    return mask.reshape(-1).to(device=device, dtype=torch.float32)


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    *, temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Forward KL(teacher || student) per token, summed over the vocabulary, times temperature^2.

    student_logits, teacher_logits [B, T, V] (the teacher's are detached: it is frozen); mask [B, T] bool, the
    positions that count (None: all; ``next_token_mask(labels, ...)`` scores exactly the cross-entropy's
    positions). Mean over the counted positions -> scalar.
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {list(student_logits.shape)} and teacher logits "
                         f"{list(teacher_logits.shape)} must have the same [batch, tokens, vocab] shape")
    B, T, V = student_logits.shape
    weights = _row_weights(mask, (B, T), student_logits.device)
    kl = _kl_rows(student_logits.reshape(-1, V), teacher_logits.detach().reshape(-1, V), temperature)
    return _reduce((kl * weights).sum(), weights.sum(), reduction)


# -- chunked head losses ----------------------------------------------------------------------------------

def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, width_multiplier: float) -> torch.Tensor:
    """The models' head: lm_head(h / width_multiplier) in the input dtype, then fp32."""
    return F.linear(hidden / width_multiplier, weight).float()


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over chunks of rows of ``loss_of_logits(head(hidden[rows]), *(a[rows] for a in row_args))``.

    hidden [N, H], weight [V, H]; ``loss_of_logits(logits [n, V] fp32, ...) -> scalar`` (a sum over its rows).
    Forward: each chunk's logits are computed, reduced and freed. Backward: each chunk's logits are computed
    again, the loss's gradient with respect to them taken by autograd, and pushed through the head by hand:
    the chunk's hidden gradient goes into one [N, H] buffer and the head gradient is summed in fp32. Nothing
    larger than one chunk of logits, plus the gradients themselves, is ever alive.
    """

    @staticmethod
    def forward(ctx, hidden, weight, width_multiplier, chunk, loss_of_logits, *row_args):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            total += loss_of_logits(_head_logits(hidden[rows], weight, width_multiplier),
                                    *(a[rows] for a in row_args))
        ctx.save_for_backward(hidden, weight, *row_args)
        ctx.width_multiplier, ctx.chunk, ctx.loss_of_logits = width_multiplier, chunk, loss_of_logits
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, *row_args = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            x = hidden[rows] / ctx.width_multiplier
            logits = F.linear(x, weight).float().requires_grad_()
            with torch.enable_grad():
                part = ctx.loss_of_logits(logits, *(a[rows] for a in row_args))
            (grad_logits,) = torch.autograd.grad(part, logits)
            grad_logits = (grad_logits * grad_total).to(x.dtype)
            if need_hidden:
                grad_hidden[rows] = (grad_logits @ weight) / ctx.width_multiplier
            if need_weight:
                grad_weight += grad_logits.t() @ x
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, *([None] * len(row_args))


def _check_chunk(chunk: int) -> None:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        raise ValueError(f"chunk = {chunk!r}: expected a positive number of positions")


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    if hidden.ndim != 3:
        raise ValueError(f"{what} hidden states must be [batch, tokens, hidden], got {list(hidden.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{what} head weight must be [vocab, hidden = {hidden.shape[-1]}], got {list(weight.shape)}")


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                          chunk: int = DEFAULT_CHUNK, width_multiplier: float = 1.0,
                          cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                          reduction: str = "mean") -> torch.Tensor:
    """``cross_entropy(lm_head(hidden / width_multiplier).float(), labels)`` without the full logits.

    hidden [B, T, H]: the final normed hidden states (before the muP division); lm_head_weight [V, H];
    labels [B, T]. Memory O(chunk * V) beyond the gradients (see the module docstring). Gradients flow to
    hidden and lm_head_weight.
    """
    _check_chunk(chunk)
    _check_head(hidden, lm_head_weight, "chunked_cross_entropy:")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels {list(labels.shape)} must be [batch, tokens] = {list(hidden.shape[:2])}")
    targets = next_token_targets(labels, cu_seqlens=cu_seqlens, position_ids=position_ids)
    total = chunked_cross_entropy_sum(hidden, lm_head_weight, targets, chunk=chunk, width_multiplier=width_multiplier)
    return _reduce(total, (targets != IGNORE_INDEX).sum(), reduction)


def chunked_cross_entropy_sum(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, *,
                              chunk: int = DEFAULT_CHUNK, width_multiplier: float = 1.0) -> torch.Tensor:
    """The summed cross-entropy of the head's logits against targets that are already shifted
    (``next_token_targets``: IGNORE_INDEX where nothing is predicted), without the full logits. For callers
    that cut a sequence after shifting (context parallelism: a rank's last target is the next rank's token).

    hidden [B, T, H] (before the muP division), lm_head_weight [V, H], targets [B, T] -> fp32 scalar.
    """
    _check_chunk(chunk)
    _check_head(hidden, lm_head_weight, "chunked_cross_entropy_sum:")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets {list(targets.shape)} must be [batch, tokens] = {list(hidden.shape[:2])}")
    return _ChunkedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, width_multiplier, chunk,
                                  _cross_entropy_sum, targets.reshape(-1))


def chunked_causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                           position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                           chunk: int = DEFAULT_CHUNK, reduction: str = "mean") -> torch.Tensor:
    """``model(input_ids, labels=labels, ...).loss`` of a MiniCPM / SALA causal LM through
    ``chunked_cross_entropy``: the decoder runs as usual, the head never builds [B, T, V] logits.
    ``labels`` defaults to ``input_ids``."""
    hidden, attention, _ = model.model(input_ids=input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens)
    return chunked_cross_entropy(hidden, model.lm_head.weight, input_ids if labels is None else labels,
                                 chunk=chunk, width_multiplier=model.config.width_multiplier,
                                 cu_seqlens=attention.cu_seqlens, reduction=reduction)


class _TeacherKL:
    """Per chunk: sum of row weight * T^2 KL(teacher || student), the teacher's logits from its own head."""

    def __init__(self, teacher_weight: torch.Tensor, teacher_width_multiplier: float, temperature: float):
        self.teacher_weight, self.teacher_width_multiplier = teacher_weight.detach(), teacher_width_multiplier
        self.temperature = temperature

    def __call__(self, student_logits, teacher_hidden, weights) -> torch.Tensor:
        teacher_logits = _head_logits(teacher_hidden, self.teacher_weight, self.teacher_width_multiplier)
        return (_kl_rows(student_logits, teacher_logits, self.temperature) * weights).sum()


def chunked_kl_distillation(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                            teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor,
                            mask: torch.Tensor | None = None, *, temperature: float = 1.0,
                            chunk: int = DEFAULT_CHUNK, student_width_multiplier: float = 1.0,
                            teacher_width_multiplier: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """``kl_distillation`` of the two heads' logits without building either [B, T, V] tensor.

    student_hidden, teacher_hidden [B, T, H_s], [B, T, H_t]: final normed hidden states; head weights
    [V, H_s], [V, H_t]; each model's logits are ``head(hidden / width_multiplier).float()``. The teacher side
    is detached (its logits are recomputed per chunk in the backward pass too). Memory O(chunk * V).
    """
    _check_chunk(chunk)
    _check_temperature(temperature)
    _check_head(student_hidden, student_head_weight, "chunked_kl_distillation: student")
    _check_head(teacher_hidden, teacher_head_weight, "chunked_kl_distillation: teacher")
    same_tokens = student_hidden.shape[:2] == teacher_hidden.shape[:2]
    if not same_tokens or student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(f"student and teacher must score the same tokens over the same vocabulary: hidden "
                         f"{list(student_hidden.shape)} vs {list(teacher_hidden.shape)}, head "
                         f"{list(student_head_weight.shape)} vs {list(teacher_head_weight.shape)}")
    B, T = student_hidden.shape[:2]
    weights = _row_weights(mask, (B, T), student_hidden.device)
    loss_of_logits = _TeacherKL(teacher_head_weight, teacher_width_multiplier, temperature)
    total = _ChunkedHeadLoss.apply(student_hidden.reshape(B * T, -1), student_head_weight, student_width_multiplier,
                                   chunk, loss_of_logits, teacher_hidden.detach().reshape(B * T, -1), weights)
    return _reduce(total, weights.sum(), reduction)


# -- layer alignment --------------------------------------------------------------------------------------

def layer_alignment_mse(student_outputs: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
                        teacher_outputs: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
                        mask: torch.Tensor | None = None, *, per_layer: bool = False) -> torch.Tensor:
    """MSE between each aligned layer's student mixer output and the teacher's attention output.

    student_outputs, teacher_outputs: one [B, T, H] tensor per layer, as lists in the same order or as dicts
    keyed by layer index (the same keys). The teacher's are detached. mask [B, T] bool: the tokens that count
    (None: all). Per layer: mean of (student - teacher)^2 over the counted tokens and the H features, in fp32.
    Returns the mean over layers (scalar), or the per-layer values [L] with ``per_layer=True``.
    """
    if isinstance(student_outputs, Mapping) or isinstance(teacher_outputs, Mapping):
        if not (isinstance(student_outputs, Mapping) and isinstance(teacher_outputs, Mapping)):
            raise TypeError("pass student and teacher outputs both as lists or both as dicts keyed by layer")
        if set(student_outputs) != set(teacher_outputs):
            raise ValueError(f"student layers {sorted(student_outputs)} and teacher layers "
                             f"{sorted(teacher_outputs)} differ")
        layers = sorted(student_outputs)
        student_outputs = [student_outputs[i] for i in layers]
        teacher_outputs = [teacher_outputs[i] for i in layers]
    else:
        layers = list(range(len(student_outputs)))
        if len(student_outputs) != len(teacher_outputs):
            raise ValueError(f"{len(student_outputs)} student outputs but {len(teacher_outputs)} teacher outputs")
    if not layers:
        raise ValueError("no layer outputs to align")

    per_layer_mse = []
    for layer, student, teacher in zip(layers, student_outputs, teacher_outputs):
        if student.shape != teacher.shape or student.ndim != 3:
            raise ValueError(f"layer {layer}: student output {list(student.shape)} and teacher output "
                             f"{list(teacher.shape)} must be the same [batch, tokens, hidden] shape")
        B, T, H = student.shape
        weights = _row_weights(mask, (B, T), student.device)
        squared = (student.float() - teacher.detach().float()).square().reshape(B * T, H).mean(-1)
        per_layer_mse.append(_reduce((squared * weights).sum(), weights.sum(), "mean"))
    values = torch.stack(per_layer_mse)
    return values if per_layer else values.mean()
