"""Scaling of the staged trainer over GPUs: tokens/s, MFU and peak memory per GPU at 1 -> 2 -> 4 GPUs, each point
a short run of one recipe's first stage under torchrun, printed as a markdown table.

    python benchmarks/scaling.py --experiment minicpm_sala_8b_128k_tp2cp2 --student /ckpt/sala-8b-8layers \
        --seq-len 32768 --points 1:1x1 2:1x2 4:2x2 --steps 6
    python benchmarks/scaling.py --experiment minicpm_sala_8b_128k_tp2cp2 --student /ckpt/sala-8b-random \
        --points 4:2x2 --steps 6              # the whole 8B-shaped student at 128K: 4 GPUs (it does not fit fewer)
    python benchmarks/scaling.py ... --cpu --seq-len 256 --points 1:1x1 2:1x2 --steps 2 -- backend.bf16=false
                                              # a smoke test of the script on CPU (gloo), tiny student

A point GPUS:TPxCP runs (torchrun: this python's torch.distributed.run)

    torchrun --standalone --nproc-per-node GPUS -m sala_train.train +experiment=E student=S \
        run_dir=OUT/gpus-G-tp-T-cp-C backend.tensor_parallel=T backend.context_parallel=C \
        stages.0.seq_len=L stages.0.global_batch_tokens=0 stages.0.tokens=STEPS*L*DP ...

(one sequence per data-parallel rank per step, DP = GPUS / (TP x CP); no intermediate checkpoint, no export,
W&B off; Hydra overrides after ``--`` go to every point). The recipe must be a megatron one. tokens/s and MFU
are medians over the steps after the first (which pays for Triton compilation), from the run's metrics.jsonl;
peak memory is the trainer's ``peak_memory_gib`` (the largest over the ranks). "per GPU vs first" is tokens/s
per GPU relative to the first point: 1.0 is perfect scaling. The points run one after the other in fresh
processes; ``--dry-run`` prints their commands. Correctness first: tests/parallel (CPU, gloo) and
tests/parallel/test_megatron_gpu.py (2 GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path


def parse_point(text: str) -> tuple[int, int, int]:
    """"4:2x2" -> (gpus 4, tensor parallel 2, context parallel 2)."""
    try:
        gpus, layout = text.split(":")
        tp, cp = layout.lower().split("x")
        point = int(gpus), int(tp), int(cp)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--points: {text!r} is not GPUS:TPxCP, e.g. 4:2x2") from None
    if point[0] % (point[1] * point[2]):
        raise argparse.ArgumentTypeError(f"--points {text}: {point[0]} GPUs are not a multiple of TP x CP")
    return point


def command(args, gpus: int, tp: int, cp: int, run_dir: Path) -> list[str]:
    data_parallel = gpus // (tp * cp)
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
        "-m", "sala_train.train",
        f"+experiment={args.experiment}", f"student={args.student}", f"run_dir={run_dir}", "resume=false",
        f"backend.tensor_parallel={tp}", f"backend.context_parallel={cp}",
        f"stages.0.seq_len={args.seq_len}", "stages.0.global_batch_tokens=0",
        f"stages.0.tokens={args.steps * args.seq_len * data_parallel}",
        "stages.0.save_every=0", "stages.0.export=false", "eval_lengths=[]",
        "logging.wandb=disabled", "logging.progress=false", *args.overrides,
    ]


def summarise(run_dir: Path, gpus: int, tp: int, cp: int) -> dict:
    """Medians of the steps after the first (from metrics.jsonl); the peak memory over all steps."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    row = {"gpus": gpus, "tp": tp, "cp": cp, "dp": gpus // (tp * cp), "steps": len(steps)}
    timed = steps[1:] or steps
    if timed:
        row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
        row["mfu"] = statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None
        peaks = [r["peak_memory_gib"] for r in steps if "peak_memory_gib" in r]  # logged on GPUs only
        row["peak_gib"] = max(peaks) if peaks else None
        row["loss"] = steps[-1]["loss"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| GPUs | TP x CP x DP | steps | tokens/s | tokens/s per GPU | per GPU vs first | MFU | peak GiB/GPU "
             "| last loss |", "|---|---|---|---|---|---|---|---|---|"]
    first = None
    for row in rows:
        layout = f"{row['tp']} x {row['cp']} x {row['dp']}"
        if "tokens_per_s" not in row:
            lines.append(f"| {row['gpus']} | {layout} | failed ({row.get('error', 'no steps logged')}) | | | | | | |")
            continue
        per_gpu = row["tokens_per_s"] / row["gpus"]
        first = first or per_gpu
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "n/a"
        lines.append(f"| {row['gpus']} | {layout} | {row['steps']} | {row['tokens_per_s']:.0f} | {per_gpu:.0f} "
                     f"| {per_gpu / first:.2f} | {mfu} | {peak} | {row['loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="minicpm_sala_8b_128k_tp2cp2", help="a megatron experiment recipe")
    parser.add_argument("--student", required=True, help="the SALA checkpoint every point trains")
    parser.add_argument("--points", type=parse_point, nargs="+", default=[(1, 1, 1), (2, 1, 2), (4, 2, 2)],
                        help="GPUS:TPxCP, run in this order (default: 1:1x1 2:1x2 4:2x2)")
    parser.add_argument("--seq-len", type=int, default=131072, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per point (the first is not timed)")
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"), help="one run directory per point here")
    parser.add_argument("--cpu", action="store_true", help="hide the GPUs (gloo on the CPU: a smoke test)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every point (after --)")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    rows = []
    for gpus, tp, cp in args.points:
        run_dir = args.out / f"gpus-{gpus}-tp-{tp}-cp-{cp}"
        argv = command(args, gpus, tp, cp, run_dir)
        print("$ " + shlex.join(argv), flush=True)
        if args.dry_run:
            continue
        if (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()  # resume=false: a fresh curve, not appended to an old one
        result = subprocess.run(argv, env=env)
        row = summarise(run_dir, gpus, tp, cp)
        if result.returncode:
            row = {k: v for k, v in row.items() if k in ("gpus", "tp", "cp", "dp")}
            row["error"] = f"exit code {result.returncode}"
        rows.append(row)
        print(table(rows), flush=True)  # so far, in case a later point runs out of memory or time
    if rows:
        print(f"\n{args.experiment}, {args.seq_len} tokens per sequence, student {args.student}\n")
        print(table(rows))
    sys.exit(0 if all("error" not in r for r in rows) else 1)


if __name__ == "__main__":
    main()
