"""InfLLM-V2 sparse attention on one GPU: ours (selection, attention, total) vs torch SDPA causal.

    python benchmarks/sparse.py            # the official table's shapes: 32K x 8, 64K x 4, 128K x 2, then 256K, 1M
    python benchmarks/sparse.py --quick    # 32K x 2 only

32 query / 2 KV heads, D = 128, bf16, block 64, windows 32/16, init 1 + local 32 + top-64.
ms are medians of do_bench; x = SDPA / ours; peak memory of ours' forward+backward.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.testing

from sala_train.kernels.sparse import select_blocks, sparse_attention

SELECT = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, local_blocks=32, topk=64)


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def run(T, B, Hq=32, Hk=2, D=128, backward=True, sdpa=True):
    torch.manual_seed(0)
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    r = {}
    with torch.no_grad():
        r["select_ms"] = bench(lambda: select_blocks(q, k, **SELECT))
        idx = select_blocks(q, k, **SELECT)
        r["attn_fwd_ms"] = bench(lambda: sparse_attention(q, k, v, idx, block_size=64))
    r["total_fwd_ms"] = r["select_ms"] + r["attn_fwd_ms"]
    if backward:
        do = torch.randn_like(q)
        torch.cuda.reset_peak_memory_stats()
        step = lambda: torch.autograd.grad(sparse_attention(q, k, v, select_blocks(q, k, **SELECT), block_size=64),  # noqa: E731
                                           (q, k, v), do)
        r["total_fwdbwd_ms"] = bench(step)
        r["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt = q.detach().transpose(1, 2).contiguous().requires_grad_()
        kt, vt = (x.detach().transpose(1, 2).repeat_interleave(Hq // Hk, 1).contiguous().requires_grad_() for x in (k, v))
        dot = torch.randn_like(qt)
        for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.CUDNN_ATTENTION, "cudnn")):
            def f():
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            try:
                with torch.no_grad():
                    r[f"{name}_fwd_ms"] = bench(f, 100)
                if backward:
                    r[f"{name}_fwdbwd_ms"] = bench(lambda: torch.autograd.grad(f(), (qt, kt, vt), dot), 100)
            except Exception as err:  # noqa: BLE001
                r[f"{name}_error"] = str(err)[:100]
    return r


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    shapes = [(32768, 2)] if args.quick else [(32768, 8), (65536, 4), (131072, 2)]
    rows = []
    for T, B in shapes:
        r = run(T, B)
        rows.append((T, B, r))
        print(T, B, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    if not args.quick:
        for T in (262144, 1 << 20):
            try:
                r = run(T, 1, backward=T <= 262144, sdpa=False)
            except torch.OutOfMemoryError as err:
                r = {"error": f"out of memory: {str(err)[:80]}"}
            rows.append((T, 1, r))
            print(T, 1, r, flush=True)
    print("\n| T x B | select | attn fwd | total fwd | total f+b | flash f+b | x flash | cudnn f+b | x cudnn | peak GiB |")
    for T, B, r in rows:
        fb = r.get("total_fwdbwd_ms")
        cells = [r.get("select_ms"), r.get("attn_fwd_ms"), r.get("total_fwd_ms"), fb, r.get("flash_fwdbwd_ms"),
                 (r["flash_fwdbwd_ms"] / fb) if fb and "flash_fwdbwd_ms" in r else None, r.get("cudnn_fwdbwd_ms"),
                 (r["cudnn_fwdbwd_ms"] / fb) if fb and "cudnn_fwdbwd_ms" in r else None, r.get("peak_GiB")]
        print(f"| {T} x {B} | " + " | ".join(f"{c:.2f}" if isinstance(c, float) else "-" for c in cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
