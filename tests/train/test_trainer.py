"""The staged trainer: runs the stages, resumes exactly, matches itself across 2 data-parallel processes,
and refuses impossible recipes before loading anything."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sala_train.config import register_configs
from sala_train.testing import run_distributed
from sala_train.testing.training import make_tiny_checkpoints, read_losses, tiny_train_config
from sala_train.train.config import RecipeError, TrainConfig
from sala_train.train.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


def make_config(checkpoints, run_dir, **overrides) -> TrainConfig:
    return tiny_train_config(checkpoints, run_dir, **overrides)


losses = read_losses


class Killed(Exception):
    pass


def test_runs_every_stage_and_exports(checkpoints, tmp_path):
    Trainer(make_config(checkpoints, tmp_path / "run", eval_lengths=[128, 256])).run()
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 5))  # 2 + 2 optimizer steps
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss@256" in r]
    assert [r["stage"] for r in evals] == ["align", "long"]  # after each stage
    assert all(r["eval/passkey_logprob@128"] < 0 for r in evals)
    steps = [r for r in records if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 for r in steps)
    assert "mfu" not in steps[0]  # no known peak on a CPU
    assert (tmp_path / "run" / "export" / "long" / "config.json").exists()
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000


def test_resume_continues_with_the_same_losses(checkpoints, tmp_path, monkeypatch):
    Trainer(make_config(checkpoints, tmp_path / "full")).run()
    expected = losses(tmp_path / "full")

    original = Trainer._log
    def log_then_die(self, record):  # the process dies right after logging global step 4 (stage 2, step 2)
        original(self, record)
        if record.get("global_step") == 4 and "loss" in record:
            raise Killed()
    monkeypatch.setattr(Trainer, "_log", log_then_die)
    with pytest.raises(Killed):
        Trainer(make_config(checkpoints, tmp_path / "killed")).run()
    monkeypatch.setattr(Trainer, "_log", original)
    # the last checkpoint is mid-stage (stage 2 after its step 1: model, optimizer, data position); step 4
    # was logged but not saved, so the restart redoes it from that state
    assert (tmp_path / "killed" / "checkpoints" / "stage-01-step-00000001" / "optimizer.pt").exists()
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "killed" / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    Trainer(make_config(checkpoints, tmp_path / "killed")).run()
    resumed = losses(tmp_path / "killed")
    assert resumed.keys() == expected.keys()
    for step in expected:  # fp32 on CPU, same batches and optimizer state: identical up to 1e-6 relative
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step


def test_pretrains_a_dense_teacher_and_resumes(checkpoints, tmp_path, monkeypatch):
    """A checkpoint with model_type "minicpm" trains as the dense MiniCPM-4 (pretraining a teacher from random
    weights, the quality study's first step); a killed run resumes with the same losses."""
    from dataclasses import replace

    def dense_config(run_dir):
        cfg = make_config(checkpoints, run_dir, student=str(checkpoints / "teacher"), teacher=None)
        cfg.stages = [replace(cfg.stages[1], name="pretrain", sparse=False, loss="ce")]
        return cfg

    Trainer(dense_config(tmp_path / "full")).run()
    expected = losses(tmp_path / "full")
    exported = json.loads((tmp_path / "full" / "export" / "pretrain" / "config.json").read_text())
    assert exported["model_type"] == "minicpm" and exported["architectures"] == ["MiniCPMForCausalLM"]

    original = Trainer._log
    def log_then_die(self, record):
        original(self, record)
        if record.get("global_step") == 2 and "loss" in record:  # after the checkpoint of step 1
            raise Killed()
    monkeypatch.setattr(Trainer, "_log", log_then_die)
    with pytest.raises(Killed):
        Trainer(dense_config(tmp_path / "killed")).run()
    monkeypatch.setattr(Trainer, "_log", original)
    Trainer(dense_config(tmp_path / "killed")).run()
    resumed = losses(tmp_path / "killed")
    for step in expected:  # fp32 on CPU, same batches and optimizer state
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step


def _train_rank(rank, world, checkpoints, run_dir):
    cfg = make_config(Path(checkpoints), Path(run_dir))
    Trainer(cfg).run()
    return losses(run_dir) if rank == 0 else None


@pytest.mark.slow
def test_two_data_parallel_processes_match_one(checkpoints, tmp_path):
    Trainer(make_config(checkpoints, tmp_path / "one")).run()
    (two,) = [r for r in run_distributed(_train_rank, 2, args=(str(checkpoints), str(tmp_path / "two")),
                                         timeout_s=600) if r is not None]
    one = losses(tmp_path / "one")
    for step in one:  # same global batch split over 2 ranks (DDP averages): equal up to fp32 reordering
        assert two[step] == pytest.approx(one[step], rel=1e-5), step


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: setattr(s[0], "global_batch_tokens", 100), "not a multiple of seq_len x micro_batch_size"),
        (lambda s: setattr(s[1], "tokens", 128), "smaller than one optimizer step"),
        (lambda s: setattr(s[0], "loss", "mse"), "loss = 'mse'"),
    ],
)
def test_impossible_recipes_fail_before_loading(checkpoints, tmp_path, change, message):
    cfg = make_config(checkpoints, tmp_path / "bad")
    change(cfg.stages)
    with pytest.raises(RecipeError, match=message):
        Trainer(cfg)
    assert not (tmp_path / "bad").exists()


def test_unknown_trainable_pattern_fails_before_loading(checkpoints, tmp_path, monkeypatch):
    from sala_train.train.params import TrainableSelectionError

    cfg = make_config(checkpoints, tmp_path / "typo")
    cfg.stages[0].trainable = ["lightnin*"]
    monkeypatch.setattr(Trainer, "_load_student", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(TrainableSelectionError, match="lightnin"):
        Trainer(cfg)


def test_kl_without_teacher_is_refused(checkpoints, tmp_path):
    with pytest.raises(RecipeError, match="needs a teacher"):
        Trainer(make_config(checkpoints, tmp_path / "x", teacher=None))


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_shard_optimizer_is_refused_outside_the_megatron_backend(backend):
    from sala_train.train.config import StageConfig

    cfg = TrainConfig(student="s", run_dir="r", stages=[StageConfig(seq_len=8, tokens=8)])
    cfg.backend.name, cfg.backend.shard_optimizer = backend, True
    with pytest.raises(RecipeError, match="shard_optimizer = true is the megatron backend's ZeRO-1"):
        cfg.validate()
    cfg.backend.shard_optimizer = None  # the default: on for megatron where it helps, nothing elsewhere
    cfg.validate()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (RECIPES / "experiment").glob("*.yaml")))
def test_every_experiment_recipe_composes_and_validates(experiment):
    register_configs()
    with initialize_config_module(config_module="sala_train.recipes", version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}", "student=s", "teacher=t", "run_dir=r"])
    train_cfg = OmegaConf.to_object(cfg)
    assert isinstance(train_cfg, TrainConfig) and train_cfg.stages
    train_cfg.validate(data_parallel_size=1)


@pytest.mark.parametrize("experiment, gpus", [
    ("minicpm_sala_8b_128k_tp2cp2", 4), ("minicpm_sala_8b_128k_tp2cp2", 8),
    ("minicpm_sala_8b_32k_zero3", 4), ("minicpm_sala_8b_32k_zero3", 8),
])
def test_issue_11_recipes_run_50_steps_with_a_checkpoint_at_25_on_4_and_8_gpus(experiment, gpus):
    from sala_train.train.trainer import data_parallel_size

    register_configs()
    with initialize_config_module(config_module="sala_train.recipes", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[f"+experiment={experiment}", "student=s", "run_dir=r"]))
    data_world = data_parallel_size(cfg.backend, gpus)
    cfg.validate(data_world)
    (stage,) = cfg.stages
    assert stage.plan(data_world)[1] == 50 and stage.save_every == 25
    assert cfg.teacher is None and cfg.backend.bf16 and cfg.backend.activation_checkpointing
    assert Path(stage.data.sources[0].path).is_file()  # the committed text: runs without a data set
    if cfg.backend.name == "megatron":
        assert (cfg.backend.tensor_parallel, cfg.backend.context_parallel, stage.seq_len) == (2, 2, 131072)
        assert cfg.backend.shard_optimizer
    else:
        assert (cfg.backend.zero_stage, stage.seq_len) == (3, 32768)


def test_minicpm_sala_8b_recipe_is_the_paper_stage_table():
    register_configs()
    with initialize_config_module(config_module="sala_train.recipes", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=["+experiment=minicpm_sala_8b", "student=s", "teacher=t",
                                                               "run_dir=r"]))
    table = [(s.name, s.seq_len, s.tokens, s.sparse, s.schedule.lr, s.schedule.final_lr) for s in cfg.stages]
    assert table == [
        ("conversion", 512, 1_300_000_000, False, 1e-3, 1e-5),
        ("stable", 4096, 314_600_000_000, False, 7.5e-3, None),
        ("short_decay", 4096, 1_006_600_000_000, False, 7.5e-3, 3.75e-4),
        ("long_32k", 32768, 102_200_000_000, True, 3e-4, 2e-4),
        ("long_160k", 163840, 62_900_000_000, True, 2e-4, 1e-4),
        ("long_520k", 532480, 50_600_000_000, True, 1e-4, 3.75e-5),
        ("sft_64k", 65536, 204_500_000_000, True, 1e-3, 1e-4),
        ("sft_140k", 143360, 213_300_000_000, True, 1e-3, 1e-4),
    ]
    assert cfg.stages[0].trainable == ["lightning"] and cfg.stages[1].trainable == ["all"]
    assert cfg.stages[1].schedule.warmup_steps == 2000 and cfg.stages[6].schedule.warmup_steps == 1000
    # global batches within 1% of the paper's (7.8M, 9.8M, 10.1M, 15.7M, 17.8M tokens) on 8 ranks
    paper = {"stable": 7.8e6, "long_160k": 9.8e6, "long_520k": 10.1e6, "sft_64k": 15.7e6, "sft_140k": 17.8e6}
    for stage in cfg.stages:
        if stage.name in paper:
            assert abs(stage.global_batch_tokens / paper[stage.name] - 1) < 0.01
    accumulation, steps = cfg.stages[1].plan(data_parallel_size=8)
    assert (accumulation, steps) == (238, 40_340)


def test_checkpoint_layers_reach_the_model_and_negative_ones_are_refused(checkpoints, tmp_path):
    cfg = make_config(checkpoints, tmp_path / "partial")
    cfg.backend.activation_checkpointing, cfg.backend.checkpoint_layers = True, 1
    model = Trainer(cfg)._load_student(Path(cfg.student))
    assert model.model.gradient_checkpointing and model.model.checkpoint_layers == 1
    cfg.backend.checkpoint_layers = -2
    with pytest.raises(RecipeError, match="checkpoint_layers = -2"):
        cfg.validate()


def test_without_a_progress_bar_the_trainer_logs_periodic_lines(checkpoints, tmp_path, caplog):
    """logging.progress=false (batch jobs, multi-GPU runs): a line at the first and last step of each stage and
    every logging.log_seconds between, with step, loss and time left."""
    import logging

    cfg = make_config(checkpoints, tmp_path / "run")
    cfg.logging.progress, cfg.logging.log_seconds = False, 0.0  # 0: a line every step
    with caplog.at_level(logging.INFO, logger="sala_train.train.trainer"):
        Trainer(cfg).run()
    lines = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["stage 0 align"] * 2 + ["stage 1 long"] * 2
    assert "step 2/2, loss " in lines[1] and "left" in lines[1]
