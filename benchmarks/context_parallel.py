"""Context parallelism on the hybrid model: training tokens/s at given lengths, CP=1 (one GPU, the whole
sequence) against CP = world size (the sequence zigzag-split over the GPUs), measured in the same run.

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --lengths 32768 65536 131072
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --cpu --lengths 256 512 --hidden 64   # smoke test

Each configuration runs forward + backward of one packed sequence (documents of --doc-len tokens, the last
ones crossing CP borders) under bf16 autocast with activation checkpointing, ``--steps`` timed steps after
one warm-up step (whose time is reported as the first-call cost, Triton compilation included). CP=1 runs on
every GPU at once, each its own copy (tokens/s per GPU); CP=N shares one sequence over N GPUs. Prints a
markdown table on rank 0: median step time, tokens/s per sequence and per GPU, peak memory per GPU.
Correctness first: tests/parallel (CPU) and tests/parallel/test_megatron_gpu.py (2 GPUs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def build_model(args, device):
    from sala_train.models import SALAConfig, SALAForCausalLM

    layers = args.layers
    mixers = ["minicpm4" if i % 4 == 0 else "lightning-attn" for i in range(layers)]  # 1 sparse : 3 lightning
    backend = "torch" if device.type == "cpu" else "triton"
    config = SALAConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        lightning_nh=args.heads, lightning_nkv=args.heads, lightning_head_dim=args.head_dim, mixer_types=mixers,
        sparse_config=dict(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, window_size=2048, topk=64,
                           use_nope=False, dense_len=8192),
        max_position_embeddings=1 << 21, initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        scale_emb=12.0, scale_depth=1.4, dim_model_base=256, lightning_backend=backend, sparse_backend=backend)
    torch.manual_seed(0)
    model = SALAForCausalLM(config).to(device).train()
    model.gradient_checkpointing_enable()
    return model


def batch(length: int, doc_len: int, vocab: int, device):
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(length) % doc_len
    return ids.to(device), positions[None].to(device), ids.to(device)


def time_steps(step, steps: int, device) -> tuple[float, float]:
    """(first step's seconds, median of the next ``steps``)."""
    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = timed()
    return first, statistics.median(timed() for _ in range(steps))


def measure(args, length: int, cp: int, device) -> dict:
    from sala_train.parallel.megatron import MegatronBackend
    from sala_train.train.config import BackendConfig, StageConfig
    from sala_train.train.params import param_groups

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args, device)
    ids, positions, labels = batch(length, args.doc_len, args.vocab, device)
    if cp == 1:
        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(ids, position_ids=positions, labels=labels).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        backend = MegatronBackend(model, param_groups(model, 1e-4, 0.0), StageConfig(seq_len=length, tokens=length), 1,
                                  world_size=dist.get_world_size(), device=device,
                                  config=BackendConfig(name="megatron", context_parallel=cp,
                                                       bf16=device.type == "cuda"))

        def step():
            backend.backward(backend.model(ids, position_ids=positions, labels=labels).loss)
            backend.reduce_gradients()
            backend.optimizer.zero_grad(set_to_none=True)
    try:
        first, median = time_steps(step, args.steps, device)
    except torch.OutOfMemoryError:
        return {"length": length, "cp": cp, "oom": True}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"length": length, "cp": cp, "first_s": first, "step_s": median, "tokens_per_s": length / median,
            "tokens_per_s_per_gpu": length / median / cp, "peak_gib": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--doc-len", type=int, default=50000, help="tokens per packed document")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU (a smoke test of the script)")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if use_cuda else "CPU"
        print(f"{world} x {name}, torch {torch.__version__}; model hidden {args.hidden}, {args.layers} layers "
              f"(1 sparse : 3 lightning), heads {args.heads}/{args.kv_heads} x {args.head_dim}, bf16 autocast: "
              f"{use_cuda}, activation checkpointing, documents of {args.doc_len} tokens")
    rows = []
    for length in args.lengths:
        for cp in (1, world):
            rows.append(measure(args, length, cp, device))
            dist.barrier()
    if rank == 0:
        print("\n| tokens | CP | first step (s) | step (s) | tokens/s (sequence) | tokens/s per GPU | peak GiB/GPU |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            if r.get("oom"):
                print(f"| {r['length']} | {r['cp']} | out of memory | | | | |")
                continue
            print(f"| {r['length']} | {r['cp']} | {r['first_s']:.2f} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} "
                  f"| {r['tokens_per_s_per_gpu']:.0f} | {r['peak_gib']:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
