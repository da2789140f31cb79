"""Building blocks shared by the teacher (MiniCPM-4) and the SALA student: RMSNorm, SwiGLU, RoPE/LongRoPE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; the variance is computed in fp32 whatever the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention) with optional LongRoPE.

    LongRoPE (MiniCPM-4, Phi-3): the inverse frequencies are divided by per-dimension factors, the long
    factors when the sequence (cache included) is longer than ``original_max_position_embeddings``, the
    short factors otherwise; cos and sin are scaled by ``sqrt(1 + ln(max_pos / orig_max) / ln(orig_max))``.
    cos/sin are computed in fp32 from the positions on every call (cheap next to attention).
    """

    def __init__(
        self,
        head_dim: int,
        theta: float = 10000.0,
        rope_scaling: dict | None = None,
        max_position_embeddings: int | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)
        self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.original_max_position_embeddings = None
        self.attention_scaling = 1.0
        if rope_scaling is not None:
            self.original_max_position_embeddings = int(rope_scaling["original_max_position_embeddings"])
            ratio = (max_position_embeddings or self.original_max_position_embeddings) / self.original_max_position_embeddings
            if ratio > 1.0:
                self.attention_scaling = math.sqrt(1 + math.log(ratio) / math.log(self.original_max_position_embeddings))
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.register_buffer("short_inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.register_buffer("long_inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the frequency buffers; called after loading a model built on the meta device."""
        device = self.inv_freq.device if self.inv_freq.device.type != "meta" else None
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
        inv_freq = (1.0 / self.theta**exponents).float()
        self.inv_freq = inv_freq
        if self.rope_scaling is None:
            self.short_inv_freq = inv_freq
            self.long_inv_freq = inv_freq
        else:
            short = torch.tensor(self.rope_scaling["short_factor"], dtype=torch.float32, device=device)
            long = torch.tensor(self.rope_scaling["long_factor"], dtype=torch.float32, device=device)
            self.short_inv_freq = inv_freq / short
            self.long_inv_freq = inv_freq / long

    def forward(self, position_ids: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> (cos, sin), each [B, T, head_dim] in fp32.

        ``seq_len`` is the length that chooses the LongRoPE factors (cache included); by default
        ``max(position_ids) + 1``.
        """
        inv_freq = self.short_inv_freq
        if self.rope_scaling is not None:
            if seq_len is None:
                seq_len = int(position_ids.max()) + 1
            if seq_len > self.original_max_position_embeddings:
                inv_freq = self.long_inv_freq
        freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [B, T, D] in fp32. The rotation runs in fp32 and returns x's dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)
