"""Training throughput on one GPU: 8B-shaped SALA vs the 8B-shaped dense MiniCPM-4, same width, same depth.

    python benchmarks/training.py --layers 8 --lengths 4K,32K --out train.json

The full 32-layer 8B model does not train on one 80 GB card (16 bytes of parameter, gradient and AdamW state
per parameter: 130 GB), so both models keep the 8B width (hidden 4096, 32 heads, MLP 16384, vocab 73448) and
``--layers`` layers; the SALA model keeps the released quarter of sparse layers (every fourth layer,
starting with layer 0). Training step: bf16 autocast over fp32 parameters, fused AdamW, the chunked
cross-entropy head, activation checkpointing from ``--checkpoint-from`` tokens on. Tokens per step are the same
for every length (batch = tokens / length). Reports tokens/s (median step after warm-up), model TFLOP/s and
MFU (the trainer's FLOP count: 6 x non-embedding parameters + the mixers' sequence terms, dense-causal bound
for the sparse layers), peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from inference import build, parse_length  # same directory: the 8B-shaped models

from sala_train.kernels import fused
from sala_train.train.losses import chunked_causal_lm_loss
from sala_train.train.trainer import peak_flops, training_flops_per_token


def quarter_sparse(layers: int) -> list[str]:
    return ["minicpm4" if i % 4 == 0 else "lightning-attn" for i in range(layers)]


def make_model(kind: str, layers: int, device: str, small: bool):
    """fp32 parameters (the AdamW master copy); autocast runs the matmuls and kernels in bf16."""
    return build(kind, layers, device, small, dtype=torch.float32, mixer_types=quarter_sparse(layers)).train()


def step_time(model, T: int, batch: int, steps: int, checkpointing: bool,
              profile_rows: int = 0) -> tuple[float, float]:
    device = next(model.parameters()).device
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(3, model.config.vocab_size, (batch, T), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = chunked_causal_lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if profile_rows:  # one more step under the profiler: where the time goes, op by op
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=profile_rows, max_name_column_width=60), flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times[2:] if len(times) > 3 else times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sala,sala-unfused,dense",
                        help="sala-unfused: SALA with its q/k norm + RoPE in torch ops instead of the fused kernel")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lengths", default="4K,32K")
    parser.add_argument("--tokens", default="64K", help="tokens per optimizer step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint-from", default="1", help="activation checkpointing at this length and up "
                        "(default: every length; 4K without it runs out of memory at 64K tokens per step on an H100)")
    parser.add_argument("--profile-rows", type=int, default=0,
                        help="after timing, profile one step and print this many ops (by self GPU time)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny width (smoke runs on a CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
    peak = peak_flops(device)
    rows = []
    for kind in args.models.split(","):
        fused.ENABLED = kind != "sala-unfused"
        model = make_model(kind.removesuffix("-unfused"), args.layers, args.device, args.small)
        params = sum(p.numel() for p in model.parameters())
        for T in (parse_length(x) for x in args.lengths.split(",")):
            batch = max(1, parse_length(args.tokens) // T)
            ckpt = T >= parse_length(args.checkpoint_from)
            try:
                seconds, mem = step_time(model, T, batch, args.steps, ckpt, args.profile_rows)
            except torch.OutOfMemoryError as err:
                rows.append({"model": kind, "T": T, "error": f"OOM ({str(err)[:60]})"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            tok_s = batch * T / seconds
            flops = training_flops_per_token(model, T) * tok_s
            rows.append({"model": kind, "layers": args.layers, "params": params, "T": T, "batch": batch,
                         "checkpointing": ckpt, "step_s": seconds, "tokens_per_s": tok_s, "model_TFLOPs": flops / 1e12,
                         "mfu": flops / peak if peak else None, "peak_GiB": mem})
            print(json.dumps(rows[-1]), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\ndevice {name}, torch {torch.__version__}; {args.layers} layers of the 8B shape, "
          f"{args.tokens} tokens per step")
    print("| model | T | batch | act. ckpt | tokens/s | model TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['T'] // 1024}K | - | - | {r['error']} | - | - | - |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['model']} | {r['T'] // 1024}K | {r['batch']} | {'yes' if r['checkpointing'] else 'no'} | "
              f"{r['tokens_per_s']:.0f} | {r['model_TFLOPs']:.0f} | {mfu} | {r['peak_GiB']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
