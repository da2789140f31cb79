"""MiniCPM-SALA behaviour on tiny fp32 CPU configs: cache and decode, chunked prefill, packing, HyPE,
generation, backends, save/load.

The tiny sparse_config (blocks of 16, window 32, top-2: 5 blocks per query; dense_len 48) puts a 100-token
sequence into the InfLLM-V2 path: rows from token 80 on select 5 of their 6 or 7 blocks (their logits move by
1e-3 relative RMS against dense attention). Rows below dense_len select all of their blocks (init block + 2
local blocks cover the first 48 tokens), so a decode step below dense_len (dense) and the same row of a longer
prefill (sparse) must agree, which is what SALA's dense/sparse switch assumes.
"""

import json
from pathlib import Path

import pytest
import torch

import sala_train
from sala_train.models import MiniCPMSALAForCausalLM, SALACache, SALAConfig, SALAForCausalLM
from sala_train.models.sala import LIGHTNING_BACKENDS, SPARSE_BACKENDS, LightningMixer, SparseMixer
from sala_train.testing import assert_close, module_available, requires_gpu, requires_module

# fp32 everywhere; a cached step and the full forward compute the same sums in another order (the recurrent
# vs the parallel lightning form, SDPA over a cache vs a causal prefill, a padded vs a plain sparse prefill):
# 1e-5 relative RMS allows that (observed: 2e-7) and is far below a real mismatch (a wrong state, mask or
# position; attending densely instead of sparsely gives 1e-3).
CACHE_RATIO = 1e-5
HYBRID = ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"]
TOKENIZER = Path(sala_train.__file__).parent / "assets" / "tokenizer"


def tiny_sala_config(**overrides) -> SALAConfig:
    values = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, lightning_nh=4, lightning_nkv=4, lightning_head_dim=16,
        mixer_types=HYBRID,
        sparse_config=dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32,
                           topk=2, use_nope=False, dense_len=48),
        max_position_embeddings=256, initializer_range=0.05, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        scale_emb=12.0, scale_depth=1.4, dim_model_base=16,
        # The plain PyTorch ops: on a CPU the kernels run in Triton's interpreter (tests/conftest.py), which
        # takes seconds per forward; test_backends_give_the_same_logits compares the two.
        lightning_backend="torch", sparse_backend="torch",
    )
    values.update(overrides)
    if "num_hidden_layers" in overrides and "mixer_types" not in overrides:
        values["mixer_types"] = (HYBRID * overrides["num_hidden_layers"])[: overrides["num_hidden_layers"]]
    return SALAConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> SALAForCausalLM:
    torch.manual_seed(seed)
    return SALAForCausalLM(tiny_sala_config(**overrides)).eval()


@pytest.fixture
def model():
    return tiny_model()


def decode_token_by_token(model, ids, prefill: int) -> torch.Tensor:
    cache = model.new_cache()
    steps = [model(ids[:, :prefill], past_key_values=cache).logits]
    steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(prefill, ids.shape[1])]
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(steps, dim=1)


# -- cache ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prefill,total", [(20, 40), (20, 100), (60, 100), (1, 12)],
    ids=["below-dense_len", "across-dense_len", "prefill-above-dense_len", "from-one-token"],
)
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(model, prefill, total):
    ids = torch.randint(0, 97, (2, total))
    full = model(ids).logits
    cached = decode_token_by_token(model, ids, prefill)
    assert_close(cached, full, ratio=CACHE_RATIO, name="prefill + decode")


@pytest.mark.parametrize("chunk", [7, 30])
@torch.no_grad()
def test_chunked_prefill_equals_full_forward(model, chunk):
    # chunk 30: the second chunk ends past dense_len, so its queries see the cache through the sparse path
    ids = torch.randint(0, 97, (1, 100))
    full = model(ids).logits
    cache = model.new_cache()
    chunks = [model(ids[:, s : s + chunk], past_key_values=cache).logits for s in range(0, 100, chunk)]
    assert_close(torch.cat(chunks, dim=1), full, ratio=CACHE_RATIO, name=f"prefill in chunks of {chunk}")


@torch.no_grad()
def test_cache_grows_the_compressed_keys_window_by_window(model):
    """After a prefill and token-by-token decoding, each sparse layer's compressed-key caches equal pooling
    its whole K again (so decode never needs to)."""
    from sala_train.kernels.sparse import compress_keys

    ids = torch.randint(0, 97, (2, 90))
    cache = model.new_cache()
    model(ids[:, :37], past_key_values=cache)
    for t in range(37, 90):
        model(ids[:, t : t + 1], past_key_values=cache)
    sparse = model.config.sparse_config
    for i, kind in enumerate(HYBRID):
        if kind != "minicpm4":
            continue
        keys = cache.keys[i][:, : cache.get_seq_length()]
        fine, coarse = cache.compressed_keys[i]
        assert torch.equal(fine, compress_keys(keys, sparse["kernel_size"], sparse["kernel_stride"])[0])
        assert torch.equal(coarse, compress_keys(keys, 4 * sparse["kernel_size"], 4 * sparse["kernel_stride"])[0])
        assert fine.shape[1] == (90 - sparse["kernel_size"]) // sparse["kernel_stride"] + 1


@torch.no_grad()
def test_cache_holds_kv_for_sparse_layers_and_fp32_states_for_lightning_layers(model):
    ids = torch.randint(0, 97, (3, 30))
    cache = model.new_cache()
    model(ids, past_key_values=cache)
    assert isinstance(cache, SALACache)
    for i, kind in enumerate(HYBRID):
        if kind == "minicpm4":
            assert cache.keys[i].shape[0] == 3 and cache.keys[i].shape[2:] == (2, 16)
            assert cache.states[i] is None
        else:
            assert cache.keys[i] is None
            assert cache.states[i].shape == (3, 4, 16, 16) and cache.states[i].dtype == torch.float32
    before = [s.clone() for s in cache.states if s is not None]
    model(ids[:, :1], past_key_values=cache)  # the decode step updates the states in place
    after = [s for s in cache.states if s is not None]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(ValueError, match="layer 1 is a 'lightning-attn' layer"):
        cache.update(1, torch.zeros(3, 1, 2, 16), torch.zeros(3, 1, 2, 16))


@torch.no_grad()
def test_cache_rejects_padding_and_packing(model):
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="does not take padded batches"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="cannot fill a cache"):
        packed_positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
        model(ids[:1], position_ids=packed_positions, past_key_values=model.new_cache())
    model(ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is no padding


# -- packed sequences ----------------------------------------------------------------------------------------

@torch.no_grad()
def test_packed_documents_equal_separate_runs(model):
    lengths = [20, 100, 33]  # below, above and below dense_len
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    cu_seqlens = torch.tensor([0, 20, 120, 153])
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    separate = torch.cat([model(d).logits for d in docs], dim=1)
    by_cu = model(packed, cu_seqlens=cu_seqlens).logits
    by_positions = model(packed, position_ids=position_ids).logits
    assert_close(by_cu, separate, ratio=CACHE_RATIO, name="packed via cu_seqlens")
    assert_close(by_positions, separate, ratio=CACHE_RATIO, name="packed via position_ids")
    # without boundaries the later documents see the earlier ones (attention and lightning state): must differ
    assert (model(packed).logits[:, 20:] - separate[:, 20:]).abs().max() > 1e-3


@torch.no_grad()
def test_packed_rows_of_a_batch(model):
    rows = torch.randint(0, 97, (2, 60))
    position_ids = torch.cat([torch.arange(10), torch.arange(50)])[None].repeat(2, 1)
    packed = model(rows, position_ids=position_ids).logits
    for r in range(2):
        row = rows[r : r + 1]
        expected = torch.cat([model(row[:, :10]).logits, model(row[:, 10:]).logits], dim=1)
        assert_close(packed[r : r + 1], expected, ratio=CACHE_RATIO, name=f"row {r}")


def test_backward_reaches_every_parameter_in_both_mixers():
    model = tiny_model().train()
    ids = torch.randint(0, 97, (1, 100))  # the first document is long enough to drop blocks
    cu_seqlens = torch.tensor([0, 90, 100])
    loss = model(ids, labels=ids, cu_seqlens=cu_seqlens).loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    import sala_train.models.minicpm as minicpm_module

    recomputed = []
    original = minicpm_module.checkpoint

    def counting(layer, *args, **kwargs):
        recomputed.append(layer.layer_idx if hasattr(layer, "layer_idx") else layer)
        return original(layer, *args, **kwargs)

    minicpm_module.checkpoint = counting
    try:
        for layers in (None, 2, 0):  # every layer, the first two, none
            model.zero_grad()
            recomputed.clear()
            model.gradient_checkpointing_enable(layers=layers)
            model(ids, labels=ids, cu_seqlens=cu_seqlens).loss.backward()
            assert len(recomputed) == (4 if layers is None else layers)
            for name, p in model.named_parameters():
                assert_close(p.grad, grads[name], ratio=1e-5, name=f"{name} with {layers} checkpointed layers")
    finally:
        minicpm_module.checkpoint = original
    with pytest.raises(ValueError, match="-1 layers"):
        model.gradient_checkpointing_enable(layers=-1)


# -- HyPE ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_hype_rope_in_lightning_layers_only():
    # RoPE only sees relative positions: shifting all of them changes nothing, stretching them does. Logits
    # are about 0.05 here and fp32 rounding moves them by about 1e-8, so a change above 1e-6 is real.
    ids = torch.randint(0, 97, (1, 40))
    shifted, stretched = torch.arange(7, 47)[None], 2 * torch.arange(40)[None]
    hybrid = tiny_model()
    assert [layer.self_attn.use_rope for layer in hybrid.model.layers] == [False, True, True, False]
    assert set(hybrid.model.rotary_embs) == {16}

    lightning_only = tiny_model(mixer_types=["lightning-attn"] * 4)
    plain = lightning_only(ids).logits
    assert_close(lightning_only(ids, position_ids=shifted).logits, plain, ratio=CACHE_RATIO, name="shifted")
    assert (lightning_only(ids, position_ids=stretched).logits - plain).abs().max() > 1e-6

    sparse_only = tiny_model(mixer_types=["minicpm4"] * 4)  # NoPE, below dense_len: positions are not used
    assert sparse_only.model.rotary_embs == {}
    assert torch.equal(sparse_only(ids).logits, sparse_only(ids, position_ids=stretched).logits)

    with_rope = tiny_model(mixer_types=["minicpm4"] * 4, attn_use_rope=True)  # the key turns RoPE on
    assert (with_rope(ids).logits - with_rope(ids, position_ids=stretched).logits).abs().max() > 1e-6


def test_lightning_decay_is_salas_in_every_layer_and_stays_fp32():
    model = tiny_model(mixer_types=["lightning-attn"] * 4).to(torch.bfloat16)
    h = torch.arange(1, 5, dtype=torch.float32)
    for layer in model.model.layers:
        assert layer.self_attn.decay.dtype == torch.float32
        torch.testing.assert_close(layer.self_attn.decay, -(2.0 ** (-8 * h / 4)), rtol=0, atol=0)
    with torch.device("meta"):  # 8B-shaped weights, not allocated; the decay is built on the CPU regardless
        gamma = LightningMixer(SALAConfig(), 1).decay.exp()  # H = 32: SPEC 2.2
    assert gamma[0].item() == pytest.approx(0.4313, abs=1e-4)
    assert gamma[-1].item() == pytest.approx(0.9961, abs=1e-4)


# -- generation ----------------------------------------------------------------------------------------------

def test_greedy_generate_equals_argmax_loop_without_cache(model):
    prompt = torch.randint(0, 97, (1, 30))
    out = model.generate(prompt, max_new_tokens=30, eos_token_id=[])  # decodes past dense_len
    ids = prompt
    with torch.no_grad():
        for _ in range(30):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_batched_and_chunked_generation(model):
    prompts = torch.randint(0, 97, (2, 50))
    batched = model.generate(prompts, max_new_tokens=6, eos_token_id=[])
    for r in range(2):
        alone = model.generate(prompts[r : r + 1], max_new_tokens=6, eos_token_id=[])
        assert torch.equal(batched[r], alone[0])
    chunked = model.generate(prompts, max_new_tokens=6, eos_token_id=[], prefill_chunk_size=16)
    assert torch.equal(chunked, batched)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(prompts, max_new_tokens=6, do_sample=True, top_p=0.9, generator=g1, eos_token_id=[])
    s2 = model.generate(prompts, max_new_tokens=6, do_sample=True, top_p=0.9, generator=g2, eos_token_id=[])
    assert torch.equal(s1, s2)


# -- backends ------------------------------------------------------------------------------------------------

def test_backend_registries_and_errors(model):
    assert set(LIGHTNING_BACKENDS) == {"torch", "triton", "fla"}
    assert set(SPARSE_BACKENDS) == {"torch", "triton"}
    with pytest.raises(ValueError, match="lightning_backend = 'cuda' is not available here"):
        model.set_backends(lightning="cuda")
    model.set_backends(lightning="triton", sparse="auto")
    auto = "triton" if torch.cuda.is_available() and module_available("triton") else "torch"
    mixers = [layer.self_attn for layer in model.model.layers]
    assert all(m.ops is LIGHTNING_BACKENDS["triton"] for m in mixers if isinstance(m, LightningMixer))
    assert all(m.ops is SPARSE_BACKENDS[auto] for m in mixers if isinstance(m, SparseMixer))
    assert (model.config.lightning_backend, model.config.sparse_backend) == ("triton", "auto")


@pytest.mark.parametrize("which", ["lightning", "sparse"])
@torch.no_grad()
def test_backends_give_the_same_logits(which):
    # "triton": the kernels' public ops, here in Triton's interpreter on CPU tensors (the sparse decode is
    # plain torch). Full forward (past token 80 the sparse layers drop blocks), then prefill + decode.
    torch_model = tiny_model()
    kernel_model = tiny_model(**{f"{which}_backend": "triton"})
    ids = torch.randint(0, 97, (1, 100))
    expected = torch_model(ids).logits
    assert_close(kernel_model(ids).logits, expected, ratio=CACHE_RATIO, name=f"{which}: triton vs torch")
    assert_close(decode_token_by_token(kernel_model, ids, prefill=20), expected, ratio=CACHE_RATIO,
                 name=f"{which} decode: triton vs torch")


@requires_module("fla")
@torch.no_grad()
def test_fla_backend_gives_the_same_logits():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(0, 97, (1, 64), device=device)
    expected = tiny_model().to(device)(ids).logits
    actual = tiny_model(lightning_backend="fla").to(device)(ids).logits
    assert_close(actual, expected, ratio=1e-4, name="fla vs torch")


# -- save / load ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    model = tiny_model(tie_word_embeddings=dtype == torch.bfloat16).to(dtype)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size=40_000, tokenizer=TOKENIZER)
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors.index.json" in files and "model-00002-of-" in " ".join(files)
    assert {"configuration_minicpm_sala.py", "modeling_minicpm_sala.py", "generation_config.json",
            "tokenizer.json"} <= files
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "minicpm_sala" and config["architectures"] == ["MiniCPMSALAForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig",
                                  "AutoModelForCausalLM": "modeling_minicpm_sala.MiniCPMSALAForCausalLM"}
    assert config["mixer_types"] == HYBRID and config["sparse_config"]["dense_len"] == 48

    loaded = MiniCPMSALAForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.dtype == dtype and loaded.config.mixer_types == HYBRID
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    ids = torch.randint(0, 97, (1, 60))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_auto_classes_resolve_minicpm_sala(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path / "ckpt")
    assert type(AutoConfig.from_pretrained(tmp_path / "ckpt")) is SALAConfig
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")) is SALAForCausalLM


# -- GPU: bf16, the Triton kernels, real block sizes -----------------------------------------------------------

@requires_gpu
@torch.no_grad()
def test_gpu_bf16_prefill_and_decode_equal_full_forward():
    """bf16 on the GPU with the Triton backends and the released block / window sizes (dense_len lowered
    to 1024 so that a 2600-token sequence is sparse): the full forward's logits equal a chunked prefill
    (chunks of 1000: the later chunks take infllmv2_prefill past dense_len) followed by token-by-token
    decode of the last 40 tokens. bf16 rounds each path differently: 3e-2 relative RMS (a wrong block set,
    state or position gives O(1))."""
    torch.manual_seed(0)
    config = tiny_sala_config(
        vocab_size=1000, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
        head_dim=128, lightning_nh=4, lightning_nkv=4, lightning_head_dim=128, max_position_embeddings=4096,
        sparse_config=dict(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, window_size=512,
                           topk=8, use_nope=False, dense_len=1024),
        lightning_backend="triton", sparse_backend="triton", dim_model_base=512, initializer_range=0.02)
    model = SALAForCausalLM(config).cuda().to(torch.bfloat16).eval()
    T, tail = 2600, 40
    ids = torch.randint(0, 1000, (1, T), device="cuda")
    full = model(ids).logits.float()
    cache = model.new_cache()
    steps = []
    for start in range(0, T - tail, 1000):
        end = min(start + 1000, T - tail)
        steps.append(model(ids[:, start:end], past_key_values=cache).logits.float())
    for t in range(T - tail, T):
        steps.append(model(ids[:, t:t + 1], past_key_values=cache).logits.float())
    assert_close(torch.cat(steps, dim=1), full, ratio=3e-2, name="bf16 prefill + decode vs full forward")
