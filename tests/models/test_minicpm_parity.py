"""Parity of our MiniCPM-4 with transformers' Llama on the same weights (fp32, CPU, tiny configs).

Neutral muP scalings: logits equal Llama's directly. Real scalings: they equal Llama's with the scalings
folded into the weights (embeddings x scale_emb, o_proj/down_proj x scale_depth/sqrt(L),
lm_head / (hidden/dim_model_base)).
"""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM
from sala_train.testing import assert_close

# fp32 end to end; SDPA vs eager matmul differ only by summation order: 1e-5 relative RMS is generous
# for 3 layers yet far below any real mismatch (a wrong scaling or rotation gives ratios of 1e-1).
PARITY_RATIO = 1e-5


def tiny_config(**overrides) -> MiniCPMConfig:
    values = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.05,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    values.update(overrides)
    return MiniCPMConfig(**values)


def llama_twin(config: MiniCPMConfig, model: MiniCPMForCausalLM, fold_scalings: bool) -> LlamaForCausalLM:
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_theta": config.rope_theta, **config.rope_scaling}
    tie = config.tie_word_embeddings and not fold_scalings
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=tie, attn_implementation="eager",
    )
    llama = LlamaForCausalLM(llama_config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    if fold_scalings:
        state["model.embed_tokens.weight"] *= config.scale_emb
        for i in range(config.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.o_proj.weight"] *= config.residual_scale
            state[f"model.layers.{i}.mlp.down_proj.weight"] *= config.residual_scale
        state["lm_head.weight"] /= config.width_multiplier
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return llama


def longrope(head_dim: int, original: int) -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "rope_type": "longrope",
        "long_factor": (1.0 + 3.0 * torch.rand(head_dim // 2, generator=g)).tolist(),
        "short_factor": (1.0 + 0.2 * torch.rand(head_dim // 2, generator=g)).tolist(),
        "original_max_position_embeddings": original,
    }


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_neutral_scalings_match_llama(kv_heads, tied):
    torch.manual_seed(0)
    config = tiny_config(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    model = MiniCPMForCausalLM(config).eval()
    llama = llama_twin(config, model, fold_scalings=False)
    ids = torch.randint(0, config.vocab_size, (2, 23))
    with torch.no_grad():
        assert_close(model(ids).logits, llama(ids).logits, ratio=PARITY_RATIO, name="logits")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_mup_scalings_match_llama_with_folded_weights(tied):
    torch.manual_seed(1)
    config = tiny_config(scale_emb=12.0, scale_depth=1.4, dim_model_base=16, tie_word_embeddings=tied)
    assert config.width_multiplier == 4.0 and math.isclose(config.residual_scale, 1.4 / math.sqrt(3))
    model = MiniCPMForCausalLM(config).eval()
    llama = llama_twin(config, model, fold_scalings=True)
    ids = torch.randint(0, config.vocab_size, (2, 19))
    with torch.no_grad():
        ours, theirs = model(ids).logits, llama(ids).logits
        assert ours.dtype == torch.float32
        assert_close(ours, theirs, ratio=PARITY_RATIO, name="logits")
        # the scalings matter: without folding the twin must disagree
        unfolded = llama_twin(config, model, fold_scalings=False)
        assert (unfolded(ids).logits - ours).abs().max() > 1e-2


@pytest.mark.parametrize("length", [12, 16, 29], ids=["below-original", "at-original", "beyond-original"])
def test_longrope_matches_llama(length):
    torch.manual_seed(2)
    config = tiny_config(max_position_embeddings=64, rope_scaling=longrope(16, original=16),
                         scale_emb=12.0, scale_depth=1.4, dim_model_base=16)
    model = MiniCPMForCausalLM(config).eval()
    llama = llama_twin(config, model, fold_scalings=True)
    ids = torch.randint(0, config.vocab_size, (1, length))
    with torch.no_grad():
        assert_close(model(ids).logits, llama(ids).logits, ratio=PARITY_RATIO, name=f"logits T={length}")


def test_longrope_switches_factors_past_original_length():
    config = tiny_config(max_position_embeddings=64, rope_scaling=longrope(16, original=16))
    rotary = MiniCPMForCausalLM(config).model.rotary_emb
    positions = torch.arange(8)[None]
    short_cos, _ = rotary(positions, seq_len=16)
    long_cos, _ = rotary(positions, seq_len=17)
    assert not torch.allclose(short_cos, long_cos)
    # attention scaling sqrt(1 + ln(64/16)/ln(16)) on both
    assert math.isclose(rotary.attention_scaling, math.sqrt(1 + math.log(4) / math.log(16)))


def test_gradients_match_llama():
    torch.manual_seed(3)
    config = tiny_config()
    model = MiniCPMForCausalLM(config)
    llama = llama_twin(config, model, fold_scalings=False).train()
    ids = torch.randint(0, config.vocab_size, (2, 17))
    model(ids, labels=ids).loss.backward()
    llama(ids, labels=ids).loss.backward()
    theirs = dict(llama.named_parameters())
    for name, param in model.named_parameters():
        assert_close(param.grad, theirs[name].grad, ratio=1e-4, name=f"grad {name}")
