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
        # = (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype): torch computes the variance and the
        # scaling in fp32 for low-precision inputs, in one fused kernel on CUDA (five passes in plain ops)
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

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
        # Frequencies are plain fp32 attributes, not buffers: `model.to(bfloat16)` would round buffers and
        # shift every angle. They are built on the CPU (also inside a meta-device context) and copied to
        # each device once.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim
        inv_freq = (1.0 / self.theta**exponents).float()
        self.short_inv_freq = self.long_inv_freq = inv_freq
        if rope_scaling is not None:
            self.short_inv_freq = inv_freq / torch.tensor(rope_scaling["short_factor"], dtype=torch.float32, device="cpu")
            self.long_inv_freq = inv_freq / torch.tensor(rope_scaling["long_factor"], dtype=torch.float32, device="cpu")
        self._on_device: dict[tuple[torch.device, bool], torch.Tensor] = {}

    def _inv_freq(self, device: torch.device, long: bool) -> torch.Tensor:
        key = (device, long)
        if key not in self._on_device:
            self._on_device[key] = (self.long_inv_freq if long else self.short_inv_freq).to(device)
        return self._on_device[key]

    def forward(self, position_ids: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> (cos, sin), each [B, T, head_dim] in fp32.

        ``seq_len`` is the length that chooses the LongRoPE factors (cache included); by default
        ``max(position_ids) + 1``.
        """
        long = False
        if self.rope_scaling is not None:
            if seq_len is None:
                seq_len = int(position_ids.max()) + 1
            long = seq_len > self.original_max_position_embeddings
        freqs = position_ids[..., None].float() * self._inv_freq(position_ids.device, long)
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
