"""Does the quality study's teacher learn to copy? A pilot on the GPU (docs/quality.md, "Run 2").

Run 2's teacher spent 512 steps on copy documents (<s> span span </s>, random ids, spans of 8-511 tokens) at a
constant muP LR of 1e-2 and never learned to copy: its loss stayed at ln(vocab). This pilot trains the same
architecture (recipes/model/quality_teacher.yaml, random init as sala-make-teacher writes it) on the same kind of
documents, packed 1024 tokens to a sequence, with the trainer's muP AdamW, and reports the loss on the second
copies only (ln 4091 = 8.32 when nothing is copied, near 0 once copying works) for several LRs and span ranges.

    python benchmarks/quality/copy_pilot.py --steps 400 --lrs 1e-2 3e-3 1e-3 --spans 8-511 8-64
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import yaml

from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM
from sala_train.train.params import build_adamw

MODEL_YAML = Path(__file__).resolve().parents[2] / "recipes" / "model" / "quality_teacher.yaml"


def copy_batch(batch: int, length: int, vocab: int, min_span: int, max_span: int, gen: torch.Generator):
    """[batch, length] ids of packed <s> span span </s> documents, and a mask of the second copies' targets."""
    ids = torch.full((batch, length), 2, dtype=torch.long)
    second = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        pos = 0
        while pos < length:
            u = torch.rand((), generator=gen).item()
            span = round(math.exp(math.log(min_span) + u * (math.log(max_span) - math.log(min_span))))
            toks = torch.randint(5, vocab, (span,), generator=gen)
            doc = torch.cat([torch.tensor([1]), toks, toks, torch.tensor([2])])
            n = min(len(doc), length - pos)
            ids[b, pos:pos + n] = doc[:n]
            lo = pos + 1 + span  # first token of the second copy
            second[b, max(lo, pos):min(pos + 1 + 2 * span, length)] = True
            pos += n
    return ids, second


def run(lr: float, spans: tuple[int, int], steps: int, batch: int, length: int, device, log_every: int,
        overrides: dict | None = None) -> dict:
    torch.manual_seed(0)
    fields = {**yaml.safe_load(MODEL_YAML.read_text()), **(overrides or {})}
    config = MiniCPMConfig(**fields)
    model = MiniCPMForCausalLM(config).to(device)
    opt = build_adamw(model, lr)
    warmup = 20
    gen = torch.Generator().manual_seed(1)
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = g.setdefault("base_lr", g["lr"]) * min(1.0, step / warmup)
        ids, second = copy_batch(batch, length, config.vocab_size, *spans, gen)
        ids, second = ids.to(device), second.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -logp.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps:
            copy_loss = -logp[second[:, 1:]].mean().item()
            curve.append((step, round(loss.item(), 3), round(copy_loss, 3)))
            print(f"lr {lr:g} spans {spans[0]}-{spans[1]} step {step}: loss {loss.item():.3f}, "
                  f"second-copy loss {copy_loss:.3f}", flush=True)
    return {"lr": lr, "spans": list(spans), "curve": curve, "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-3, 1e-3])
    ap.add_argument("--spans", nargs="+", default=["8-511", "8-64"])
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="model config overrides, e.g. num_hidden_layers=4 hidden_size=128")
    ap.add_argument("--out", type=Path, default=None, help="write the curves as JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    results = []
    for spans in args.spans:
        lo, hi = (int(x) for x in spans.split("-"))
        for lr in args.lrs:
            results.append(run(lr, (lo, hi), args.steps, args.batch, args.length, device, args.log_every,
                               overrides))
    for r in results:
        print(f"lr {r['lr']:g} spans {r['spans'][0]}-{r['spans'][1]}: final second-copy loss {r['curve'][-1][2]} "
              f"({r['seconds']} s)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
