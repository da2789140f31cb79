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


def megatron_backend(model, world_size, tp, cp, seq_len=SEQ_LEN, shard_optimizer=None, grad_clip=1.0):
    from sala_train.parallel.megatron import MegatronBackend
    from sala_train.train.config import BackendConfig, OptimizerConfig, StageConfig
    from sala_train.train.params import param_groups

    stage = StageConfig(seq_len=seq_len, tokens=seq_len, optimizer=OptimizerConfig(grad_clip=grad_clip))
    return MegatronBackend(model, param_groups(model, 1e-3, 0.1), stage, 1, world_size=world_size,
                           device=torch.device("cpu"),
                           config=BackendConfig(name="megatron", tensor_parallel=tp, context_parallel=cp,
                                                shard_optimizer=shard_optimizer))


def parity_rank(rank, world_size, tp, cp, checkpointing):
    import sala_train.parallel.context_parallel as context_parallel
    import sala_train.parallel.megatron as megatron

    megatron.GRADIENT_BUCKET = 4096  # several all-reduce buckets even for the tiny model
    context_parallel.HEAD_CHUNK = 48  # several cross-entropy chunks per rank, the last one short
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
# The optimizer sharded over the ranks that hold the same parameters (ZeRO-1)
# ---------------------------------------------------------------------------------------------------------

STEPS = 3
GRAD_CLIP = 0.1  # below the tiny model's gradient norm (~0.15): every step is clipped


def sharding_rank(rank, world_size, layouts):
    """For each (name, tp, cp) of ``layouts``, in the same processes (megatron's groups rebuilt): STEPS clipped
    AdamW steps with the optimizer replicated and sharded. Returns, per (name, sharded): the losses, the final
    full weights, this rank's AdamW state size (its tensors, the step counts left out), the size of the
    parameters it owns, of its TP shard's parameters and of the largest of them, and its TP rank."""
    ids, positions, labels = tiny_batch()
    results = {}
    for name, tp, cp in layouts:
        for sharded in (False, True):
            model = tiny_model()
            backend = megatron_backend(model, world_size, tp, cp, shard_optimizer=sharded, grad_clip=GRAD_CLIP)
            assert backend.sharded == sharded
            losses = []
            for _ in range(STEPS):
                out = backend.model(ids, position_ids=positions, labels=labels)
                backend.backward(out.loss)
                backend.step(loss_finite=True)
                losses.append(float(out.loss))
            params = dict(backend.module.named_parameters())
            state = sum(t.numel() for per_param in backend.local_optimizer.state.values()
                        for t in per_param.values() if t.dim() > 0)
            owned = sum(params[n].numel() for n in backend.owned_parameters())
            sizes = [p.numel() for p in params.values()]
            results[name, sharded] = (losses, {n: t.clone() for n, t in backend.full_state().items()}, state, owned,
                                      sum(sizes), max(sizes), backend.layout.tensor_rank)
            backend.close()
    return results


def one_process_steps():
    """The reference: STEPS AdamW steps of one process with the gradient clipped to GRAD_CLIP."""
    from sala_train.train.params import param_groups

    model = tiny_model()
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, 0.1), betas=(0.9, 0.95), eps=1e-8)
    ids, positions, labels = tiny_batch()
    losses = []
    for _ in range(STEPS):
        out = model(ids, position_ids=positions, labels=labels)
        out.loss.backward()
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP) > GRAD_CLIP  # clipping exercised
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses, dict(model.named_parameters())


@pytest.mark.parametrize("world_size, layouts", [
    (2, [("cp2", 1, 2), ("dp2", 1, 1)]),
    pytest.param(4, [("tp2xcp2", 2, 2)], marks=pytest.mark.slow),
], ids=["cp2-and-dp2", "tp2xcp2"])
def test_sharded_optimizer_gives_the_replicated_steps_with_a_share_of_the_state(world_size, layouts):
    """ZeRO-1 changes where each AdamW update is computed, not what it computes: the sharded run's weights
    equal the replicated run's bit for bit, and both follow one process (clipping on the full gradient norm,
    above GRAD_CLIP here). The ranks of one TP shard split its parameters: each keeps the AdamW state of
    about 1/N of them (N = CP x DP ranks)."""
    expected_losses, expected = one_process_steps()
    results = run_distributed(sharding_rank, world_size=world_size, args=(layouts,), timeout_s=300)
    for name, tp, cp in layouts:
        sharers = world_size // tp
        for tensor_rank in range(tp):
            shard = [r[name, True] for r in results if r[name, True][6] == tensor_rank]
            assert len(shard) == sharers
            assert sum(r[3] for r in shard) == shard[0][4], f"{name}: every parameter is owned by exactly one rank"
        for rank, result in enumerate(results):
            losses, weights, state, owned, local_total, largest, _ = result[name, True]
            replicated_losses, replicated_weights, replicated_state, *_ = result[name, False]
            where = f"{name} rank {rank}"
            assert losses == replicated_losses, where
            for key, weight in weights.items():
                assert torch.equal(weight, replicated_weights[key]), f"{where} {key}"
                assert_close(weight, expected[key], ratio=RATIO, name=f"{where} {key}")
            assert losses == pytest.approx(expected_losses, rel=RATIO), where
            # exp_avg and exp_avg_sq of the owned parameters only: 1/N of the state, give or take one parameter
            assert replicated_state == 2 * local_total, where
            assert state == 2 * owned and owned <= local_total / sharers + largest, where


def _optimizer_checkpoint_rank(rank, world_size, directory):
    """One process, ZeRO over a group of 1: a sharded save reloads to the same AdamW state; a checkpoint whose
    optimizer layout or trainable parameters differ is refused with a message that says so."""
    from pathlib import Path

    directory = Path(directory)
    ids, positions, labels = tiny_batch()

    def backend_after_one_step(sharded, model=None):
        backend = megatron_backend(model or tiny_model(), world_size, 1, 1, shard_optimizer=sharded)
        out = backend.model(ids, position_ids=positions, labels=labels)
        backend.backward(out.loss)
        backend.step(loss_finite=True)
        return backend

    def state(backend):
        return [t.clone() for per_param in backend.local_optimizer.state_dict()["state"].values()
                for t in per_param.values()]

    sharded, replicated = backend_after_one_step(True), backend_after_one_step(False)
    for name, backend in (("sharded", sharded), ("replicated", replicated)):
        (directory / name).mkdir()
        backend.save(directory / name)
    reloaded = megatron_backend(tiny_model(), world_size, 1, 1, shard_optimizer=True)
    reloaded.load(directory / "sharded")
    same = all(torch.equal(a, b) for a, b in zip(state(reloaded), state(sharded), strict=True))
    errors = []
    attempts = [(replicated, "sharded"), (reloaded, "replicated")]
    frozen_head = tiny_model()
    frozen_head.lm_head.weight.requires_grad_(False)
    attempts.append((megatron_backend(frozen_head, world_size, 1, 1, shard_optimizer=True), "sharded"))
    for backend, name in attempts:
        try:
            backend.load(directory / name)
            errors.append(None)
        except (FileNotFoundError, RuntimeError) as error:
            errors.append(str(error))
    return same, sorted(p.name for p in (directory / "sharded" / "megatron").iterdir()), errors


def test_sharded_optimizer_checkpoint_reloads_exactly_and_refuses_another_layout(tmp_path):
    ((same, files, errors),) = run_distributed(_optimizer_checkpoint_rank, world_size=1, args=(str(tmp_path),),
                                               timeout_s=120)
    assert same
    assert files == ["tp-00-of-01-optimizer-00-of-01.pt", "tp-00-of-01.pt"]
    replicated_from_sharded, sharded_from_replicated, other_parameters = errors
    assert "was written with a sharded optimizer" in replicated_from_sharded
    assert "no optimizer shard for rank 0 of the 1 ranks" in sharded_from_replicated
    assert "the trainable parameters or the layout changed" in other_parameters


# ---------------------------------------------------------------------------------------------------------
# The trainer with backend.name = megatron
# ---------------------------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def _run_killed_after_step(cfg, step: int) -> None:
    """Run ``cfg`` until every rank has saved the checkpoint of global ``step``, kill every rank, and restart
    it with the same config (it resumes from that checkpoint)."""
    from sala_train.train.trainer import Trainer

    original = Trainer.save_checkpoint

    def save_then_die(self, backend, loader, state, optimizer=True):  # every rank saves, then every rank dies
        path = original(self, backend, loader, state, optimizer)
        if state["global_step"] == step:
            raise Killed()
        return path

    Trainer.save_checkpoint = save_then_die
    try:
        Trainer(cfg).run()
        raise AssertionError("the run was not killed")
    except Killed:
        pass
    finally:
        Trainer.save_checkpoint = original
    Trainer(cfg).run()


def _trainer_runs_rank(rank, world_size, checkpoints, root):
    """On 2 processes, the tiny two-stage run killed after global step 3 and restarted from its checkpoint:
    with CP=2 and the optimizer sharded over the 2 CP ranks (KL through gathered logits, then CE with
    InfLLM-V2 on), and with TP=2 (optimizer replicated: one rank per TP shard)."""
    from pathlib import Path

    from sala_train.testing.training import tiny_train_config
    from sala_train.train.config import BackendConfig

    checkpoints, root = Path(checkpoints), Path(root)
    cp2 = BackendConfig(name="megatron", context_parallel=2, shard_optimizer=True)
    _run_killed_after_step(tiny_train_config(checkpoints, root / "cp2", backend=cp2), 3)
    tp2 = BackendConfig(name="megatron", tensor_parallel=2)
    _run_killed_after_step(tiny_train_config(checkpoints, root / "tp2", backend=tp2), 3)
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


def test_killed_context_parallel_run_with_a_sharded_optimizer_follows_the_torch_backend(trainer_runs):
    """Killed after step 3 (the first step of the second stage) and resumed from every rank's AdamW shard."""
    from sala_train.testing.training import read_losses

    expected, actual = read_losses(trainer_runs / "torch"), read_losses(trainer_runs / "cp2")
    assert actual.keys() == expected.keys() == {1, 2, 3, 4}
    for step, loss in expected.items():  # 4 fp32 AdamW steps, sums regrouped: far below a wrong gradient
        assert actual[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    shards = trainer_runs / "cp2" / "checkpoints" / "stage-01-step-00000001" / "megatron"
    assert sorted(p.name for p in shards.iterdir()) == [
        "tp-00-of-01-optimizer-00-of-02.pt", "tp-00-of-01-optimizer-01-of-02.pt", "tp-00-of-01.pt"]


def test_killed_tensor_parallel_run_resumes_from_its_shards_with_the_same_losses(trainer_runs):
    from sala_train.testing.training import read_losses

    expected, resumed = read_losses(trainer_runs / "torch"), read_losses(trainer_runs / "tp2")
    assert resumed.keys() == expected.keys()
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    shards = trainer_runs / "tp2" / "checkpoints" / "stage-01-step-00000001" / "megatron"
    assert sorted(p.name for p in shards.iterdir()) == ["tp-00-of-02.pt", "tp-01-of-02.pt"]


@pytest.mark.parametrize("run", ["cp2", "tp2"])
def test_megatron_export_is_the_hf_layout_with_full_weights(trainer_runs, run):
    """The weights after the last step, whose AdamW update reads the state the resumed run loaded."""
    from sala_train.models.sala import MiniCPMSALAForCausalLM

    export = trainer_runs / run / "export" / "long"
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
