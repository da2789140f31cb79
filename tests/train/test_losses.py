"""Losses against straightforward references: per-document loops, explicit softmax formulas, the models' own
``.loss``; forward and every gradient of the chunked versions, odd sizes, ignore and mask handling."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM, SALAConfig, SALAForCausalLM
from sala_train.testing import assert_close
from sala_train.train.losses import (
    IGNORE_INDEX,
    assistant_labels,
    chunked_causal_lm_loss,
    chunked_cross_entropy,
    chunked_kl_distillation,
    cross_entropy,
    kl_distillation,
    layer_alignment_mse,
    next_token_mask,
    next_token_targets,
    sft_cross_entropy,
)

# fp32 throughout: the chunked losses sum the same per-token terms in another order, and the references use
# other but equivalent formulas (log-softmax + gather, explicit sums): 1e-6 relative RMS bounds that rounding;
# a wrong target, mask or scale gives 1e-2 or more.
RATIO = 1e-6
V = 53


def packed_batch(lengths=(7, 1, 12, 43), seed=0):
    """One packed row [1, T] of documents of ``lengths``, with its cu_seqlens and position_ids."""
    torch.manual_seed(seed)
    T = sum(lengths)
    ids = torch.randint(0, V, (1, T))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, cu_seqlens, position_ids


def reference_cross_entropy(logits, labels, documents):
    """Mean over documents' positions t < end - 1 of -log softmax(logits[t])[labels[t + 1]], by explicit loops.
    ``documents``: a list of (row, start, end)."""
    terms = []
    for row, start, end in documents:
        for t in range(start, end - 1):
            target = int(labels[row, t + 1])
            if target != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[row, t].double(), -1)[target])
    return torch.stack(terms).mean()


# -- targets ----------------------------------------------------------------------------------------------

def test_next_token_targets_end_every_document():
    ids, cu_seqlens, position_ids = packed_batch()
    by_cu = next_token_targets(ids, cu_seqlens=cu_seqlens)
    by_positions = next_token_targets(ids, position_ids=position_ids)
    assert torch.equal(by_cu, by_positions)
    ends = (cu_seqlens[1:] - 1).tolist()
    for t in range(ids.shape[1]):
        assert by_cu[0, t] == (IGNORE_INDEX if t in ends else ids[0, t + 1])
    assert torch.equal(next_token_mask(ids, cu_seqlens=cu_seqlens), by_cu != IGNORE_INDEX)


def test_position_ids_pack_several_rows():
    ids = torch.randint(0, V, (2, 6))
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 0]])
    targets = next_token_targets(ids, position_ids=position_ids)
    assert targets[0].tolist()[2] == targets[0].tolist()[5] == IGNORE_INDEX
    assert targets[1].tolist()[4] == targets[1].tolist()[5] == IGNORE_INDEX
    assert (targets != IGNORE_INDEX).sum() == 8


# -- cross-entropy ----------------------------------------------------------------------------------------

def test_cross_entropy_matches_a_per_document_loop():
    ids, cu_seqlens, position_ids = packed_batch()
    logits = torch.randn(1, ids.shape[1], V)
    documents = [(0, s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    expected = reference_cross_entropy(logits, ids, documents)
    assert_close(cross_entropy(logits, ids, cu_seqlens=cu_seqlens), expected, ratio=RATIO, name="cu_seqlens")
    assert_close(cross_entropy(logits, ids, position_ids=position_ids), expected, ratio=RATIO, name="position_ids")
    count = int(next_token_mask(ids, cu_seqlens=cu_seqlens).sum())
    assert_close(cross_entropy(logits, ids, cu_seqlens=cu_seqlens, reduction="sum"), expected * count, ratio=RATIO,
                 name="sum")


@pytest.mark.parametrize("model_class", ["teacher", "sala"])
def test_cross_entropy_equals_the_models_loss(model_class):
    model = tiny_model(model_class)
    ids, cu_seqlens, _ = packed_batch()
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu_seqlens, labels=ids)
    assert_close(cross_entropy(out.logits, ids, cu_seqlens=cu_seqlens), out.loss, ratio=RATIO)


def test_everything_ignored_gives_zero_and_a_gradient():
    logits = torch.randn(2, 5, V, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss = cross_entropy(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_sft_scores_only_assistant_tokens():
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, 17))
    assistant = torch.zeros(2, 17, dtype=torch.bool)
    assistant[0, 5:11] = True
    assistant[1, 9:] = True
    logits = torch.randn(2, 17, V, requires_grad=True)
    loss = sft_cross_entropy(logits, ids, assistant)
    # reference: the positions just before each assistant token predict it
    terms = [-torch.log_softmax(logits[b, t - 1].double(), -1)[ids[b, t]]
             for b in range(2) for t in range(1, 17) if assistant[b, t]]
    assert_close(loss, torch.stack(terms).mean(), ratio=RATIO)
    loss.backward()
    predicts_assistant = torch.zeros_like(assistant)
    predicts_assistant[:, :-1] = assistant[:, 1:]
    assert torch.count_nonzero(logits.grad[~predicts_assistant]) == 0
    assert (logits.grad[predicts_assistant].abs().sum(-1) > 0).all()
    assert torch.equal(assistant_labels(ids, assistant) != IGNORE_INDEX, assistant)


# -- chunked cross-entropy --------------------------------------------------------------------------------

def plain_head_loss(hidden, weight, labels, width_multiplier, **packing):
    return cross_entropy(F.linear(hidden / width_multiplier, weight).float(), labels, **packing)


@pytest.mark.parametrize("chunk", [1, 16, 23, 1000])
@pytest.mark.parametrize("packing", ["cu_seqlens", "position_ids", "rows"])
def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(chunk, packing):
    ids, cu_seqlens, position_ids = packed_batch()
    labels = ids.clone()
    labels[0, 20:30] = IGNORE_INDEX  # some targets ignored as well
    kwargs = {"cu_seqlens": dict(cu_seqlens=cu_seqlens), "position_ids": dict(position_ids=position_ids),
              "rows": {}}[packing]
    if packing == "rows":  # unpacked [3, 21]
        labels = labels.reshape(3, 21)
    B, T = labels.shape
    hidden = torch.randn(B, T, 24, requires_grad=True)
    weight = torch.randn(V, 24, requires_grad=True)

    expected = plain_head_loss(hidden, weight, labels, 4.0, **kwargs)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    loss = chunked_cross_entropy(hidden, weight, labels, chunk=chunk, width_multiplier=4.0, **kwargs)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert_close(loss, expected, ratio=RATIO, name="loss")
    assert_close(grads[0], expected_grads[0], ratio=RATIO, name="d hidden")
    assert_close(grads[1], expected_grads[1], ratio=RATIO, name="d weight")


def test_chunked_cross_entropy_keeps_no_full_logits_for_backward():
    T, H, vocab, chunk = 200, 8, 1000, 16
    hidden = torch.randn(1, T, H, requires_grad=True)
    weight = torch.randn(vocab, H, requires_grad=True)
    labels = torch.randint(0, vocab, (1, T))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked_cross_entropy(hidden, weight, labels, chunk=chunk)
    # only inputs are kept: the head weight, the hidden rows and targets; never logits of more than a chunk
    assert max(saved) <= max(weight.numel(), chunk * vocab) < T * vocab
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        plain_head_loss(hidden, weight, labels, 1.0)
    assert max(saved) >= T * vocab  # what the plain loss keeps


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_chunked_cross_entropy_backward_builds_no_full_logits():
    T, H, vocab, chunk = 200, 8, 1000, 16
    hidden = torch.randn(1, T, H, requires_grad=True)
    weight = torch.randn(vocab, H, requires_grad=True)
    labels = torch.randint(0, vocab, (1, T))
    for loss, bound in ((chunked_cross_entropy(hidden, weight, labels, chunk=chunk), chunk * vocab),
                        (plain_head_loss(hidden, weight, labels, 1.0), T * vocab)):
        largest = LargestTensor()
        with largest:
            loss.backward()
        assert largest.numel == bound  # one chunk of logits (and their gradient), vs all of them


def test_chunked_cross_entropy_in_bf16_matches_the_plain_bf16_head():
    ids, cu_seqlens, _ = packed_batch()
    hidden = torch.randn(1, ids.shape[1], 32, dtype=torch.bfloat16)
    weight = torch.randn(V, 32, dtype=torch.bfloat16)
    # the same bf16 matmuls row by row; only the fp32 sum order differs
    assert_close(chunked_cross_entropy(hidden, weight, ids, chunk=9, width_multiplier=2.0, cu_seqlens=cu_seqlens),
                 plain_head_loss(hidden, weight, ids, 2.0, cu_seqlens=cu_seqlens), ratio=RATIO)


def test_chunked_cross_entropy_with_nothing_to_score():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = chunked_cross_entropy(hidden, torch.randn(V, 8), torch.full((1, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


@pytest.mark.parametrize("bad,message", [
    (dict(chunk=0), "chunk"),
    (dict(labels=torch.zeros(1, 5, dtype=torch.long)), "labels"),
    (dict(weight=torch.randn(V, 9)), "head weight"),
    (dict(reduction="avg"), "reduction"),
])
def test_chunked_cross_entropy_rejects_bad_inputs(bad, message):
    args = dict(hidden=torch.randn(1, 6, 8), weight=torch.randn(V, 8), labels=torch.zeros(1, 6, dtype=torch.long))
    args.update({k: v for k, v in bad.items() if k in args})
    options = {k: v for k, v in bad.items() if k not in args}
    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(args["hidden"], args["weight"], args["labels"], **options)


TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.05, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, scale_emb=12.0, scale_depth=1.4, dim_model_base=8)


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "teacher":
        return MiniCPMForCausalLM(MiniCPMConfig(**TINY))
    return SALAForCausalLM(SALAConfig(**TINY, mixer_types=["minicpm4", "lightning-attn"], lightning_nh=4,
                                      lightning_nkv=4, lightning_head_dim=8, lightning_backend="torch",
                                      sparse_backend="torch"))


@pytest.mark.parametrize("kind", ["teacher", "sala"])
def test_chunked_causal_lm_loss_equals_the_models_loss_and_gradients(kind):
    model = tiny_model(kind)
    ids, _, position_ids = packed_batch()
    expected = model(ids, position_ids=position_ids, labels=ids).loss
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    loss = chunked_causal_lm_loss(model, ids, position_ids=position_ids, chunk=10)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_close(loss, expected, ratio=RATIO, name="loss")
    for (name, _), grad, expected_grad in zip(model.named_parameters(), grads, expected_grads):
        assert_close(grad, expected_grad, ratio=1e-5, name=f"d {name}")  # through the whole decoder: 1e-5


# -- KL distillation --------------------------------------------------------------------------------------

def reference_kl(student_logits, teacher_logits, mask, temperature):
    """mean over masked positions of T^2 * sum_v p_t(v) (log p_t(v) - log p_s(v)), written out in float64."""
    s = student_logits.double() / temperature
    t = teacher_logits.double() / temperature
    log_p_s = s - s.exp().sum(-1, keepdim=True).log()
    log_p_t = t - t.exp().sum(-1, keepdim=True).log()
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2
    return kl[mask].mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_distillation_matches_the_formula_and_its_gradient(temperature):
    torch.manual_seed(2)
    ids, cu_seqlens, _ = packed_batch()
    T = ids.shape[1]
    student = torch.randn(1, T, V, requires_grad=True)
    teacher = torch.randn(1, T, V, requires_grad=True)
    mask = next_token_mask(ids, cu_seqlens=cu_seqlens)
    loss = kl_distillation(student, teacher, mask, temperature=temperature)
    student_ref = student.detach().clone().requires_grad_()
    expected = reference_kl(student_ref, teacher.detach(), mask, temperature)
    assert_close(loss, expected, ratio=RATIO)
    loss.backward()
    expected.backward()
    assert_close(student.grad, student_ref.grad, ratio=RATIO, name="d student")
    assert teacher.grad is None  # the teacher is frozen
    assert torch.count_nonzero(student.grad[~mask]) == 0


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    logits = torch.randn(2, 5, V)
    assert kl_distillation(logits, logits + 3.0).abs().item() < 1e-6  # shift-invariant softmax
    assert kl_distillation(logits, torch.randn(2, 5, V)).item() > 0


@pytest.mark.parametrize("chunk", [1, 7, 500])
def test_chunked_kl_equals_kl_of_the_heads_logits(chunk):
    torch.manual_seed(3)
    B, T = 2, 31
    student_hidden = torch.randn(B, T, 24, requires_grad=True)
    student_weight = torch.randn(V, 24, requires_grad=True)
    teacher_hidden = torch.randn(B, T, 40)
    teacher_weight = torch.randn(V, 40)
    mask = torch.rand(B, T) > 0.3
    expected = kl_distillation(F.linear(student_hidden / 3.0, student_weight).float(),
                               F.linear(teacher_hidden / 5.0, teacher_weight).float(), mask, temperature=1.5)
    expected_grads = torch.autograd.grad(expected, (student_hidden, student_weight))
    loss = chunked_kl_distillation(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                                   temperature=1.5, chunk=chunk, student_width_multiplier=3.0,
                                   teacher_width_multiplier=5.0)
    grads = torch.autograd.grad(loss, (student_hidden, student_weight))
    assert_close(loss, expected, ratio=RATIO, name="loss")
    assert_close(grads[0], expected_grads[0], ratio=RATIO, name="d student hidden")
    assert_close(grads[1], expected_grads[1], ratio=RATIO, name="d student head")


def test_kl_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same"):
        kl_distillation(torch.randn(1, 4, V), torch.randn(1, 4, V + 1))
    with pytest.raises(ValueError, match="temperature"):
        kl_distillation(torch.randn(1, 4, V), torch.randn(1, 4, V), temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        kl_distillation(torch.randn(1, 4, V), torch.randn(1, 4, V), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same tokens"):
        chunked_kl_distillation(torch.randn(1, 4, 8), torch.randn(V, 8), torch.randn(1, 5, 8), torch.randn(V, 8))


# -- layer alignment --------------------------------------------------------------------------------------

def test_layer_alignment_mse_per_layer_and_masked():
    torch.manual_seed(4)
    student = [torch.randn(2, 9, 16, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(2, 9, 16, requires_grad=True) for _ in range(3)]
    mask = torch.rand(2, 9) > 0.4
    per_layer = layer_alignment_mse(student, teacher, mask, per_layer=True)
    expected = torch.stack([((s - t)[mask] ** 2).mean() for s, t in zip(student, teacher)])
    assert_close(per_layer, expected, ratio=RATIO)
    loss = layer_alignment_mse(student, teacher, mask)
    assert_close(loss, expected.mean(), ratio=RATIO)
    loss.backward()
    for s, t in zip(student, teacher):
        expected_grad = torch.where(mask[..., None], 2 * (s - t) / (3 * int(mask.sum()) * 16), 0.0)
        assert_close(s.grad, expected_grad, ratio=RATIO, name="d student")
        assert t.grad is None  # the teacher is frozen
    unmasked = layer_alignment_mse(student, teacher)
    assert_close(unmasked, torch.stack([((s - t) ** 2).mean() for s, t in zip(student, teacher)]).mean(),
                 ratio=RATIO, name="unmasked")


def test_layer_alignment_mse_takes_dicts_keyed_by_layer():
    student = {1: torch.randn(1, 4, 8), 2: torch.randn(1, 4, 8)}
    teacher = {2: torch.randn(1, 4, 8), 1: torch.randn(1, 4, 8)}
    expected = torch.stack([((student[i] - teacher[i]) ** 2).mean() for i in (1, 2)])
    assert_close(layer_alignment_mse(student, teacher, per_layer=True), expected, ratio=RATIO)
    with pytest.raises(ValueError, match="layers"):
        layer_alignment_mse(student, {1: teacher[1]})
    with pytest.raises(ValueError, match="layer 0"):
        layer_alignment_mse([torch.randn(1, 4, 8)], [torch.randn(1, 4, 9)])
