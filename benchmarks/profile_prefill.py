"""Where a long SALA prefill spends its time: torch profiler over one chunked prefill (CPU and CUDA time per op).

    python benchmarks/profile_prefill.py --length 256K --chunk 64K [--layers 8]
"""

from __future__ import annotations

import argparse

import torch

from inference import build, parse_length


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="sala", choices=["sala", "dense"])
    parser.add_argument("--length", default="256K")
    parser.add_argument("--chunk", default="64K")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = build(args.model, args.layers)
    T, chunk = parse_length(args.length), parse_length(args.chunk)
    ids = torch.randint(3, model.config.vocab_size, (1, T), device="cuda")
    with torch.no_grad():
        cache = model.new_cache()  # warm-up: compile every kernel at these shapes
        for start in range(0, T, chunk):
            model(ids[:, start:start + chunk], past_key_values=cache, logits_to_keep=1)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            cache = model.new_cache()
            for start in range(0, T, chunk):
                model(ids[:, start:start + chunk], past_key_values=cache, logits_to_keep=1)
            torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(averages.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
