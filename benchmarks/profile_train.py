"""Where one training step of a checkpoint spends its time: the step the trainer's torch backend runs (packed
batches from token arrays, fp32 weights with TF32 matmuls or bf16 autocast, AdamW), timed per step and split
into data / forward+backward / optimizer, then one torch profiler table (CPU and CUDA time per op).

    python benchmarks/profile_train.py --student runs/quality/teacher-init --data benchmarks/quality/data/train.bin \
        --seq-len 1024 --micro-batch 32 --varlen loop,grouped

``--varlen loop`` swaps in one SDPA call per packed document (the implementation before the grouped
``varlen_causal_attention``), to measure what the grouping buys on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from sala_train.models import attention, minicpm


def per_document_attention(q, k, v, cu_seqlens, *, scale=None):
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[:, start:end] = attention._sdpa(q[:, start:end], k[:, start:end], v[:, start:end], is_causal=True,
                                                scale=scale)
    return out


VARLEN = {"grouped": attention.varlen_causal_attention, "loop": per_document_attention}


def use_varlen(kind: str) -> None:
    minicpm.varlen_causal_attention = VARLEN[kind]
    attention.varlen_causal_attention = VARLEN[kind]  # kernels.sparse imports it from here at call time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="a checkpoint directory (dense MiniCPM or SALA)")
    parser.add_argument("--data", required=True, help="token arrays (sala-pretokenize or prepare_corpus.py)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--varlen", default="grouped", help=f"comma list of: {', '.join(VARLEN)}")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the trainer's torch backend is fp32)")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    unknown = [kind for kind in args.varlen.split(",") if kind not in VARLEN]
    if unknown:
        parser.error(f"--varlen {','.join(unknown)}: expected some of {', '.join(VARLEN)}")

    from sala_train.data.config import DataConfig, SourceConfig
    from sala_train.data.loader import PackedLoader
    from sala_train.tokenizer import load_tokenizer
    from sala_train.train.trainer import model_class_of

    torch.set_float32_matmul_precision("high")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_class_of(args.student).from_pretrained(args.student, dtype="float32", device=device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = DataConfig(sources=[SourceConfig(path=args.data, type="tokens")], seq_len=args.seq_len,
                      batch_size=args.micro_batch)
    loader = PackedLoader(data, load_tokenizer(args.student), rank=0, world_size=1)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> tuple[float, float, float]:
        times = [time.perf_counter()]
        batches = [{k: v.to(device) for k, v in next(loader).items()} for _ in range(args.accumulation)]
        sync()
        times.append(time.perf_counter())
        for batch in batches:
            with autocast():
                loss = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
            (loss / args.accumulation).backward()
        float(loss.detach())
        sync()
        times.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter())
        return tuple(b - a for a, b in zip(times, times[1:]))

    tokens = args.seq_len * args.micro_batch * args.accumulation
    print(f"{device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {tokens} tokens per step")
    with torch.no_grad():  # the variants agree before they are timed
        batch = {k: v.to(device) for k, v in next(loader).items()}
        losses = {}
        for kind in args.varlen.split(","):
            use_varlen(kind)
            with autocast():
                losses[kind] = float(model(batch["input_ids"], position_ids=batch["position_ids"],
                                           labels=batch["labels"]).loss)
        print("loss of one batch by variant:", losses)
    print("| varlen | step ms | data ms | fwd+bwd ms | optimizer ms | tokens/s |")
    print("|---|---|---|---|---|---|")
    for kind in args.varlen.split(","):
        use_varlen(kind)
        for _ in range(2):
            step()
        rows = [step() for _ in range(args.steps)]
        med = [statistics.median(r[i] for r in rows) * 1e3 for i in range(3)]
        print(f"| {kind} | {sum(med):.1f} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | "
              f"{tokens / sum(med) * 1e3:.0f} |", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    averages = prof.key_averages()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=50))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
