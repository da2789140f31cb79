"""The DeepSpeed backend: ZeRO 1, 2 and 3 on 2 CPU processes (gloo) follow the single-process torch backend's
loss curve, keep the muP learning rates, skip a step whose loss is NaN on one rank, resume a killed run with
the same losses, and export full weights that load.

All DeepSpeed runs share one pair of processes (the ``runs`` fixture): starting processes that import torch,
transformers and DeepSpeed costs more than the tiny runs themselves.

The tiny teacher/student and the two stages are those of test_trainer.py (sala_train.testing.training). The
student has width multiplier hidden_size / dim_model_base = 2, so the muP groups
train at different LRs: a backend that dropped lr_scale would leave the torch curve from step 2 on.
"""

import math
from pathlib import Path

import pytest
import torch

from sala_train.testing import assert_close, requires_module, run_distributed
from sala_train.testing.training import make_tiny_checkpoints, read_losses, read_metrics, tiny_train_config
from sala_train.train.config import BackendConfig, RecipeError, StageConfig, TrainConfig
from sala_train.train.trainer import Trainer

pytestmark = requires_module("deepspeed")

ZERO_STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


def make_config(checkpoints: Path, run_dir: Path, backend: BackendConfig) -> TrainConfig:
    return tiny_train_config(checkpoints, run_dir, backend=backend)


def deepspeed(zero_stage: int) -> BackendConfig:
    return BackendConfig(name="deepspeed", zero_stage=zero_stage)


losses = read_losses


class Killed(Exception):
    pass


def _partition_everything():
    # the tiny model's tensors are all below DeepSpeed's ZeRO-3 persistence threshold: partition them anyway
    import sala_train.parallel.deepspeed as deepspeed_backend

    deepspeed_backend.ZERO3_PERSISTENCE_THRESHOLD = 0


def _optimizer_groups(checkpoints: Path, zero: int) -> dict:
    """The groups of the torch AdamW that ZeRO steps (inside DeepSpeed's optimizer) after set_learning_rate."""
    from sala_train.models.sala import MiniCPMSALAForCausalLM
    from sala_train.parallel.deepspeed import DeepSpeedBackend
    from sala_train.train.params import param_groups
    from sala_train.train.schedules import set_learning_rate

    model = MiniCPMSALAForCausalLM.from_pretrained(checkpoints / "student", dtype="float32")
    stage = make_config(checkpoints, checkpoints / "unused", deepspeed(zero)).stages[1]
    backend = DeepSpeedBackend(model, param_groups(model, 1e-3, 0.1), stage, 1, world_size=2,
                               device=torch.device("cpu"), config=deepspeed(zero))
    set_learning_rate(backend.optimizer, 2e-3)
    inner = backend.optimizer.optimizer
    groups = {"inner_is_torch_adamw": type(inner) is torch.optim.AdamW,
              "groups": [(g["name"], g["lr_scale"], g["lr"], g["weight_decay"]) for g in inner.param_groups]}
    backend.close()
    return groups


def _zero_runs_rank(rank, world, checkpoints, root):
    """Every ZeRO stage uninterrupted; ZeRO-2 with a NaN loss on rank 1 at step 2; ZeRO-3 killed after
    logging step 4 (mid-stage: the second step of "long") and restarted. Returns the optimizer groups that
    each ZeRO stage steps with."""
    _partition_everything()
    checkpoints, root = Path(checkpoints), Path(root)
    groups = {zero: _optimizer_groups(checkpoints, zero) for zero in ZERO_STAGES}
    for zero in ZERO_STAGES:
        Trainer(make_config(checkpoints, root / f"zero{zero}", deepspeed(zero))).run()

    original_loss, calls = Trainer._loss, []
    def nan_on_rank_1_at_step_2(self, *args):  # stage "align" runs one micro-batch per step on 2 ranks
        calls.append(None)
        loss = original_loss(self, *args)
        return loss * float("nan") if rank == 1 and len(calls) == 2 else loss
    Trainer._loss = nan_on_rank_1_at_step_2
    try:
        Trainer(make_config(checkpoints, root / "nan", deepspeed(2))).run()
    finally:
        Trainer._loss = original_loss

    original = Trainer._log
    def log_then_die(self, record):  # every rank dies right after step 4 (only rank 0 writes the record)
        original(self, record)
        if record["global_step"] == 4:
            raise Killed()
    Trainer._log = log_then_die
    try:
        Trainer(make_config(checkpoints, root / "killed", deepspeed(3))).run()
    except Killed:
        pass
    else:
        raise AssertionError("the run was not killed")
    finally:
        Trainer._log = original
    # the checkpoint of step 4 was not written yet (saved after logging): the restart loads step 3's DeepSpeed
    # shards (optimizer moments, fp32 partitions) and redoes step 4
    if rank == 0:
        metrics = root / "killed" / "metrics.jsonl"
        metrics.write_text("\n".join(metrics.read_text().splitlines()[:3]) + "\n")
    torch.distributed.barrier()
    Trainer(make_config(checkpoints, root / "killed", deepspeed(3))).run()
    return groups


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """The single-process torch reference and the 2-process DeepSpeed runs (one set of processes for all):
    (root folder of the runs, rank 0's optimizer groups per ZeRO stage)."""
    root = tmp_path_factory.mktemp("runs")
    Trainer(make_config(checkpoints, root / "torch", BackendConfig(name="torch"))).run()
    groups, _ = run_distributed(_zero_runs_rank, 2, args=(str(checkpoints), str(root)), timeout_s=600)
    return root, groups


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", ZERO_STAGES)
def test_zero_on_two_processes_matches_one_torch_process(runs, zero_stage):
    root, _ = runs
    expected, actual = read_metrics(root / "torch"), read_metrics(root / f"zero{zero_stage}")
    assert [r["global_step"] for r in actual] == [r["global_step"] for r in expected] == [1, 2, 3, 4]
    for want, got in zip(expected, actual):
        # same global batch split over 2 ranks, fp32: equal up to reduction order (observed <= 5e-6 relative).
        # The first stage's KL is ~6e-4, a difference of near-equal log-probabilities: its rounding is
        # absolute (observed 3e-9), hence abs=1e-7. Dropping muP's lr_scale moves step 2 by 1.6e-5.
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7), (zero_stage, want["global_step"])
        # torch's fp32 clip_grad_norm_ is itself 2e-5 off a float64 norm here (DeepSpeed's is within 1e-8)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (zero_stage, want["global_step"])
        assert got["lr"] == want["lr"] and not got["skipped"]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", ZERO_STAGES)
def test_zero_steps_our_adamw_with_the_mup_learning_rates(runs, zero_stage):
    _, groups = runs
    found = groups[zero_stage]
    assert found["inner_is_torch_adamw"]
    # width multiplier hidden_size / dim_model_base = 32 / 16 = 2: matrices at half the schedule's LR
    assert found["groups"] == [("matrices", 0.5, 1e-3, 0.1), ("vocabulary", 1.0, 2e-3, 0.0),
                               ("vectors", 1.0, 2e-3, 0.0)]


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_skips_the_step_on_both(runs):
    root, _ = runs
    records = read_metrics(root / "nan")
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert math.isnan(records[1]["loss"]) and all(math.isfinite(r["loss"]) for r in records[2:])
    from safetensors.torch import load_file

    # the skipped step 2 left the weights as step 1 made them: the stage-end checkpoint equals step 1's
    after_step_1 = load_file(root / "nan" / "checkpoints" / "stage-00-step-00000001" / "model" / "model.safetensors")
    after_step_2 = load_file(root / "nan" / "checkpoints" / "stage-01-step-00000000" / "model" / "model.safetensors")
    for name, tensor in after_step_1.items():
        assert torch.equal(tensor, after_step_2[name]), name


@pytest.mark.slow
def test_killed_zero3_run_resumes_with_the_same_losses(runs):
    root, _ = runs
    expected, resumed = losses(root / "zero3"), losses(root / "killed")
    assert resumed.keys() == expected.keys()
    for step in expected:  # the same DeepSpeed shards, batches and RNG: identical up to 1e-6 relative
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step
    assert (root / "killed" / "checkpoints" / "stage-01-step-00000001" / "deepspeed").is_dir()
    # the loss of the redone step 4 was computed before its update; the weights after it show whether the
    # optimizer state came back (with a fresh AdamW they end 4e-4 of their RMS away)
    from sala_train.models.sala import MiniCPMSALAForCausalLM

    final = MiniCPMSALAForCausalLM.from_pretrained(root / "killed" / "export" / "long", dtype="float32")
    expected = MiniCPMSALAForCausalLM.from_pretrained(root / "zero3" / "export" / "long", dtype="float32").state_dict()
    for name, tensor in final.state_dict().items():
        assert_close(tensor, expected[name], ratio=1e-6, name=name)


@pytest.mark.slow
def test_zero3_export_loads_with_the_full_trained_weights(runs):
    from sala_train.models.sala import MiniCPMSALAForCausalLM

    root, _ = runs
    exported = MiniCPMSALAForCausalLM.from_pretrained(root / "zero3" / "export" / "long", dtype="float32")
    reference = MiniCPMSALAForCausalLM.from_pretrained(root / "torch" / "export" / "long", dtype="float32")
    expected = reference.state_dict()
    assert exported.state_dict().keys() == expected.keys()
    for name, tensor in exported.state_dict().items():
        # 4 fp32 AdamW steps that differ only in reduction order: observed error ratio <= 2e-7
        assert_close(tensor, expected[name], ratio=1e-5, name=name)


def test_deepspeed_config_follows_the_stage_and_the_backend():
    from sala_train.parallel.deepspeed import deepspeed_config

    stage = StageConfig(micro_batch_size=2)
    stage.optimizer.grad_clip = 0.5
    config = deepspeed_config(stage, 4, 8, BackendConfig(name="deepspeed", zero_stage=3, offload_optimizer=True,
                                                         bf16=True))
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (2, 4, 2 * 4 * 8)
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["bf16"]["enabled"] and config["data_types"]["grad_accum_dtype"] == "fp32"
    plain = deepspeed_config(stage, 1, 1, BackendConfig(name="deepspeed", zero_stage=1))
    assert "bf16" not in plain and "offload_optimizer" not in plain["zero_optimization"]


@pytest.mark.parametrize("backend,message", [
    (BackendConfig(name="deepspeed", zero_stage=0), "zero_stage = 0"),
    (BackendConfig(name="torch", bf16=True), "bf16 = true needs backend.name=deepspeed"),
    (BackendConfig(name="torch", tensor_parallel=2), "need backend.name=megatron"),
])
def test_impossible_backends_fail_before_loading(checkpoints, tmp_path, backend, message):
    with pytest.raises(RecipeError, match=message):
        Trainer(make_config(checkpoints, tmp_path / "bad", backend))
    assert not (tmp_path / "bad").exists()
