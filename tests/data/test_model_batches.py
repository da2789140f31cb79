"""The batches are what the model expects: the loss of a packed batch equals the loss of its documents run
one by one (so no attention, and no target, crosses a document boundary)."""

import torch
import torch.nn.functional as F

from sala_train.data import DataConfig, PackedLoader, SourceConfig
from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM


def tiny_model(vocab_size):
    torch.manual_seed(0)
    config = MiniCPMConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return MiniCPMForCausalLM(config).eval()


def test_packed_loss_equals_the_loss_of_each_document_alone(tmp_path, tokenizer, corpus):
    sources = [SourceConfig(path=str(corpus["web"])), SourceConfig(path=str(corpus["chat"]), chat=True)]
    config = DataConfig(sources=sources, seq_len=128, batch_size=2, seed=1, cache_dir=str(tmp_path / "cache"))
    loader = PackedLoader(config, tokenizer)
    model = tiny_model(len(tokenizer))
    for _ in range(2):
        batch = next(loader)
        with torch.no_grad():
            packed_loss = model(**batch).loss
            total, count = torch.zeros((), dtype=torch.float64), 0
            for ids, positions, labels in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
                starts = torch.nonzero(positions == 0).flatten().tolist() + [len(ids)]
                for a, b in zip(starts[:-1], starts[1:]):
                    logits = model(input_ids=ids[None, a:b]).logits[0].double()
                    targets = labels[a + 1 : b]  # token t predicts label t + 1, inside the document only
                    keep = targets != -100
                    if keep.any():
                        total += F.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum")
                        count += int(keep.sum())
        # fp32 model, sums in fp64: only float rounding separates the two
        torch.testing.assert_close(packed_loss.double(), total / count, rtol=1e-5, atol=1e-6)
