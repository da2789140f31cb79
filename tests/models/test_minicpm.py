"""MiniCPM-4 behaviour: packed sequences, KV cache, generation, save/load, and errors on bad inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sala_train.checkpoint import DtypeMismatchError, MissingKeysError, ShapeMismatchError, UnexpectedKeysError
from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM, UnsupportedConfigError
from sala_train.testing import assert_close

from .test_minicpm_parity import longrope, tiny_config

# The cache path and the full forward run the same fp32 math with different reduction shapes
# (SDPA over a cache vs a causal prefill); 1e-5 relative RMS bounds the reordering error.
CACHE_RATIO = 1e-5


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MiniCPMForCausalLM(tiny_config(scale_emb=12.0, scale_depth=1.4, dim_model_base=16)).eval()


# -- packed sequences --------------------------------------------------------------------------------

def test_packed_documents_equal_separate_runs(model):
    lengths = [7, 1, 12]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    cu_seqlens = torch.tensor([0, 7, 8, 20])
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        separate = torch.cat([model(d).logits for d in docs], dim=1)
        by_cu = model(packed, cu_seqlens=cu_seqlens).logits
        by_positions = model(packed, position_ids=position_ids).logits
        unpacked = model(packed).logits
    assert_close(by_cu, separate, ratio=CACHE_RATIO, name="packed via cu_seqlens")
    assert_close(by_positions, separate, ratio=CACHE_RATIO, name="packed via position_ids")
    # without boundaries the later documents see the earlier ones: must differ
    assert (unpacked[:, 8:] - separate[:, 8:]).abs().max() > 1e-3


def test_packed_batch_rows_with_restarting_positions(model):
    rows = torch.randint(0, 97, (2, 10))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])
    with torch.no_grad():
        packed = model(rows, position_ids=position_ids).logits
        expected_row0 = torch.cat([model(rows[:1, :4]).logits, model(rows[:1, 4:]).logits], dim=1)
        expected_row1 = torch.cat([model(rows[1:, :8]).logits, model(rows[1:, 8:]).logits], dim=1)
    assert_close(packed[:1], expected_row0, ratio=CACHE_RATIO, name="row 0")
    assert_close(packed[1:], expected_row1, ratio=CACHE_RATIO, name="row 1")


def test_packed_loss_ignores_cross_document_targets(model):
    ids = torch.randint(0, 97, (1, 12))
    cu = torch.tensor([0, 5, 12])
    with torch.no_grad():
        packed_loss = model(ids, cu_seqlens=cu, labels=ids).loss
        a, b = model(ids[:, :5], labels=ids[:, :5]).loss, model(ids[:, 5:], labels=ids[:, 5:]).loss
    # token-weighted mean of the per-document losses (4 and 6 targets)
    torch.testing.assert_close(packed_loss, (a * 4 + b * 6) / 10, rtol=1e-5, atol=1e-6)


def test_cu_seqlens_errors(model):
    ids = torch.randint(0, 97, (2, 6))
    with pytest.raises(ValueError, match="batch of 1"):
        model(ids, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="end at the sequence length 6"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 3, 5]))


# -- KV cache ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefill", [1, 5, 13])
def test_incremental_decoding_equals_full_forward(model, prefill):
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :prefill], past_key_values=cache).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert cache.get_seq_length() == 21
    assert_close(torch.cat(steps, dim=1), full, ratio=CACHE_RATIO, name="cached logits")


def test_chunked_prefill_equals_full_forward(model):
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        chunks = [model(ids[:, s : s + 7], past_key_values=cache).logits for s in range(0, 30, 7)]
    assert_close(torch.cat(chunks, dim=1), full, ratio=CACHE_RATIO, name="chunked prefill")


def test_cache_grows_past_initial_capacity():
    torch.manual_seed(0)
    model = MiniCPMForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        cache.initial_capacity = 4
        steps = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(40)]
    assert cache.keys[0].shape[1] >= 40
    assert_close(torch.cat(steps, dim=1), full, ratio=CACHE_RATIO, name="decode with regrowth")


def test_longrope_cache_matches_full_forward_below_original_length():
    torch.manual_seed(0)
    model = MiniCPMForCausalLM(tiny_config(rope_scaling=longrope(16, original=32))).eval()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :8], past_key_values=cache).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(8, 20)]
    assert_close(torch.cat(steps, dim=1), full, ratio=CACHE_RATIO, name="longrope cached")


# -- generation --------------------------------------------------------------------------------------

def test_greedy_generate_equals_argmax_loop_without_cache(model):
    prompt = torch.randint(0, 97, (1, 6))
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=[])
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_left_padded_batch_generates_like_single_prompts(model):
    a, b = torch.randint(3, 97, (1, 9)), torch.randint(3, 97, (1, 4))
    pad = 0
    batch = torch.cat([a, torch.cat([torch.full((1, 5), pad), b], dim=1)], dim=0)
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, eos_token_id=[], pad_token_id=pad)
    alone_a = model.generate(a, max_new_tokens=6, eos_token_id=[])
    alone_b = model.generate(b, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out[0], alone_a[0])
    assert torch.equal(out[1, 5:], alone_b[0])


def test_generate_stops_at_eos_and_pads(model):
    prompt = torch.randint(0, 97, (2, 5))
    first = model.generate(prompt, max_new_tokens=1, eos_token_id=[])[:, -1]
    eos = int(first[0])
    out = model.generate(prompt, max_new_tokens=5, eos_token_id=eos, pad_token_id=96)
    assert out[0, 5] == eos
    assert (out[0, 6:] == 96).all()


def test_sampling_is_reproducible_and_top_k_one_is_greedy(model):
    prompt = torch.randint(0, 97, (1, 5))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.9, generator=g1, eos_token_id=[])
    s2 = model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.9, generator=g2, eos_token_id=[])
    assert torch.equal(s1, s2)
    top1 = model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=[])
    assert torch.equal(top1, model.generate(prompt, max_new_tokens=6, eos_token_id=[]))


def test_chunked_prefill_generation_matches(model):
    prompt = torch.randint(0, 97, (1, 23))
    plain = model.generate(prompt, max_new_tokens=5, eos_token_id=[])
    chunked = model.generate(prompt, max_new_tokens=5, eos_token_id=[], prefill_chunk_size=6)
    assert torch.equal(plain, chunked)


# -- save / load -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, tied, dtype):
    torch.manual_seed(0)
    config = tiny_config(tie_word_embeddings=tied, rope_scaling=longrope(16, 32), scale_emb=12.0,
                         scale_depth=1.4, dim_model_base=16)
    model = MiniCPMForCausalLM(config).to(dtype).eval()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    saved_config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved_config["rope_scaling"]["rope_type"] == "longrope"
    assert saved_config["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert saved_config["architectures"] == ["MiniCPMForCausalLM"]
    loaded = MiniCPMForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.dtype == dtype
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_official_8b_config_round_trips(tmp_path):
    official = {
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                     "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
        "bos_token_id": 1, "eos_token_id": [2, 73440], "pad_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.1, "intermediate_size": 16384,
        "max_position_embeddings": 32768, "model_type": "minicpm", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0 + i / 64 for i in range(64)],
                         "short_factor": [1.0 + i / 640 for i in range(64)],
                         "original_max_position_embeddings": 32768},
        "rope_theta": 10000.0, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 73448,
        "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4, "mup_denominator": 32,
        "tie_word_embeddings": False,
        "sparse_config": {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                          "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192},
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    config = MiniCPMForCausalLM.load_config(tmp_path)
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim) == (4096, 2, 128)
    assert config.width_multiplier == 16 and config.scale_emb == 12
    assert config.dtype == torch.bfloat16
    written = config.to_dict()
    for key, value in official.items():
        if key != "torch_dtype":
            assert written[key] == value, key
    assert written["torch_dtype"] == "bfloat16"
    shapes = MiniCPMForCausalLM.expected_tensor_shapes(config)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 4096)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == pytest.approx(8.19e9, rel=0.01)


def test_reads_checkpoint_written_by_transformers_with_renamed_keys(tmp_path):
    """A base LlamaModel saved by transformers has no 'model.' prefix; a key map renames it."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = tiny_config(tie_word_embeddings=True)
    llama = LlamaModel(LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64)).eval()
    llama.save_pretrained(tmp_path / "llama", max_shard_size="20KB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").exists()
    with pytest.raises(UnexpectedKeysError, match="layers.0.mlp"):
        MiniCPMForCausalLM.from_pretrained(tmp_path / "llama", config=config, check_dtype=False)
    ours = MiniCPMForCausalLM.from_pretrained(tmp_path / "llama", config=config, key_map={"^": "model."},
                                              check_dtype=False)
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        hidden = llama(ids).last_hidden_state
        expected = hidden @ llama.embed_tokens.weight.T
        assert_close(ours(ids).logits, expected, ratio=1e-5, name="logits from a transformers checkpoint")


# -- bad inputs --------------------------------------------------------------------------------------

def _save_tiny(tmp_path, **overrides):
    model = MiniCPMForCausalLM(tiny_config(**overrides))
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("hidden_act", "gelu", "'hidden_act' = 'gelu' is not supported"),
        ("num_key_value_heads", 3, "'num_key_value_heads' = 3 is not supported"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "'rope_scaling.rope_type' = 'yarn'"),
        ("rope_scaling", {"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0] * 8,
                          "original_max_position_embeddings": 16}, "'rope_scaling.long_factor' = 1"),
        ("attention_bias", True, "'attention_bias' = True"),
    ],
)
def test_unsupported_config_values_name_file_and_key(tmp_path, key, value, message):
    path = _save_tiny(tmp_path)
    _edit_config(path, **{key: value})
    with pytest.raises(UnsupportedConfigError, match="config.json") as err:
        MiniCPMForCausalLM.from_pretrained(path)
    assert message in str(err.value)


def test_missing_config_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        MiniCPMForCausalLM.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MiniCPMForCausalLM.from_pretrained(tmp_path / "empty")


def test_shape_mismatch_with_config_names_tensor_and_file(tmp_path):
    path = _save_tiny(tmp_path)
    _edit_config(path, intermediate_size=128)
    with pytest.raises(ShapeMismatchError, match=r"mlp\.(gate|up|down)_proj\.weight") as err:
        MiniCPMForCausalLM.from_pretrained(path)
    assert "model.safetensors" in str(err.value)


def test_dtype_mismatch_with_config(tmp_path):
    path = _save_tiny(tmp_path)
    _edit_config(path, torch_dtype="bfloat16", dtype="bfloat16")
    with pytest.raises(DtypeMismatchError, match="bfloat16"):
        MiniCPMForCausalLM.from_pretrained(path)
    loaded = MiniCPMForCausalLM.from_pretrained(path, check_dtype=False, dtype="float32")
    assert loaded.dtype == torch.float32


def test_missing_and_unexpected_tensors(tmp_path):
    path = _save_tiny(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    tensors["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises((MissingKeysError, UnexpectedKeysError), match=r"model\.layers\.1\.self_attn\.(q_proj|extra)"):
        MiniCPMForCausalLM.from_pretrained(path)


def test_generate_allocates_the_cache_once_at_its_final_size(model, monkeypatch):
    """generate() sizes the K/V buffers for prompt + new tokens: no regrowth while decoding, and no doubled
    buffer (a 1M-token prompt's cache doubled on its first decoded token would need 3x its size)."""
    made = []
    original = type(model).new_cache

    def recording_new_cache(self, capacity=256):
        made.append(original(self, capacity=capacity))
        return made[-1]

    monkeypatch.setattr(type(model), "new_cache", recording_new_cache)
    ids = torch.randint(3, model.config.vocab_size, (2, 300))
    model.generate(ids, max_new_tokens=7, eos_token_id=-1)
    cache = made[0]
    assert cache.seq_len == 300 + 6  # the last new token is sampled, not fed back
    assert all(k.shape[1] == 307 for k in cache.keys)
    grown = model.new_cache(capacity=8)
    model(ids[:, :20], past_key_values=grown)
    assert grown.keys[0].shape[1] == 20  # past the capacity: just large enough, then doubling
    model(ids[:, 20:21], past_key_values=grown)
    assert grown.keys[0].shape[1] == 40
