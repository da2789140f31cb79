"""MiniCPMSALAConfig: the released keys round-trip, validation names the key, and the weight-name table of
SPEC 2.4 on 8B shapes (from expected_tensor_shapes, nothing instantiated)."""

import json

import pytest
import torch

from sala_train.models import (
    MiniCPMConfig,
    MiniCPMForCausalLM,
    SALAConfig,
    SALAForCausalLM,
    UnsupportedConfigError,
)
from sala_train.models.sala import MIXER_KINDS, MIXERS

from .test_sala import tiny_model, tiny_sala_config

SALA_SPARSE_LAYERS = [0, 9, 16, 17, 22, 29, 30, 31]

# The MiniCPM-SALA config.json keys (SPEC 2.4) with their released values.
RELEASED = {
    "architectures": ["MiniCPMSALAForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig",
                 "AutoModelForCausalLM": "modeling_minicpm_sala.MiniCPMSALAForCausalLM"},
    "model_type": "minicpm_sala",
    "mixer_types": ["minicpm4" if i in SALA_SPARSE_LAYERS else "lightning-attn" for i in range(32)],
    "sparse_config": {"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "init_blocks": 1,
                      "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192},
    "attn_use_rope": False, "attn_use_output_gate": True, "lightning_use_rope": True, "lightning_nh": 32,
    "lightning_nkv": 32, "lightning_head_dim": 128, "lightning_scale": "1/sqrt(d)", "qk_norm": True,
    "use_output_gate": True, "use_output_norm": True, "max_position_embeddings": 524288,
    "rope_theta": 10000.0, "rope_scaling": None,
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 2,
    "head_dim": 128, "intermediate_size": 16384, "vocab_size": 73448, "scale_emb": 12, "scale_depth": 1.4,
    "dim_model_base": 256, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": [2, 73440], "pad_token_id": 2, "hidden_act": "silu", "initializer_range": 0.1,
    "attention_bias": False, "torch_dtype": "bfloat16", "use_cache": True,
}


def test_released_config_round_trips(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED))
    config = SALAForCausalLM.load_config(tmp_path)
    assert config.sparse_layers == SALA_SPARSE_LAYERS and len(config.lightning_layers) == 24
    assert config.width_multiplier == 16 and config.lightning_attention_scale == 128**-0.5
    assert config.dtype == torch.bfloat16
    written = config.to_dict()
    for key, value in RELEASED.items():
        if key not in ("architectures", "torch_dtype"):  # architectures is written by save_pretrained
            assert written[key] == value, key
    assert SALAConfig.from_dict(written).to_dict() == written
    assert SALAConfig().to_dict()["mixer_types"] == RELEASED["mixer_types"]  # the defaults are the release's


def test_mixer_registry_covers_every_kind():
    assert tuple(MIXERS) == MIXER_KINDS


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(mixer_types=["minicpm4"] * 3),
         "'mixer_types' = 'a list of 3' is not supported: expected one mixer kind per layer, "
         "num_hidden_layers = 4"),
        (dict(mixer_types=["minicpm4", "mamba", "minicpm4", "minicpm4"]), "'mixer_types[1]' = 'mamba'"),
        (dict(mixer_types="minicpm4"), "'mixer_types' = 'minicpm4'"),
        (dict(sparse_config={"dense_length": 8}), "'sparse_config' = ['dense_length']"),
        (dict(sparse_config={"block_size": 24, "kernel_stride": 16}), "'sparse_config.block_size' = 24"),
        (dict(sparse_config={"topk": -1}), "'sparse_config.topk' = -1"),
        (dict(sparse_config={"dense_len": 0}), "'sparse_config.dense_len' = 0"),
        (dict(lightning_nkv=2), "'lightning_nkv' = 2 is not supported: lightning layers are full multi-head"),
        (dict(lightning_head_dim=15), "'lightning_head_dim' = 15"),
        (dict(lightning_scale="1"), "'lightning_scale' = '1'"),
        (dict(qk_norm="yes"), "'qk_norm' = 'yes'"),
        (dict(sparse_backend="fla"), "'sparse_backend' = 'fla'"),
        (dict(hidden_act="gelu"), "'hidden_act' = 'gelu'"),  # the teacher's checks still apply
    ],
)
def test_invalid_configs_name_the_key(overrides, message):
    with pytest.raises(UnsupportedConfigError) as err:
        tiny_sala_config(**overrides)
    assert message in str(err.value)


def test_bad_config_file_names_file_and_key(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["mixer_types"][2] = "lightning"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfigError, match=r"config\.json.*'mixer_types\[2\]' = 'lightning'"):
        SALAForCausalLM.from_pretrained(tmp_path / "ckpt")


FLIPPED = dict(attn_use_output_gate=False, attn_qk_norm=True, use_output_gate=False, use_output_norm=False,
               qk_norm=False)


@pytest.mark.parametrize("flags", [{}, FLIPPED], ids=["released", "flags-flipped"])
def test_state_dict_matches_expected_tensor_shapes(flags):
    model = tiny_model(**flags)
    expected = SALAForCausalLM.expected_tensor_shapes(model.config)
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == expected


def test_spec_weight_table_on_8b_shapes():
    sala = SALAConfig.from_dict({k: v for k, v in RELEASED.items() if k != "architectures"})
    shapes = SALAForCausalLM.expected_tensor_shapes(sala)
    square = (4096, 4096)
    sparse = {"q_proj": square, "k_proj": (256, 4096), "v_proj": (256, 4096), "o_proj": square,
              "o_gate": square}
    lightning = {"q_proj": square, "k_proj": square, "v_proj": square, "o_proj": square, "z_proj": square,
                 "q_norm": (128,), "k_norm": (128,), "o_norm": (4096,)}
    shared = {"mlp.gate_proj": (16384, 4096), "mlp.up_proj": (16384, 4096), "mlp.down_proj": (4096, 16384),
              "input_layernorm": (4096,), "post_attention_layernorm": (4096,)}
    for i in range(32):
        mixer = sparse if i in SALA_SPARSE_LAYERS else lightning
        table = {f"self_attn.{name}": shape for name, shape in mixer.items()} | shared
        layer = {name.removeprefix(f"model.layers.{i}."): shape for name, shape in shapes.items()
                 if name.startswith(f"model.layers.{i}.")}
        assert layer == {f"{name}.weight": shape for name, shape in table.items()}, i
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (73448, 4096)
    assert shapes["model.norm.weight"] == (4096,)

    # SPEC 3: about 1.29B more parameters than MiniCPM4-8B (KV expansion 0.75B, z_proj 0.40B, o_gate 0.13B)
    teacher_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "intermediate_size", "vocab_size", "scale_emb", "scale_depth",
                    "dim_model_base", "tie_word_embeddings")
    teacher = MiniCPMConfig(**{k: RELEASED[k] for k in teacher_keys}, max_position_embeddings=32768)
    count = lambda table: sum(torch.Size(s).numel() for s in table.values())  # noqa: E731
    extra = count(shapes) - count(MiniCPMForCausalLM.expected_tensor_shapes(teacher))
    kv_expansion = 24 * 2 * (4096 - 256) * 4096
    z_proj, o_gate, norms = 24 * 4096 * 4096, 8 * 4096 * 4096, 24 * (128 + 128 + 4096)
    assert extra == kv_expansion + z_proj + o_gate + norms
    assert extra == pytest.approx(1.29e9, rel=0.01)
