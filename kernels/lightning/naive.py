"""Plain PyTorch references for lightning attention (constant per-head decay linear attention).

    S_t = gamma_h * S_{t-1} + k_t^T v_t          (S: D_k x D_v per head, fp32)
    o_t = scale * q_t S_t                          (the current token included)

``decay`` is the per-head log-decay g_h = log(gamma_h) < 0, shape [H]; SALA uses g_h = -2^(-8h/H).
Layout: q, k, v [B, T, H, D]; states [N, H, D, D] (N = B, or the number of packed sequences).
These are the references for tests and the CPU path of the model.
"""

from __future__ import annotations

import torch


def sala_decay(num_heads: int, device=None) -> torch.Tensor:
    """SALA's per-head log-decay -2^(-8h/H), h = 1..H (gamma from 0.43 for the fastest head at H=32)."""
    h = torch.arange(1, num_heads + 1, dtype=torch.float32, device=device)
    return -torch.exp2(-8.0 * h / num_heads)


def _split(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[torch.Tensor]:
    """[B, T, ...] -> list of [T_n, ...] sequences."""
    if cu_seqlens is None:
        return list(x.unbind(0))
    bounds = cu_seqlens.tolist()
    return [x[0, s:e] for s, e in zip(bounds[:-1], bounds[1:])]


def lightning_attention_recurrent(
    q, k, v, decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence in fp32 (or fp64 when the inputs are fp64). Differentiable."""
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    gamma = decay.to(acc).exp()[:, None, None]
    outs, finals = [], []
    for n, (qn, kn, vn) in enumerate(zip(_split(q, cu_seqlens), _split(k, cu_seqlens), _split(v, cu_seqlens))):
        H = qn.shape[1]
        state = torch.zeros(H, D, vn.shape[-1], dtype=acc, device=q.device)
        if initial_state is not None:
            state = state + initial_state[n].to(acc)
        o = []
        for t in range(qn.shape[0]):
            state = gamma * state + kn[t].to(acc)[:, :, None] * vn[t].to(acc)[:, None, :]
            o.append(scale * torch.einsum("hk,hkv->hv", qn[t].to(acc), state))
        outs.append(torch.stack(o) if o else vn.new_zeros(0, H, vn.shape[-1], dtype=acc))
        finals.append(state)
    o = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final


def lightning_attention_parallel(
    q, k, v, decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked parallel form, O(T^2) memory: o = scale * ((q k^T) * M) v + scale * gamma^(t+1) q S_0,
    M_ts = gamma^(t-s) for t >= s. Differentiable; the CPU path for short sequences."""
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = decay.to(acc)
    outs, finals = [], []
    for n, (qn, kn, vn) in enumerate(zip(_split(q, cu_seqlens), _split(k, cu_seqlens), _split(v, cu_seqlens))):
        T = qn.shape[0]
        qh, kh, vh = (x.to(acc).transpose(0, 1) for x in (qn, kn, vn))  # [H, T, D]
        t = torch.arange(T, device=q.device, dtype=acc)
        diff = t[:, None] - t[None, :]
        # exponent clamped at 0 above the diagonal so that exp never overflows before masking
        mask = torch.where(diff >= 0, torch.exp(g[:, None, None] * diff.clamp(min=0)), torch.zeros((), dtype=acc, device=q.device))
        o = scale * ((qh @ kh.transpose(1, 2)) * mask) @ vh
        tail = torch.exp(g[:, None] * (T - 1 - t))  # [H, T]: decay from token s to the end
        final = torch.einsum("hs,hsk,hsv->hkv", tail, kh, vh)
        if initial_state is not None:
            s0 = initial_state[n].to(acc)
            o = o + scale * torch.exp(g[:, None] * (t + 1))[..., None] * (qh @ s0)
            final = final + torch.exp(g * T)[:, None, None] * s0
        outs.append(o.transpose(0, 1))
        finals.append(final)
    o = torch.cat(outs)[None] if cu_seqlens is not None else torch.stack(outs)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final


def lightning_decode_reference(q, k, v, decay, state, scale=None) -> torch.Tensor:
    """One token per sequence: q, k, v [N, H, D]; state [N, H, D, D] fp32, updated in place; returns o [N, H, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gamma = decay.float().exp()[None, :, None, None]
    state.mul_(gamma).add_(k.float()[..., :, None] * v.float()[..., None, :])
    return (scale * torch.einsum("nhk,nhkv->nhv", q.float(), state)).to(q.dtype)
