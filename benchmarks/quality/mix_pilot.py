"""Copying and text, learned one after the other or together? A pilot for the quality study's teacher.

Run 3 of docs/quality.md gave the teacher 2560 steps of copy documents before its text: copying began near step 2200,
and then the text was learned much worse than without the warm-up (held-out loss 5.83 against 4.40). This pilot
asks the same question on a model small enough for a CPU (by default the teacher's architecture cut to 4 layers,
hidden 128), with the trainer's muP AdamW, in three arms of the same number of steps:

    text            text only (train.bin windows)
    copy_then_text  copy sequences for --copy-steps steps, then text (run 3's order)
    mixed           every batch --mix copy sequences, the rest text (from the first step)

It reports, every --eval-every steps, the held-out text loss (fixed heldout.bin windows) and the loss on the second
copies of a fixed copy batch (ln 4096 = 8.32: nothing copied; near 0: copying works).

    python benchmarks/quality/mix_pilot.py --steps 1500 --copy-steps 600 --out docs/quality/mix_pilot_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM
from sala_train.train.params import build_adamw

sys.path.insert(0, str(Path(__file__).resolve().parent))  # copy_pilot beside this file (also under PYTHONSAFEPATH)
from copy_pilot import MODEL_YAML, copy_batch  # noqa: E402

SMALL = {"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 320, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 64, "dim_model_base": 64}


def text_windows(tokens: np.ndarray, count: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(tokens) - length, count)
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))


def losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token losses [B, T - 1]."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]


def run(arm: str, args, train: np.ndarray, heldout: torch.Tensor, copy_eval) -> dict:
    torch.manual_seed(0)
    config = MiniCPMConfig(**{**yaml.safe_load(MODEL_YAML.read_text()), **SMALL, **args.overrides})
    model = MiniCPMForCausalLM(config)
    opt = build_adamw(model, args.lr)
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    n_copy = round(args.mix * args.batch)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = g.setdefault("base_lr", g["lr"]) * min(1.0, step / 20)
        copies = {"text": 0, "mixed": n_copy, "copy_then_text": args.batch if step <= args.copy_steps else 0}[arm]
        parts = []
        if copies:
            parts.append(copy_batch(copies, args.length, config.vocab_size, 8, min(64, args.length // 2 - 1), gen)[0])
        if args.batch - copies:
            parts.append(text_windows(train, args.batch - copies, args.length, rng))
        loss = losses(model, torch.cat(parts)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                text_loss = losses(model, heldout).mean().item()
                copy_ids, second = copy_eval
                copy_loss = losses(model, copy_ids)[second[:, 1:]].mean().item()
            curve.append((step, round(text_loss, 3), round(copy_loss, 3)))
            print(f"{arm} step {step}: held-out text loss {text_loss:.3f}, second-copy loss {copy_loss:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return {"arm": arm, "curve": curve, "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("benchmarks/quality/data"))
    ap.add_argument("--arms", nargs="+", default=["text", "copy_then_text", "mixed"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--copy-steps", type=int, default=600, help="copy_then_text: steps of copy sequences first")
    ap.add_argument("--mix", type=float, default=0.5, help="mixed: the fraction of copy sequences in each batch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    for name in ("train.bin", "heldout.bin"):
        if not (args.data / name).exists():
            raise SystemExit(f"mix_pilot: {args.data / name} is missing; run benchmarks/quality/prepare_corpus.py")
    train = np.fromfile(args.data / "train.bin", dtype=np.uint16)
    heldout = text_windows(np.fromfile(args.data / "heldout.bin", dtype=np.uint16), 16, args.length,
                           np.random.default_rng(7))
    copy_eval = copy_batch(16, args.length, 4096, 8, min(64, args.length // 2 - 1), torch.Generator().manual_seed(7))
    results = [run(arm, args, train, heldout, copy_eval) for arm in args.arms]
    for r in results:
        print(f"{r['arm']}: final held-out text loss {r['curve'][-1][1]}, second-copy loss {r['curve'][-1][2]} "
              f"({r['seconds']} s)")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "data" and k != "out"},
                                        "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
