"""The tiny-teacher factory, the recipes it composes, and the two CLIs of `make demo`."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sala_train.config import register_configs
from sala_train.make_teacher import MakeTeacherConfig, make_teacher
from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM
from sala_train.tokenizer import load_tokenizer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def compose_make_teacher(model: str) -> MakeTeacherConfig:
    register_configs()
    with initialize_config_module(config_module="sala_train.recipes", version_base="1.3"):
        cfg = compose("make_teacher", overrides=[f"model={model}", "output_dir=out"])
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("model", sorted(p.stem for p in (RECIPES / "model").glob("*.yaml")))
def test_every_model_recipe_composes_into_a_valid_config(model):
    cfg = compose_make_teacher(model)
    config = cfg.model.to_hf_config()
    assert isinstance(config, MiniCPMConfig)
    assert MiniCPMForCausalLM.expected_tensor_shapes(config)


def test_8b_recipe_has_the_published_shape():
    config = compose_make_teacher("minicpm4_8b").model.to_hf_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == (4096, 32, 2, 73448)
    assert config.width_multiplier == 16 and config.rope_scaling["rope_type"] == "longrope"


def test_misspelt_or_mistyped_recipe_values_are_rejected():
    register_configs()
    with initialize_config_module(config_module="sala_train.recipes", version_base="1.3"):
        with pytest.raises(Exception, match="model.hiden_size"):
            compose("make_teacher", overrides=["model=tiny", "model.hiden_size=3", "output_dir=x"])
        with pytest.raises(Exception, match="hidden_size"):
            compose("make_teacher", overrides=["model=tiny", "model.hidden_size=wide", "output_dir=x"])


def _digest(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.glob("*.safetensors")))).hexdigest()


def test_factory_writes_a_loadable_deterministic_sharded_checkpoint(tmp_path):
    config = compose_make_teacher("tiny").model.to_hf_config()
    a = make_teacher(config, tmp_path / "a", seed=3, max_shard_size=400_000, progress=False)
    b = make_teacher(config, tmp_path / "b", seed=3, max_shard_size=400_000, progress=False)
    c = make_teacher(config, tmp_path / "c", seed=4, max_shard_size=400_000, progress=False)
    assert (a / "model.safetensors.index.json").exists() and len(list(a.glob("model-*.safetensors"))) > 1
    assert _digest(a) == _digest(b) != _digest(c)
    model = MiniCPMForCausalLM.from_pretrained(a)
    assert model.config.num_hidden_layers == config.num_hidden_layers
    # init follows the config: norms are ones, matrices have std initializer_range / sqrt(width multiplier)
    assert torch.equal(model.model.norm.weight, torch.ones(config.hidden_size))
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - config.initializer_range / config.width_multiplier**0.5) < 0.1 * std
    tokenizer = load_tokenizer(a)
    assert len(tokenizer) <= config.vocab_size


def test_factory_rejects_a_vocab_smaller_than_the_tokenizer(tmp_path):
    config = compose_make_teacher("tiny").model.to_hf_config()
    config.vocab_size = 100
    with pytest.raises(ValueError, match="raise model.vocab_size to at least 4096"):
        make_teacher(config, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_make_teacher_then_generate(tmp_path):
    made = _run("sala_train.make_teacher", "model=tiny", "model.num_hidden_layers=2", "output_dir=teacher", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "teacher" / "config.json").exists()
    assert not (tmp_path / "outputs").exists(), "hydra must not create output folders"
    gen = _run("sala_train.generate", "model_dir=teacher", "prompt=Hello there", "max_new_tokens=5", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert "generated:" in gen.stdout and "prompt:     Hello there" in gen.stdout
    missing = _run("sala_train.generate", "model_dir=nowhere", cwd=tmp_path)
    assert missing.returncode != 0 and "nowhere" in missing.stderr
