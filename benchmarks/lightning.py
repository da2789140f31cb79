"""Lightning attention on one GPU: correctness first, then ours vs fla `chunk_simple_gla` vs torch SDPA.

    python benchmarks/lightning.py                 # full table (H=32, D=128, bf16, B*T = 256K tokens)
    python benchmarks/lightning.py --quick         # fewer sizes
    python benchmarks/lightning.py --sweep         # also sweep launch configurations of ours

Prints a table (ms, median of do_bench after warm-up; ratio = fla / ours; HBM GB/s of the forward counting
q, k, v read and o written once) and writes it as markdown to --out (default: stdout only).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton
import triton.testing

from sala_train.kernels.lightning import lightning_attention, lightning_decode, sala_decay
from sala_train.kernels.lightning import chunk as chunk_module
from sala_train.kernels.lightning.naive import lightning_attention_parallel


def try_import_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        import fla

        return chunk_simple_gla, fused_recurrent_simple_gla, getattr(fla, "__version__", "?")
    except Exception as err:  # noqa: BLE001 - report and go on without the baseline
        print(f"fla not available: {err}", file=sys.stderr)
        return None, None, None


def bench(fn, rep_ms=200) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def rel_err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def check_correctness(fla_chunk, H=32, D=128):
    """bf16 ours and fla vs an fp64 reference on the same random inputs: forward, final state, grads."""
    rows = []
    torch.manual_seed(0)
    for B, T, varlen in ((2, 1000, False),):
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        s0 = torch.randn(B if not varlen else 3, H, D, D, device="cuda") * 0.1
        do = torch.randn_like(q)
        g = sala_decay(H).cuda()
        cu = torch.tensor([0, 700, 701, T], device="cuda") if varlen else None
        if varlen:
            s0 = torch.randn(3, H, D, D, device="cuda") * 0.1
        ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
        s0_ref = s0.double().requires_grad_()
        o_ref, f_ref = lightning_attention_parallel(*ref_inputs, g, None, s0_ref, True, cu)
        (o_ref * do.double()).sum().backward()
        grads_ref = [x.grad for x in ref_inputs] + [s0_ref.grad]

        def run(fn):
            inputs = [x.clone().requires_grad_() for x in (q, k, v)]
            s = s0.clone().requires_grad_()
            o, f = fn(*inputs, s)
            (o.float() * do.float()).sum().backward()
            return [o, f] + [x.grad for x in inputs] + [s.grad]

        ours = run(lambda a, b, c, s: lightning_attention(a, b, c, g, initial_state=s, output_final_state=True, cu_seqlens=cu))
        results = {"ours": ours}
        if fla_chunk is not None:
            results["fla"] = run(lambda a, b, c, s: fla_chunk(a, b, c, g_gamma=g, scale=D**-0.5, initial_state=s,
                                                               output_final_state=True, cu_seqlens=cu))
        refs = [o_ref, f_ref] + grads_ref
        for name, outs in results.items():
            errs = [rel_err(x, r) for x, r in zip(outs, refs)]
            rows.append((f"B={B} T={T}{' varlen' if varlen else ''}", name, *errs))
    print("\n## correctness vs fp64 (relative error ||x - ref|| / ||ref||)")
    print(f"{'case':<22}{'impl':<6}{'o':>10}{'final':>10}{'dq':>10}{'dk':>10}{'dv':>10}{'dh0':>10}")
    for case, name, *errs in rows:
        print(f"{case:<22}{name:<6}" + "".join(f"{e:>10.2e}" for e in errs))
    for case, name, *errs in rows:
        if name == "ours" and (max(errs) > 2e-2 or any(math.isnan(e) for e in errs)):
            raise SystemExit(f"ours is wrong on {case}: {errs}")
    return rows


def time_variants(fla_chunk, T, B, H=32, D=128, with_sdpa=True, rep_ms=200, variants=None):
    """ms of ours (defaults), fla and SDPA at B x T; ``variants`` {name: KERNEL_OVERRIDES} also times ours with
    each override as ours_<name>_fwd / ours_<name>_fwdbwd, side by side in the same run."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = sala_decay(H).cuda()
    do = torch.randn_like(q)
    out = {}

    def fwd_bwd(fn):
        # autograd.grad, not backward(): .backward() on leaf tensors would add an accumulation kernel
        # (q.grad += dq, 3 extra passes over memory) to every timed step
        def step():
            o = fn()
            torch.autograd.grad(o, (q, k, v), do)
        return step

    def timed(key, fn):
        # each measurement on its own: at 1M tokens one implementation may run out of memory where the other
        # does not (fla keeps a state per 64-token chunk); the table then says "oom" for that cell only
        try:
            out[key] = bench(fn, rep_ms)
        except torch.OutOfMemoryError:
            out[key] = float("nan")
            out.setdefault("oom", []).append(key)
            print(f"T={T} B={B}: {key} out of memory", file=sys.stderr)
        torch.cuda.empty_cache()

    ours = lambda: lightning_attention(q, k, v, g)[0]  # noqa: E731
    with torch.no_grad():
        timed("ours_fwd", ours)
    timed("ours_fwdbwd", fwd_bwd(ours))
    for name, override in (variants or {}).items():
        chunk_module.KERNEL_OVERRIDES.update(override)
        try:
            with torch.no_grad():
                timed(f"ours_{name}_fwd", ours)
            timed(f"ours_{name}_fwdbwd", fwd_bwd(ours))
        finally:
            chunk_module.KERNEL_OVERRIDES.clear()
    if fla_chunk is not None:
        fla = lambda: fla_chunk(q, k, v, g_gamma=g, scale=D**-0.5)[0]  # noqa: E731
        with torch.no_grad():
            timed("fla_fwd", fla)
        timed("fla_fwdbwd", fwd_bwd(fla))
    if with_sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.CUDNN_ATTENTION, "cudnn")):
            def sdpa():
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            try:
                reps = max(20, rep_ms // (1 + T // 16384))
                with torch.no_grad():
                    out[f"sdpa_{name}_fwd"] = bench(sdpa, reps)
                out[f"sdpa_{name}_fwdbwd"] = bench(lambda: torch.autograd.grad(sdpa(), (qt, kt, vt), dot), reps)
            except Exception as err:  # noqa: BLE001
                print(f"sdpa {name} at T={T}: {type(err).__name__}: {str(err)[:120]}", file=sys.stderr)
    bytes_fwd = 4 * B * T * H * D * 2
    out["ours_fwd_GBps"] = bytes_fwd / out["ours_fwd"] / 1e6
    out["floor_fwd_ms_at_3TBps"] = bytes_fwd / 3.0e9
    return out


def time_decode(fla_recurrent, N, H=32, D=128):
    torch.manual_seed(2)
    q, k, v = (torch.randn(N, 1, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = sala_decay(H).cuda()
    state = torch.randn(N, H, D, D, device="cuda")
    out = {"ours_decode": bench(lambda: lightning_decode(q, k, v, g, state), 100)}
    if fla_recurrent is not None:
        out["fla_decode"] = bench(lambda: fla_recurrent(q, k, v, g_gamma=g, scale=D**-0.5, initial_state=state,
                                                       output_final_state=True), 100)
    out["state_GBps"] = 2 * N * H * D * D * 4 / out["ours_decode"] / 1e6
    return out


def print_kernel_profile(T, B, H=32, D=128):
    """CUDA time per kernel of one forward+backward of ours (torch profiler)."""
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = sala_decay(H).cuda()
    do = torch.randn_like(q)
    for _ in range(2):
        torch.autograd.grad(lightning_attention(q, k, v, g)[0], (q, k, v), do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(lightning_attention(q, k, v, g)[0], (q, k, v), do)
        torch.cuda.synchronize()
    print(f"\n## ours per kernel, T={T} B={B}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


SWEEP_CONFIGS = (
    {},  # the defaults: C 64, BV 128 (one V tile per head), 8 warps, 3 stages, block_policy "programs"
    {"block_policy": "waves"},  # the longest blocks that fill the SMs once (whole sequences where B x H allows)
    {"stages_fwd": 2},  # the H100 default before the 2026-12-03 H200 sweep
    {"stages_fwd": 4},
    {"C": 32, "warps_fwd": 4},
    # the one spill-free forward with one V tile by `python -m sala_train.kernels.compile_check`-style ptxas
    # reports (Triton 3.7.1, sm_90): the defaults' output kernel spills 168 B at 255 registers, C 32 none (236)
    {"C": 32},
    {"C": 32, "stages_fwd": 2},
    {"C": 128},  # half the serial chunk steps per block, twice the intra-chunk work in each (needs 288 KB of
    # shared memory at 3 stages by ptxas: more than an H100/H200 has, so expect an out-of-resources cell)
    {"C": 128, "stages_fwd": 2},
    # two V tiles per head: half the state in registers, q and k read by both tiles; v_first puts the two side
    # by side in the grid so that the second read hits L2 (on H200, 2026-12-03: 5-7% faster than without, and
    # slower than one V tile with 3 stages)
    {"BV": 64, "warps_fwd": 4, "v_first": True, "stages_fwd": 2},
)
SWEEP_BLOCK_LENS = (None, 16384, 65536, 262144)  # None: the policy's choice; longer than T: skipped
SWEEP_BWD = ({}, {"block_policy": "waves"}, {"stages_fwd": 2})
SWEEP_DECODE = ({}, {"BV": 32, "warps": 4}, {"BV": 64, "warps": 8}, {"BV": 128, "warps": 4})


def run_sweep(H=32, D=128):
    """Forward time of each launch configuration x block length at 64 x 4K, 16 x 16K, 4 x 64K and 1 x 256K;
    then forward+backward variants at 4 x 64K and decode variants. Prints one line per point."""
    sweep = {}
    g = sala_decay(H).cuda()
    for T, B in ((4096, 64), (16384, 16), (65536, 4), (262144, 1)):
        torch.manual_seed(1)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for override in SWEEP_CONFIGS:
            for block_len in SWEEP_BLOCK_LENS:
                if block_len and block_len > T:
                    continue
                chunk_module.KERNEL_OVERRIDES.clear()
                chunk_module.KERNEL_OVERRIDES.update(override)
                key = f"fwd T={T} B={B} {json.dumps(override)} L={block_len}"
                try:
                    with torch.no_grad():
                        sweep[key] = bench(lambda: lightning_attention(q, k, v, g, block_len=block_len), 50)
                except Exception as err:  # noqa: BLE001
                    sweep[key] = str(err)[:100]
                print("sweep", key, sweep[key], flush=True)
        del q, k, v
    for override in SWEEP_BWD:
        chunk_module.KERNEL_OVERRIDES.clear()
        chunk_module.KERNEL_OVERRIDES.update(override)
        key = f"f+b T=65536 B=4 {json.dumps(override)}"
        try:
            sweep[key] = time_variants(None, 65536, 4, with_sdpa=False, rep_ms=100)["ours_fwdbwd"]
        except Exception as err:  # noqa: BLE001
            sweep[key] = str(err)[:100]
        print("sweep", key, sweep[key], flush=True)
    chunk_module.KERNEL_OVERRIDES.clear()
    from sala_train.kernels.lightning import recurrent

    for override in SWEEP_DECODE:
        recurrent.DECODE_OVERRIDES.clear()
        recurrent.DECODE_OVERRIDES.update(override)
        for N in (1, 16, 128):
            key = f"decode N={N} {json.dumps(override)}"
            sweep[key] = time_decode(None, N)["ours_decode"]
            print("sweep", key, sweep[key], flush=True)
    recurrent.DECODE_OVERRIDES.clear()
    return sweep


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="only the launch-configuration sweep")
    parser.add_argument("--skip-correctness", action="store_true", help="timings only (correctness run before)")
    parser.add_argument("--sizes", default=None, help="T:B pairs, e.g. 4096:64,65536:4")
    parser.add_argument("--no-sdpa", action="store_true")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    parser.add_argument("--variants", default=None,
                        help='also time ours with these KERNEL_OVERRIDES, JSON {name: overrides}, e.g. '
                             '\'{"waves": {"block_policy": "waves"}}\'')
    args = parser.parse_args()
    variants = json.loads(args.variants) if args.variants else None
    fla_chunk, fla_recurrent, fla_version = try_import_fla()
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, torch {torch.__version__}, triton {triton.__version__}, fla {fla_version}")
    t0 = time.time()
    results = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version}
    if not (args.sweep_only or args.skip_correctness):
        results["correctness"] = check_correctness(fla_chunk)
        print(f"(correctness took {time.time() - t0:.0f} s)")

    sizes = [(4096, 64), (16384, 16), (65536, 4), (262144, 1)]
    if args.quick:
        sizes = [(4096, 64), (65536, 4)]
    if args.sizes:
        sizes = [tuple(int(x) for x in pair.split(":")) for pair in args.sizes.split(",")]
    if args.sweep or args.sweep_only:
        results["sweep"] = run_sweep()
        if args.sweep_only:
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1, default=str)
            return

    if not args.skip_correctness:
        print_kernel_profile(65536, 4)
    table = []
    for T, B in sizes:
        r = time_variants(fla_chunk, T, B, with_sdpa=not args.no_sdpa, variants=variants)
        table.append((T, B, r))
        print(f"T={T} B={B}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in r.items()), flush=True)
    if not (args.quick or args.sizes):
        torch.cuda.empty_cache()
        try:
            r = time_variants(fla_chunk, 1 << 20, 1, with_sdpa=False, rep_ms=100)
            table.append((1 << 20, 1, r))
            print(f"T=1M B=1: " + ", ".join(f"{k}={v}" for k, v in r.items()), flush=True)
        except torch.OutOfMemoryError as err:  # the inputs themselves (4 x 8.6 GB) did not fit
            print(f"T=1M: out of memory ({str(err)[:80]})")
    torch.cuda.empty_cache()
    decode = [(N, time_decode(fla_recurrent, N)) for N in (1, 16, 128)]
    results["table"] = table
    results["decode"] = decode

    print("\n## lightning attention, bf16, H=32, D=128 (ms, median; x = fla / ours)")
    print(f"{'T':>8}{'B':>4}{'ours fwd':>10}{'fla fwd':>10}{'x':>6}{'ours f+b':>10}{'fla f+b':>10}{'x':>6}"
          f"{'flash f':>10}{'flash f+b':>11}{'cudnn f':>10}{'cudnn f+b':>11}{'GB/s':>7}{'floor':>7}")
    for T, B, r in table:
        def cell(key, width=10):
            return f"{r[key]:>{width}.3f}" if key in r else f"{'-':>{width}}"
        x_f = r["fla_fwd"] / r["ours_fwd"] if "fla_fwd" in r else float("nan")
        x_fb = r["fla_fwdbwd"] / r["ours_fwdbwd"] if "fla_fwdbwd" in r else float("nan")
        print(f"{T:>8}{B:>4}{cell('ours_fwd')}{cell('fla_fwd')}{x_f:>6.2f}{cell('ours_fwdbwd')}{cell('fla_fwdbwd')}"
              f"{x_fb:>6.2f}{cell('sdpa_flash_fwd')}{cell('sdpa_flash_fwdbwd', 11)}{cell('sdpa_cudnn_fwd')}"
              f"{cell('sdpa_cudnn_fwdbwd', 11)}{r['ours_fwd_GBps']:>7.0f}{r['floor_fwd_ms_at_3TBps']:>7.2f}")
    for name in variants or {}:
        print(f"\n## ours with {name} = {json.dumps(variants[name])} (x = fla / ours)")
        for T, B, r in table:
            f, fb = r.get(f"ours_{name}_fwd"), r.get(f"ours_{name}_fwdbwd")
            if f and fb:
                print(f"{T:>8}{B:>4} fwd {f:.3f} (x {r.get('fla_fwd', float('nan')) / f:.2f}, defaults "
                      f"{r['ours_fwd']:.3f})  f+b {fb:.3f} (x {r.get('fla_fwdbwd', float('nan')) / fb:.2f}, defaults "
                      f"{r['ours_fwdbwd']:.3f})")
    print("\n## decode step (ms)")
    for N, r in decode:
        fla = r.get("fla_decode", float("nan"))
        print(f"batch {N:>4}: ours {r['ours_decode']:.4f}  fla {fla:.4f}  x {fla / r['ours_decode']:.2f}  "
              f"state traffic {r['state_GBps']:.0f} GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
