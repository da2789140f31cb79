"""A random-initialised SALA student checkpoint of the MiniCPM-SALA shape, for throughput and memory runs.

    python benchmarks/random_student.py --out /dev/shm/sala-8b                 # 32 layers, 9.48B parameters
    python benchmarks/random_student.py --out /dev/shm/sala-8b-8l --layers 8   # the released pattern's first 8

The weights are drawn on ``--device`` (a GPU draws the 9.48B parameters in seconds; the CPU path of
sala-make-teacher + sala-convert takes minutes) with the model's own initialisation (muP std per tensor), and
written in the HF layout in ``--dtype`` with sala-train's tokenizer: ``student=DIR`` of any training recipe.
Quality runs start from a converted teacher instead (docs/multi_gpu.md).
"""

from __future__ import annotations

import argparse
import time

import torch


def make_random_student(out: str, *, layers: int | None = None, plan: str | None = None, device: str = "cpu",
                        dtype: str = "bfloat16", seed: int = 0, small: bool = False):
    from sala_train.models import SALAConfig, SALAForCausalLM
    from sala_train.tokenizer import load_tokenizer

    config = SALAConfig()
    if plan:
        from sala_train.layer_selection.plan import LayerPlan

        mixer_types = LayerPlan.parse(plan).mixer_types()  # names the bad letter if there is one
        config.num_hidden_layers = len(mixer_types)
        config.mixer_types = mixer_types
    elif layers:
        config.num_hidden_layers = layers
        config.mixer_types = config.mixer_types[:layers]
    if small:  # a smoke test on a CPU: the same code on a tiny width
        for key, value in dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=64, vocab_size=4096, lightning_nh=4, lightning_nkv=4,
                               lightning_head_dim=64).items():
            setattr(config, key, value)
    torch.manual_seed(seed)
    with torch.device(device):
        model = SALAForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, dtype=getattr(torch, dtype), tokenizer=load_tokenizer())
    return params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=None, help="the first N layers of the released pattern")
    parser.add_argument("--plan", default=None, help="a layer pattern instead, e.g. SLLLSLLL")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="a tiny width (CPU smoke tests)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    params = make_random_student(args.out, layers=args.layers, plan=args.plan, device=args.device, dtype=args.dtype,
                                 seed=args.seed, small=args.small)
    print(f"wrote a random SALA student of {params / 1e9:.3f}B parameters to {args.out} "
          f"in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
