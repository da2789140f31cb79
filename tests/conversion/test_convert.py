"""Conversion: tiny MiniCPM-4 teacher + plan -> SALA checkpoint; the verification invariant; bad inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from sala_train.checkpoint import CheckpointError, CheckpointReader
from sala_train.conversion import ConversionError, convert
from sala_train.layer_selection import LayerPlan
from sala_train.make_teacher import make_teacher
from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM
from sala_train.models.sala import MiniCPMSALAForCausalLM
from sala_train.testing import assert_close

PLAN = LayerPlan.parse("SLLS")


def teacher_config(**overrides):
    values = dict(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, scale_emb=12.0, scale_depth=1.4, dim_model_base=16,
                  max_position_embeddings=512)
    values.update(overrides)
    return MiniCPMConfig(**values)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    make_teacher(teacher_config(), path, max_shard_size=60_000, progress=False)  # several shards
    return path


def test_student_has_the_spec_names_and_shapes(teacher, tmp_path):
    report = convert(teacher, PLAN, tmp_path / "student", progress=False)
    with CheckpointReader(tmp_path / "student") as reader:
        shapes = {name: reader.info(name).shape for name in reader.keys()}
    student = MiniCPMSALAForCausalLM.from_pretrained(tmp_path / "student")
    assert shapes == MiniCPMSALAForCausalLM.expected_tensor_shapes(student.config)
    assert "model.layers.0.self_attn.o_gate.weight" in shapes and "model.layers.1.self_attn.z_proj.weight" in shapes
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (64, 64)  # expanded from 2 KV heads to 4
    assert student.config.mixer_types == PLAN.mixer_types()
    assert {name for name, *_ in report.created} == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in (1, 2) for p in ("z_proj", "q_norm", "k_norm", "o_norm")
    } | {f"model.layers.{i}.self_attn.o_gate.weight" for i in (0, 3)}
    written = json.loads((tmp_path / "student" / "conversion_report.json").read_text())
    assert len(written["mapped"]) == len(report.mapped)
    assert (tmp_path / "student" / "tokenizer.json").exists()


def test_weights_are_copied_and_kv_heads_expanded(teacher, tmp_path):
    convert(teacher, PLAN, tmp_path / "student", progress=False)
    t = MiniCPMForCausalLM.from_pretrained(teacher).state_dict()
    s = MiniCPMSALAForCausalLM.from_pretrained(tmp_path / "student").state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.mlp.up_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert torch.equal(s[name], t[name]), name
    k_teacher = t["model.layers.1.self_attn.k_proj.weight"].view(2, 16, 64)
    k_student = s["model.layers.1.self_attn.k_proj.weight"].view(4, 16, 64)
    for head in range(4):  # head i takes KV head i // group
        assert torch.equal(k_student[head], k_teacher[head // 2])
    assert torch.equal(s["model.layers.1.self_attn.o_norm.weight"], torch.ones(64))


@pytest.mark.parametrize("longrope", [False, True])
def test_verification_mode_reproduces_the_teacher(tmp_path, longrope):
    rope = None
    if longrope:
        rope = {"rope_type": "longrope", "long_factor": [1.0 + i / 8 for i in range(8)],
                "short_factor": [1.0 + i / 80 for i in range(8)], "original_max_position_embeddings": 16}
    make_teacher(teacher_config(rope_scaling=rope, max_position_embeddings=64), tmp_path / "t", progress=False)
    convert(tmp_path / "t", PLAN, tmp_path / "check", verify=True, progress=False)
    teacher = MiniCPMForCausalLM.from_pretrained(tmp_path / "t")
    check = MiniCPMSALAForCausalLM.from_pretrained(tmp_path / "check")
    ids = torch.randint(0, 4096, (2, 40))  # beyond the LongRoPE original length
    with torch.no_grad():
        # identical math in fp32 up to summation order: 1e-6 relative RMS
        assert_close(check(ids).logits, teacher(ids).logits, ratio=1e-6, name="verification logits")


def test_aligned_students_replace_the_initial_lightning_weights(teacher, tmp_path):
    aligned = {"model.layers.1.self_attn.z_proj.weight": torch.full((64, 64), 0.5),
               "model.layers.1.self_attn.k_proj.weight": torch.full((64, 64), 0.25)}
    save_file(aligned, tmp_path / "aligned.safetensors")
    report = convert(teacher, PLAN, tmp_path / "student", aligned=tmp_path / "aligned.safetensors", progress=False)
    s = MiniCPMSALAForCausalLM.from_pretrained(tmp_path / "student").state_dict()
    assert torch.equal(s["model.layers.1.self_attn.z_proj.weight"], aligned["model.layers.1.self_attn.z_proj.weight"])
    assert torch.equal(s["model.layers.1.self_attn.k_proj.weight"], aligned["model.layers.1.self_attn.k_proj.weight"])
    assert any(how == "aligned student" for *_, how in report.mapped)


def test_bad_inputs_leave_no_output(teacher, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="layer plan SLS has 3 layers .* the model has 4"):
        convert(teacher, LayerPlan.parse("SLS"), out, progress=False)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(ConversionError, match="exists"):
        convert(teacher, PLAN, out, progress=False)
    out.rmdir()
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nowhere", PLAN, out, progress=False)
    assert not out.exists()


def test_missing_or_corrupt_shard_and_wrong_shape(teacher, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(teacher, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name):
        convert(broken, PLAN, tmp_path / "out", progress=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        convert(broken, PLAN, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # a teacher that is not MiniCPM-4-shaped for its config.json
    odd = tmp_path / "odd"
    shutil.copytree(teacher, odd)
    config = json.loads((odd / "config.json").read_text())
    config["intermediate_size"] = 128
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp"):
        convert(odd, PLAN, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli(teacher, tmp_path):
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    done = subprocess.run([sys.executable, "-m", "sala_train.convert", f"teacher={teacher}", "plan=SLLS",
                           f"output={tmp_path / 'student'}"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tensors mapped" in done.stdout
    assert MiniCPMSALAForCausalLM.from_pretrained(tmp_path / "student").config.mixer_types[0] == "minicpm4"


def test_layer_statistics(teacher, tmp_path):
    from sala_train.conversion import format_layer_statistics, layer_statistics, write_layer_statistics

    convert(teacher, PLAN, tmp_path / "check", verify=True, progress=False)
    exact = layer_statistics(teacher, tmp_path / "check", seq_len=64, num_sequences=2)
    assert len(exact["layers"]) == 5  # embeddings + 4 layers
    assert max(r["rel_rms"] for r in exact["layers"]) < 1e-5 and exact["output"]["top1_agreement"] == 1.0
    convert(teacher, PLAN, tmp_path / "student", progress=False)
    stats = layer_statistics(teacher, tmp_path / "student", seq_len=64, num_sequences=2)
    assert stats["layers"][0]["rel_rms"] == 0.0  # same embeddings
    assert stats["layers"][1]["rel_rms"] > 1e-3  # layer 0 gained an output gate and lost RoPE
    assert stats["output"]["kl"] > 0
    csv_file = write_layer_statistics(stats, tmp_path / "layer_stats.csv")
    assert csv_file.read_text().splitlines()[0] == "layer,rel_rms,cosine"
    assert "top-1 agreement" in format_layer_statistics(stats)
