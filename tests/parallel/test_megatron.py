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


def parity_rank(rank, world_size, tp, cp, checkpointing):
    import sala_train.parallel.megatron as megatron

    megatron.GRADIENT_BUCKET = 4096  # several all-reduce buckets even for the tiny model
    model = tiny_model()
    if checkpointing:
        model.gradient_checkpointing_enable()
    backend = megatron_backend(model, world_size, tp, cp)
    ids, positions, labels = tiny_batch()
    out = backend.model(ids, position_ids=positions, labels=labels)
    logits = out.logits.detach()
    backend.backward(out.loss)
    backend.reduce_gradients()
    grads = backend.full_state({name: p.grad for name, p in backend.module.named_parameters()})
    return float(out.loss), logits, grads, float(backend.grad_norm())


@pytest.mark.parametrize("tp, cp, dp, checkpointing", [(2, 1, 1, False), (1, 2, 1, False), (2, 2, 1, True),
                                                       (1, 1, 2, False)],
                         ids=["tp2", "cp2", "tp2xcp2-activation-checkpointing", "dp2"])
def test_loss_logits_and_gradients_match_one_process(tp, cp, dp, checkpointing):
    """Every data-parallel rank gets the same batch here: their mean gradient is the one-process gradient.
    With activation checkpointing the CP collectives run again inside the backward pass."""
    model = tiny_model()
    ids, positions, labels = tiny_batch()
    out = model(ids, position_ids=positions, labels=labels)
    out.loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    expected_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in expected.values()))

    results = run_distributed(parity_rank, world_size=tp * cp * dp, args=(tp, cp, checkpointing), timeout_s=240)
    for rank, (loss, logits, grads, norm) in enumerate(results):
        assert loss == pytest.approx(out.loss.item(), rel=RATIO), f"rank {rank}"
        assert_close(logits, out.logits, ratio=RATIO, name=f"rank {rank} logits")
        assert norm == pytest.approx(float(expected_norm), rel=RATIO), f"rank {rank} gradient norm"
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert_close(grad, expected[name], ratio=RATIO, name=f"rank {rank} grad {name}")


# ---------------------------------------------------------------------------------------------------------
# The trainer with backend.name = megatron
# ---------------------------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def _trainer_runs_rank(rank, world_size, checkpoints, root):
    """On 2 processes: the tiny two-stage run with CP=2 (KL through gathered logits, then CE with InfLLM-V2 on),
    and with TP=2 killed after global step 3 and restarted from its sharded checkpoint."""
    from pathlib import Path

    from sala_train.testing.training import tiny_train_config
    from sala_train.train.config import BackendConfig
    from sala_train.train.trainer import Trainer

    checkpoints, root = Path(checkpoints), Path(root)
    Trainer(tiny_train_config(checkpoints, root / "cp2", backend=BackendConfig(name="megatron", context_parallel=2))).run()

    tp2 = BackendConfig(name="megatron", tensor_parallel=2)
    original = Trainer.save_checkpoint

    def save_then_die(self, backend, loader, state, optimizer=True):  # every rank saves, then every rank dies
        path = original(self, backend, loader, state, optimizer)
        if state["global_step"] == 3:
            raise Killed()
        return path

    Trainer.save_checkpoint = save_then_die
    try:
        Trainer(tiny_train_config(checkpoints, root / "tp2", backend=tp2)).run()
        raise AssertionError("the run was not killed")
    except Killed:
        pass
    finally:
        Trainer.save_checkpoint = original
    Trainer(tiny_train_config(checkpoints, root / "tp2", backend=tp2)).run()
    return None


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    from sala_train.testing.training import make_tiny_checkpoints, tiny_train_config
    from sala_train.train.config import BackendConfig
    from sala_train.train.trainer import Trainer

    root = tmp_path_factory.mktemp("megatron_runs")
    checkpoints = make_tiny_checkpoints(root / "ckpt", num_attention_heads=4, num_key_value_heads=2)
    Trainer(tiny_train_config(checkpoints, root / "torch", backend=BackendConfig(name="torch"))).run()
    run_distributed(_trainer_runs_rank, world_size=2, args=(str(checkpoints), str(root)), timeout_s=600)
    return root


def test_trainer_with_context_parallel_follows_the_torch_backend(trainer_runs):
    from sala_train.testing.training import read_losses

    expected, actual = read_losses(trainer_runs / "torch"), read_losses(trainer_runs / "cp2")
    assert actual.keys() == expected.keys() == {1, 2, 3, 4}
    for step, loss in expected.items():  # 4 fp32 AdamW steps, sums regrouped: far below a wrong gradient
        assert actual[step] == pytest.approx(loss, rel=1e-4), f"step {step}"


def test_killed_tensor_parallel_run_resumes_from_its_shards_with_the_same_losses(trainer_runs):
    from sala_train.testing.training import read_losses

    expected, resumed = read_losses(trainer_runs / "torch"), read_losses(trainer_runs / "tp2")
    assert resumed.keys() == expected.keys()
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    shards = trainer_runs / "tp2" / "checkpoints" / "stage-01-step-00000001" / "megatron"
    assert sorted(p.name for p in shards.iterdir()) == ["tp-00-of-02.pt", "tp-01-of-02.pt"]


def test_megatron_export_is_the_hf_layout_with_full_weights(trainer_runs):
    from sala_train.models.sala import MiniCPMSALAForCausalLM

    export = trainer_runs / "tp2" / "export" / "long"
    reference = MiniCPMSALAForCausalLM.from_pretrained(trainer_runs / "torch" / "export" / "long", dtype="float32")
    model = MiniCPMSALAForCausalLM.from_pretrained(export, dtype="float32")
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        assert tensor.shape == expected[name].shape, name
        assert_close(tensor, expected[name], ratio=1e-4, name=name)


@pytest.mark.parametrize("world, change, message", [
    (4, dict(tensor_parallel=3), "not a multiple of backend.tensor_parallel"),
    (6, dict(context_parallel=3), "multiple of 2 x backend.context_parallel = 6"),
    (1, dict(offload_optimizer=True), "offload_optimizer is a deepspeed setting"),
    pytest.param(1, dict(bf16=True), "without a GPU train in fp32",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 runs where there is a GPU")),
])
def test_impossible_megatron_recipes_fail_before_loading(tmp_path, monkeypatch, world, change, message):
    from sala_train.testing.training import tiny_train_config
    from sala_train.train.config import BackendConfig, RecipeError
    from sala_train.train.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", str(world))  # checked before any process group is started
    backend = BackendConfig(name="megatron", **change)
    cfg = tiny_train_config(tmp_path / "missing", tmp_path / "bad", backend=backend)
    with pytest.raises(RecipeError, match=message):
        Trainer(cfg)
    assert not (tmp_path / "bad").exists()
