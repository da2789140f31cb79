"""`make demo`: the whole pipeline on CPU at toy scale, each step through its own command line.

    tiny teacher -> HALO layer selection -> conversion -> every training stage (2 processes: torchrun,
    DeepSpeed ZeRO-2, gloo)
    -> HF export -> generation -> evaluation (held-out loss by length, passkey retrieval), summary table

Run: python -m sala_train.demo [OUT_DIR]   (default runs/demo; the folder is replaced)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SPARSE = "{kernel_size:8,kernel_stride:4,block_size:16,window_size:64,topk:4,dense_len:256}"


def step(title: str, args: list[str], env: dict) -> float:
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    started = time.perf_counter()
    subprocess.run(args, check=True, env=env)
    return time.perf_counter() - started


def evaluate(out: Path) -> list[tuple]:
    """Held-out loss at 256 and 1024 tokens (4x the longest dense training length) and passkey retrieval."""
    import torch

    from sala_train.generate import load_model
    from sala_train.layer_selection.corpus import load_corpus
    from sala_train.layer_selection.tasks import HeldoutLoss, passkey_examples, score_answers
    from sala_train.tokenizer import DEFAULT_SAMPLE_TEXT, load_tokenizer

    tokenizer = load_tokenizer(out / "teacher")
    corpus = load_corpus([DEFAULT_SAMPLE_TEXT], tokenizer)
    models = {"teacher": out / "teacher", "student (converted)": out / "student",
              "student (trained)": out / "train" / "export" / "long"}
    rows = []
    torch.manual_seed(0)
    for name, path in models.items():
        model = load_model(str(path), dtype="float32").eval()
        row = [name]
        for length in (256, 1024):
            row.append(HeldoutLoss(corpus.heldout_tokens, length, 4, 2)(model, tokenizer)["loss"])
        for length in (256, 1024):
            examples = passkey_examples(tokenizer, 4, length, seed=1)
            row.append(score_answers(model, examples, 2, tokenizer.pad_token_id)["logprob"])
        rows.append(tuple(row))
    return rows


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    py = sys.executable
    bin_dir = Path(py).parent
    times = {}
    times["teacher"] = step("1/6 tiny MiniCPM-4 teacher (recipes/model/tiny.yaml)",
                            [str(bin_dir / "sala-make-teacher"), "model=tiny", f"output_dir={out / 'teacher'}"], env)
    times["selection"] = step("2/6 HALO layer selection (align students, sweep, scores, plan)", [
        py, "-m", "sala_train.select", f"teacher={out / 'teacher'}", f"output={out / 'select'}", "align.steps=40",
        "align.seq_len=128", "align.batch_size=4", "tasks.context_len=256", "tasks.heldout_len=256",
        "selection.ratio=0.5"], env)
    times["conversion"] = step("3/6 conversion (teacher + plan + aligned students -> SALA)", [
        str(bin_dir / "sala-convert"), f"teacher={out / 'teacher'}", f"plan={out / 'select' / 'plan.json'}",
        f"aligned={out / 'select' / 'students.safetensors'}", f"output={out / 'student'}",
        f"++sparse_config={SPARSE}"], env)
    times["training"] = step("4/6 every stage, 2 processes (torchrun, DeepSpeed ZeRO-2, gloo)", [
        py, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517", "-m", "sala_train.train",
        "+experiment=tiny_cpu", f"student={out / 'student'}", f"teacher={out / 'teacher'}",
        f"run_dir={out / 'train'}", "logging.progress=false"], env)
    times["generation"] = step("5/6 generation with the trained student", [
        str(bin_dir / "sala-generate"), f"model_dir={out / 'train' / 'export' / 'long'}",
        "prompt=The history of the printing press", "max_new_tokens=24"], env)
    print("\n=== 6/6 evaluation", flush=True)
    rows = evaluate(out)
    plan = json.loads((out / "select" / "plan.json").read_text())["pattern"]
    print(f"\nlayer plan chosen by HALO: {plan}  (S = sparse, L = lightning)")
    print(f"{'model':<22}{'loss@256':>10}{'loss@1024':>11}{'passkey@256':>13}{'passkey@1024':>14}")
    for name, *values in rows:
        print(f"{name:<22}" + "".join(f"{v:>{w}.3f}" for v, w in zip(values, (10, 11, 13, 14))))
    print("(passkey: mean log-probability of the answer tokens; random weights make every number near chance)")
    print("\nseconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    wandb_runs = sorted((out / "train" / "wandb").glob("offline-run-*")) if (out / "train" / "wandb").exists() else []
    print(f"loss curve: {out / 'train' / 'loss_curve.png'}; metrics: {out / 'train' / 'metrics.jsonl'}; "
          f"W&B offline run: {wandb_runs[-1] if wandb_runs else 'none (wandb not installed)'}")


if __name__ == "__main__":
    main()
