"""Per-layer statistics of a converted student against its teacher on sample text.

After every layer l (0 = the embeddings) both models' hidden states are compared on the same tokens:
relative RMS difference ||h_s - h_t|| / ||h_t|| and mean cosine similarity per token; at the output, the
mean KL(teacher || student) per token and the top-1 agreement. The differences compound through the depth
(each student layer sees the student's own earlier outputs), which is what a user of the student gets.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def layer_statistics(teacher_dir: str | Path, student_dir: str | Path, *, text_file: str | Path | None = None,
                     seq_len: int = 256, num_sequences: int = 4, device: str = "cpu") -> dict:
    """{"layers": [{layer, rel_rms, cosine}, ...], "output": {kl, top1_agreement}} on ``num_sequences``
    windows of ``seq_len`` tokens of ``text_file`` (default: the text committed with sala-train)."""
    from sala_train.generate import load_model
    from sala_train.tokenizer import DEFAULT_SAMPLE_TEXT, load_tokenizer

    tokenizer = load_tokenizer(teacher_dir)
    text = Path(text_file or DEFAULT_SAMPLE_TEXT).read_text()
    tokens = torch.tensor(tokenizer(text[: 40 * seq_len * num_sequences]).input_ids)
    n = min(num_sequences, tokens.numel() // seq_len)
    if n == 0:
        raise ValueError(f"{text_file or DEFAULT_SAMPLE_TEXT} has fewer than seq_len = {seq_len} tokens")
    ids = tokens[: n * seq_len].view(n, seq_len).to(device)
    teacher = load_model(str(teacher_dir), dtype="float32", device=device).eval()
    student = load_model(str(student_dir), dtype="float32", device=device).eval()
    out_t = teacher(ids, output_hidden_states=True)
    out_s = student(ids, output_hidden_states=True)
    layers = []
    for index, (h_t, h_s) in enumerate(zip(out_t.hidden_states, out_s.hidden_states)):
        rel = ((h_s - h_t).norm() / h_t.norm().clamp_min(1e-12)).item()
        cosine = F.cosine_similarity(h_s.flatten(0, 1), h_t.flatten(0, 1), dim=-1).mean().item()
        layers.append({"layer": index, "rel_rms": rel, "cosine": cosine})
    log_p_t = out_t.logits.log_softmax(-1)
    log_p_s = out_s.logits.log_softmax(-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean().item()
    agree = (out_t.logits.argmax(-1) == out_s.logits.argmax(-1)).float().mean().item()
    return {"layers": layers, "output": {"kl": kl, "top1_agreement": agree}}


def write_layer_statistics(stats: dict, path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "rel_rms", "cosine"])
        writer.writeheader()
        writer.writerows(stats["layers"])
    return path


def format_layer_statistics(stats: dict) -> str:
    lines = [f"{'layer':>6}{'rel RMS diff':>14}{'cosine':>9}"]
    lines += [f"{r['layer']:>6}{r['rel_rms']:>14.4g}{r['cosine']:>9.4f}" for r in stats["layers"]]
    out = stats["output"]
    lines.append(f"output: KL(teacher || student) {out['kl']:.4g} nats/token, top-1 agreement {out['top1_agreement']:.3f}")
    return "\n".join(lines)
