"""MiniCPM-4, the teacher: a pre-norm decoder with GQA attention, RoPE/LongRoPE, SwiGLU and muP scalings.

    h_0     = embed_tokens(ids) * scale_emb
    h       = h + attn(norm(h)) * scale_depth / sqrt(L)        (same for the MLP branch)
    logits  = lm_head(norm(h_L) / (hidden_size / dim_model_base)), in fp32

Weight names follow the official HF checkpoints (SPEC section 1), so ``from_pretrained`` reads them as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from .attention import (
    cached_causal_mask,
    causal_attention,
    cu_seqlens_from_position_ids,
    masked_attention,
    position_ids_from_cu_seqlens,
    varlen_causal_attention,
)
from .cache import KVCache
from .configuration_minicpm import MiniCPMConfig
from .generation import GenerationMixin
from .layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from .pretrained import CheckpointMixin


@dataclass
class CausalLMOutput:
    # A plain dataclass, not transformers' ModelOutput: its field names change between versions.
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class AttentionInputs:
    """How every attention layer of one forward attends; computed once by the model.

    - ``cu_seqlens``: packed documents over the flattened B*T tokens (no cache);
    - ``mask``: explicit boolean mask [B, 1, T, past+T] (cache with chunks, or left padding);
    - otherwise ``causal`` (prefill, T == S) or full (one decoded token sees the whole cache).
    """

    cu_seqlens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    causal: bool = True

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        if self.cu_seqlens is not None:
            B, T = q.shape[:2]
            flat = lambda x: x.reshape(1, B * T, *x.shape[2:])  # noqa: E731
            out = varlen_causal_attention(flat(q), flat(k), flat(v), self.cu_seqlens, scale=scale)
            return out.reshape(q.shape)
        if self.mask is not None:
            return masked_attention(q, k, v, self.mask, scale=scale)
        if self.causal:
            return causal_attention(q, k, v, scale=scale)
        return masked_attention(q, k, v, None, scale=scale)


class MiniCPMAttention(nn.Module):
    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, attention: AttentionInputs, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attention.attend(q, k, v, self.scale)
        return self.o_proj(out.reshape(B, T, -1))


class MiniCPMDecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MiniCPMAttention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.residual_scale = config.residual_scale

    def forward(self, h, rope, attention: AttentionInputs, cache: KVCache | None = None) -> torch.Tensor:
        """``rope`` = (cos, sin) of this forward's positions."""
        cos, sin = rope
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attention, cache) * self.residual_scale
        h = h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale
        return h


def init_std(config: MiniCPMConfig, param_name: str) -> float | None:
    """Initial std of a parameter by name (None = ones, for norms). muP: hidden matrices get
    ``initializer_range / sqrt(width_multiplier)``, the embedding ``initializer_range``."""
    if param_name.endswith("norm.weight"):
        return None
    if "embed_tokens" in param_name:
        return config.initializer_range
    return config.initializer_range / math.sqrt(config.width_multiplier)


class MiniCPMPreTrainedModel(CheckpointMixin, PreTrainedModel):
    config_class = MiniCPMConfig
    config: MiniCPMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniCPMDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, init_std(self.config, "embed_tokens.weight"))
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, init_std(self.config, "proj.weight"))
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    @classmethod
    def expected_tensor_shapes(cls, config: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor of a checkpoint of this config (the official layout)."""
        hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                             config.num_key_value_heads, config.head_dim)
        shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
            shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
            shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
            shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
            shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, hidden)
            shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, hidden)
            shapes[p + "mlp.down_proj.weight"] = (hidden, config.intermediate_size)
            shapes[p + "input_layernorm.weight"] = (hidden,)
            shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes["model.norm.weight"] = (hidden,)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (config.vocab_size, hidden)
        return shapes


class MiniCPMModel(MiniCPMPreTrainedModel):
    def __init__(self, config: MiniCPMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )
        self.gradient_checkpointing = False
        self.checkpoint_layers = None  # with gradient_checkpointing: recompute only the first N layers (None: all)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, AttentionInputs, tuple[torch.Tensor, ...] | None]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.scale_emb
        B, T = inputs_embeds.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids, attention = self._plan_attention(B, T, past, attention_mask, position_ids, cu_seqlens,
                                                       inputs_embeds.device)
        self._check_batch(attention_mask, attention, past_key_values)
        rope = self._rotary(position_ids)

        h = inputs_embeds
        all_hidden = [h] if output_hidden_states else None
        recomputed = len(self.layers) if self.checkpoint_layers is None else self.checkpoint_layers
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and past_key_values is None and i < recomputed:
                h = checkpoint(layer, h, rope, attention, None, use_reentrant=False)
            else:
                h = layer(h, rope, attention, past_key_values)
            if all_hidden is not None:
                all_hidden.append(h)
        if past_key_values is not None:
            past_key_values.advance(T)
        h = self.norm(h)
        return h, attention, tuple(all_hidden) if all_hidden is not None else None

    def _rotary(self, position_ids):
        """What every layer gets for its positions: (cos, sin) here (the SALA model: one pair per head size)."""
        return self.rotary_emb(position_ids)

    def _check_batch(self, attention_mask, attention: AttentionInputs, cache) -> None:
        """A hook for models that refuse some batches (the SALA model: padding, packing into a cache)."""

    @staticmethod
    def _plan_attention(B, T, past, attention_mask, position_ids, cu_seqlens, device):
        """Positions and attention mode of one forward (see AttentionInputs)."""
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens needs a batch of 1 packed sequence, got batch size {B}")
            if past:
                raise ValueError("packed sequences (cu_seqlens) cannot be combined with a KV cache")
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
                raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {T}, "
                                 f"got {cu_seqlens.tolist()}")
            if position_ids is None:
                position_ids = position_ids_from_cu_seqlens(cu_seqlens.to(device), T)
            return position_ids, AttentionInputs(cu_seqlens=cu_seqlens.to(device))

        padding = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask must be [batch, past + new tokens] = [{B}, {past + T}], "
                                 f"got {list(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                padding = attention_mask
                if position_ids is None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
        elif padding is None and past == 0:
            packed = cu_seqlens_from_position_ids(position_ids)
            if packed is not None:
                return position_ids, AttentionInputs(cu_seqlens=packed)

        if padding is None and past == 0:
            return position_ids, AttentionInputs(causal=True)
        if padding is None and T == 1:
            return position_ids, AttentionInputs(causal=False)
        return position_ids, AttentionInputs(mask=cached_causal_mask(T, past, padding, device))


class MiniCPMForCausalLM(GenerationMixin, MiniCPMPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniCPMConfig):
        super().__init__(config)
        self.model = MiniCPMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, layers: int | None = None) -> None:
        """Recompute the layers' activations in the backward pass instead of keeping them: all layers, or
        only the first ``layers`` (the others keep theirs: memory for less recomputation)."""
        if layers is not None and layers < 0:
            raise ValueError(f"gradient checkpointing of {layers} layers: give a number >= 0, or None for all")
        self.model.gradient_checkpointing = True
        self.model.checkpoint_layers = layers

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    def new_cache(self, capacity: int = 256) -> KVCache:
        """An empty cache whose buffers are first allocated for ``capacity`` tokens (prompt + new tokens, when
        known: no regrowth, no doubled buffer at long context); past it they grow by doubling."""
        return KVCache(self.config.num_hidden_layers, initial_capacity=capacity)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        return_dict: bool = True,
        **unused,
    ) -> CausalLMOutput:
        """input_ids [B, T] -> logits [B, T, vocab] in fp32.

        Packed sequences: pass ``cu_seqlens`` (B = 1) or ``position_ids`` that restart at 0 at each
        document; no attention and no loss crosses a document boundary. ``labels`` are the input ids
        (shifted inside, -100 ignored). ``use_cache`` creates a KVCache when none is given.
        """
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        h, attention, hidden_states = self.model(
            input_ids, attention_mask, position_ids, cu_seqlens, past_key_values, inputs_embeds,
            output_hidden_states,
        )
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h / self.config.width_multiplier).float()
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, attention.cu_seqlens)
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=past_key_values, hidden_states=hidden_states)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy; the last token of each packed document predicts nothing."""
    B, T, V = logits.shape
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        flat = targets.reshape(-1)
        flat[cu_seqlens[1:] - 1] = -100
        targets = flat.view(B, T)
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
