"""Fused per-head RMSNorm + RoPE (sala_train.kernels.fused.norm_rope) against the torch ops the lightning mixer
runs today (RMSNorm module, apply_rotary, cast), on one GPU: correctness first, then forward and
forward+backward times (median, triton.testing.do_bench) and achieved HBM bandwidth.

    python benchmarks/fused.py [--tokens 32K,128K] [--heads 32] [--head-dim 128]
"""

from __future__ import annotations

import argparse

import torch
import triton.testing
from sala_train.kernels.fused import norm_rope, norm_rope_reference

from sala_train.models.layers import RMSNorm, RotaryEmbedding, apply_rotary


def parse_length(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="32K,128K")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    H, D = args.heads, args.head_dim
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; bf16 x, "
          f"fp32 weight and cos/sin, H={H}, D={D}")
    norm = RMSNorm(D).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)

    def unfused(x, weight, cos, sin):  # the mixer's ops (weight is norm.weight)
        return apply_rotary(norm(x), cos, sin).to(x.dtype)

    def fused(x, weight, cos, sin):
        return norm_rope(x, weight, cos, sin, out_dtype=x.dtype)

    print("| tokens | check | unfused fwd ms | fused fwd ms | x | unfused f+b ms | fused f+b ms | x | fused fwd GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for T in (parse_length(t) for t in args.tokens.split(",")):
        x = torch.randn(1, T, H, D, device="cuda").mul(3).bfloat16().requires_grad_()
        cos, sin = RotaryEmbedding(D)(torch.arange(T, device="cuda")[None])
        dy = torch.randn_like(x)
        ref = norm_rope_reference(x.double(), norm.weight.double(), cos.double(), sin.double())
        errors = {}
        for name, fn in (("unfused", unfused), ("fused", fused)):
            out = fn(x, norm.weight, cos, sin)
            errors[name] = ((out.double() - ref).norm() / ref.norm()).item()
        ok = errors["fused"] <= max(1.5 * errors["unfused"], 4e-3)
        times = {}
        for name, fn in (("unfused", unfused), ("fused", fused)):
            args_ = (x, norm.weight, cos, sin)
            times[name, "fwd"] = triton.testing.do_bench(lambda fn=fn, a=args_: fn(*a), rep=200,
                                                         return_mode="median")
            times[name, "fb"] = triton.testing.do_bench(
                lambda fn=fn, a=args_, dy=dy: torch.autograd.backward(fn(*a), dy), grad_to_none=[x, norm.weight],
                rep=200, return_mode="median")
        moved = x.numel() * 2 * 2 + cos.numel() * 4 * 2  # x in, y out (bf16), cos and sin (fp32)
        print(f"| {T // 1024}K | {'ok' if ok else 'FAIL'} (rel err fused {errors['fused']:.1e}, unfused "
              f"{errors['unfused']:.1e}) | {times['unfused', 'fwd']:.3f} | {times['fused', 'fwd']:.3f} | "
              f"{times['unfused', 'fwd'] / times['fused', 'fwd']:.2f} | {times['unfused', 'fb']:.3f} | "
              f"{times['fused', 'fb']:.3f} | {times['unfused', 'fb'] / times['fused', 'fb']:.2f} | "
              f"{moved / times['fused', 'fwd'] / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
