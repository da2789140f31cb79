"""The megatron backend on gloo: TP=2, CP=2 and TP=2 x CP=2 give the loss, logits and gradients of one process
on a tiny hybrid model (both mixer kinds, output gates, QK-norm, o_norm), with a packed batch whose documents
cross the CP borders and one long enough for InfLLM-V2's sparse path.

Tolerance: fp32; TP regroups the matmul sums (row-parallel partial sums, the o_norm variance summed over
ranks), CP the attention and state sums (see test_context_parallel.py): an error ratio of 1e-5, far above
the ~1e-7 we see and far below any wrong term (a missing TP all-reduce or state is of order 1e-1).
"""

import pytest
import torch

from sala_train.testing import assert_close, requires_module, run_distributed

pytestmark = requires_module("megatron.core")

RATIO = 1e-5
SEQ_LEN = 128
DOCUMENTS = [[0, 20, 120], [0, 70, 77]]  # per row: document starts (the 100-token one is sparse at dense_len 96)


def tiny_model():
    from sala_train.models import SALAConfig, SALAForCausalLM

    config = SALAConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, lightning_nh=4, lightning_nkv=4, lightning_head_dim=16,
        mixer_types=["lightning-attn", "minicpm4"],
        sparse_config=dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=2,
                           use_nope=False, dense_len=96),
        max_position_embeddings=256, initializer_range=0.05, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        scale_emb=12.0, scale_depth=1.4, dim_model_base=16, lightning_backend="torch", sparse_backend="torch")
    torch.manual_seed(0)
    return SALAForCausalLM(config).train()


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (len(DOCUMENTS), SEQ_LEN), generator=g)
    positions = []
    for starts in DOCUMENTS:
        bounds = starts + [SEQ_LEN]
        positions.append(torch.cat([torch.arange(e - s) for s, e in zip(bounds[:-1], bounds[1:])]))
    return ids, torch.stack(positions), ids.clone()


def megatron_backend(model, world_size, tp, cp, seq_len=SEQ_LEN):
    from sala_train.parallel.megatron import MegatronBackend
    from sala_train.train.config import BackendConfig, StageConfig
    from sala_train.train.params import param_groups

    stage = StageConfig(seq_len=seq_len, tokens=seq_len)
    return MegatronBackend(model, param_groups(model, 1e-3, 0.1), stage, 1, world_size=world_size,
                           device=torch.device("cpu"),
                           config=BackendConfig(name="megatron", tensor_parallel=tp, context_parallel=cp))


def parity_rank(rank, world_size, tp, cp):
    backend = megatron_backend(tiny_model(), world_size, tp, cp)
    ids, positions, labels = tiny_batch()
    out = backend.model(ids, position_ids=positions, labels=labels)
    logits = out.logits.detach()
    backend.backward(out.loss)
    backend.reduce_gradients()
    grads = backend.full_state({name: p.grad for name, p in backend.module.named_parameters()})
    return float(out.loss), logits, grads, float(backend.grad_norm())


@pytest.mark.parametrize("tp, cp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "cp2", "tp2xcp2"])
def test_loss_logits_and_gradients_match_one_process(tp, cp):
    model = tiny_model()
    ids, positions, labels = tiny_batch()
    out = model(ids, position_ids=positions, labels=labels)
    out.loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    expected_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in expected.values()))

    results = run_distributed(parity_rank, world_size=tp * cp, args=(tp, cp), timeout_s=240)
    for rank, (loss, logits, grads, norm) in enumerate(results):
        assert loss == pytest.approx(out.loss.item(), rel=RATIO), f"rank {rank}"
        assert_close(logits, out.logits, ratio=RATIO, name=f"rank {rank} logits")
        assert norm == pytest.approx(float(expected_norm), rel=RATIO), f"rank {rank} gradient norm"
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert_close(grad, expected[name], ratio=RATIO, name=f"rank {rank} grad {name}")
