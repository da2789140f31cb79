"""Long-context inference on one GPU: 8B-shaped SALA vs the 8B-shaped dense MiniCPM-4 (random weights, bf16).

    python benchmarks/inference.py --model sala  --lengths 32K,64K,128K,256K,512K,1M --out sala.json
    python benchmarks/inference.py --model dense --lengths 32K,64K,128K,256K --out dense.json
    python benchmarks/inference.py --table sala.json dense.json        # markdown table of both

Per prompt length (each run --repeat times; the last, warm run is reported, the first one's TTFT as
first_ttft_s): time to first token (chunked prefill through the model's cache, then the first token's
logits: what ``generate`` does), decode tokens/s (greedy, one token per step, median step time), peak
memory. Lengths that run out of memory are reported as OOM and the run goes on. The SALA model is the released
MiniCPM-SALA shape (SALAConfig() defaults: 32 layers, 8 sparse); the dense one is recipes/model/minicpm4_8b.yaml.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_length(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1], 1)
    return int(text[:-1] if text[-1] in "KM" else text) * scale


def build(kind: str, layers: int | None, device: str = "cuda", small: bool = False, dtype=None,
          mixer_types: list[str] | None = None):
    """The 8B-shaped model of ``kind`` (random weights) on ``device``: bf16 on a GPU unless ``dtype``;
    ``layers`` fewer layers (the released SALA pattern's first ones unless ``mixer_types``)."""
    import yaml

    from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM, SALAConfig, SALAForCausalLM

    if kind == "sala":
        config = SALAConfig()
        if layers:
            config.num_hidden_layers = layers
            config.mixer_types = mixer_types or config.mixer_types[:layers]
        cls = SALAForCausalLM
    else:
        values = yaml.safe_load((REPO / "recipes/model/minicpm4_8b.yaml").read_text())
        if layers:
            values["num_hidden_layers"] = layers
        if small:
            values["rope_scaling"] = None  # the LongRoPE factors are per 128-dim head
        config = MiniCPMConfig(**values)
        cls = MiniCPMForCausalLM
    if small:  # smoke runs of this script on a CPU: the same code on a tiny width
        for key, value in dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=64, vocab_size=512).items():
            setattr(config, key, value)
        if kind == "sala":
            config.lightning_nh = config.lightning_nkv = 4
            config.lightning_head_dim = 64
            config.sparse_config = {**config.sparse_config, "dense_len": 1024}
    torch.set_default_dtype(dtype or (torch.bfloat16 if device == "cuda" else torch.float32))
    with torch.device(device):
        model = cls(config)
    torch.set_default_dtype(torch.float32)
    model.eval()
    if kind == "sala":
        import os

        backend = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
        model.set_backends(lightning=backend, sparse=backend)
    return model


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def dense_cache_bytes(config, tokens: int, dtype=torch.bfloat16) -> int:
    """The K/V cache of the dense model after ``tokens`` tokens: every layer keeps K and V of its KV heads."""
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
    return tokens * per_token * dtype.itemsize


def check_cache_fits(model, tokens: int) -> None:
    """Dense model on a GPU: reserve the final K/V cache once before the prefill, so that a length whose cache
    cannot sit next to the weights is reported as OOM at once instead of after a prefill of many minutes (the
    cache grows by chunks; this is a lower bound on what the run needs)."""
    if model.config.model_type != "minicpm" or not torch.cuda.is_available():
        return
    need = dense_cache_bytes(model.config, tokens, next(model.parameters()).dtype)
    free, _ = torch.cuda.mem_get_info()
    try:
        reserved = torch.empty(need, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(f"the K/V cache of {tokens} tokens needs {need / 2**30:.1f} GiB beside the "
                                     f"weights; {free / 2**30:.1f} GiB are free") from err
    del reserved
    torch.cuda.empty_cache()


@torch.no_grad()
def measure(model, T: int, chunk: int, decode_steps: int, vocab: int) -> dict:
    device = next(model.parameters()).device
    check_cache_fits(model, T + decode_steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(3, vocab, (1, T), device=device)
    cache = model.new_cache(capacity=T + decode_steps)  # as generate() does: allocated once
    _sync()
    t0 = time.perf_counter()
    logits = None
    for start in range(0, T, chunk):
        logits = model(ids[:, start:start + chunk], past_key_values=cache, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1)
    _sync()
    ttft = time.perf_counter() - t0
    prefill_peak = _peak()
    steps = []
    for _ in range(decode_steps):
        _sync()
        t1 = time.perf_counter()
        logits = model(token[:, None], past_key_values=cache).logits
        token = logits[:, -1].argmax(-1)
        _sync()
        steps.append(time.perf_counter() - t1)
    step = statistics.median(steps[2:] if len(steps) > 4 else steps) if steps else float("nan")
    return {"T": T, "ttft_s": ttft, "prefill_tok_s": T / ttft, "decode_ms": step * 1e3, "decode_tok_s": 1 / step,
            "decode_total_s": sum(steps), "decoded": len(steps), "peak_GiB": _peak(),
            "prefill_peak_GiB": prefill_peak, "cache_GiB": cache.memory_bytes() / 2**30
            if hasattr(cache, "memory_bytes") else None}


def table(files: list[str]) -> str:
    runs = {}
    for f in files:
        data = json.loads(Path(f).read_text())
        runs[data["model"]] = data
    lengths = sorted({r["T"] for d in runs.values() for r in d["rows"]})
    lines = [f"device {next(iter(runs.values()))['device']}, torch {next(iter(runs.values()))['torch']}",
             "", "| prompt | SALA TTFT s | dense TTFT s | TTFT x | SALA decode tok/s | dense decode tok/s | decode x "
             "| SALA peak GiB | dense peak GiB |", "|---|---|---|---|---|---|---|---|---|"]

    def row(model, T):
        for r in runs.get(model, {}).get("rows", []):
            if r["T"] == T:
                return r
        return None

    for T in lengths:
        s, d = row("sala", T), row("dense", T)

        def cell(r, key, fmt="{:.2f}"):
            if r is None:
                return "not run"
            if "error" in r:
                return r["error"]
            return fmt.format(r[key])
        x_ttft = f"{d['ttft_s'] / s['ttft_s']:.2f}" if s and d and "error" not in s and "error" not in d else "-"
        x_dec = f"{s['decode_tok_s'] / d['decode_tok_s']:.2f}" if s and d and "error" not in s and "error" not in d else "-"
        lines.append(f"| {T // 1024}K | {cell(s, 'ttft_s')} | {cell(d, 'ttft_s')} | {x_ttft} | "
                     f"{cell(s, 'decode_tok_s', '{:.1f}')} | {cell(d, 'decode_tok_s', '{:.1f}')} | {x_dec} | "
                     f"{cell(s, 'peak_GiB', '{:.1f}')} | {cell(d, 'peak_GiB', '{:.1f}')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sala", "dense"])
    parser.add_argument("--lengths", default="32K,64K,128K,256K,512K,1M")
    parser.add_argument("--chunk", default="64K", help="prefill chunk (tokens)")
    parser.add_argument("--decode", type=int, default=32, help="decoded tokens per length")
    parser.add_argument("--decode-last", type=int, default=None, help="decoded tokens at the longest length")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    parser.add_argument("--repeat", type=int, default=2, help="prefills per length; the last one is reported")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny width (smoke runs on a CPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", nargs="+", default=None, help="print the markdown table of these JSON files")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.model is None:
        parser.error("--model is required unless --table is given")
    model = build(args.model, args.layers, args.device, args.small)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_properties(0).name if args.device == "cuda" else args.device
    print(f"{args.model}: {params / 1e9:.2f} B parameters on {name}, torch {torch.__version__}", flush=True)
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    result = {"model": args.model, "device": name, "torch": torch.__version__, "params": params,
              "chunk": parse_length(args.chunk), "rows": []}
    measure(model, min(4096, lengths[0]), parse_length(args.chunk), 4, model.config.vocab_size)  # warm-up: compile the kernels
    for i, T in enumerate(lengths):
        steps = args.decode_last if (args.decode_last and i == len(lengths) - 1) else args.decode
        try:
            # Triton specialises kernels on argument values (sizes divisible by 16, ...): the first prefill
            # at a new length may compile; it is reported as first_ttft_s, the TTFT is the last repeat's
            first = None
            for _ in range(args.repeat):
                r = measure(model, T, parse_length(args.chunk), steps, model.config.vocab_size)
                first = r["ttft_s"] if first is None else first
            r["first_ttft_s"] = first
        except torch.OutOfMemoryError as err:
            r = {"T": T, "error": "OOM", "reason": str(err)[:200]}
            print(f"T={T}: out of memory ({str(err)[:100]})", file=sys.stderr, flush=True)
        result["rows"].append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        if "error" in r:
            break


if __name__ == "__main__":
    main()
