"""Key/value cache for the dense attention layers of the teacher (and, later, the sparse SALA layers)."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer K/V buffers [B, capacity, H_kv, D] that grow by doubling, so that decoding a long
    sequence costs amortised O(1) copies per token instead of a concatenation per step. ``initial_capacity``
    sizes the first allocation: ``generate`` passes prompt + new tokens, so that a long prompt's cache is
    allocated once at its final size (doubling a 1M-token buffer would need 3x its size during the copy).

    ``seq_len`` counts the tokens stored so far; all layers advance together (the model calls
    ``update`` once per layer per forward, then ``advance`` once).
    """

    def __init__(self, num_layers: int, initial_capacity: int = 256):
        self.num_layers = num_layers
        self.initial_capacity = initial_capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.seq_len = 0
        # 2D padding mask [B, seq_len] of the stored tokens (1 = real token), kept by the model when
        # the batch is left-padded; None means no padding.
        self.key_padding: torch.Tensor | None = None

    def get_seq_length(self) -> int:
        return self.seq_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, T, H_kv, D] after the stored tokens; return views of all keys/values so far."""
        new_len = self.seq_len + k.shape[1]
        buf_k = self.keys[layer]
        if buf_k is None or buf_k.shape[1] < new_len:
            capacity = max(self.initial_capacity, new_len, 2 * (buf_k.shape[1] if buf_k is not None else 0))
            grown_k = k.new_empty(k.shape[0], capacity, *k.shape[2:])
            grown_v = v.new_empty(v.shape[0], capacity, *v.shape[2:])
            if buf_k is not None:
                grown_k[:, : self.seq_len] = buf_k[:, : self.seq_len]
                grown_v[:, : self.seq_len] = self.values[layer][:, : self.seq_len]
            self.keys[layer], self.values[layer] = grown_k, grown_v
        self.keys[layer][:, self.seq_len : new_len] = k
        self.values[layer][:, self.seq_len : new_len] = v
        return self.keys[layer][:, :new_len], self.values[layer][:, :new_len]

    def advance(self, num_tokens: int) -> None:
        self.seq_len += num_tokens

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Keep only / reorder batch rows (beam search, dropping finished sequences)."""
        for layer in range(self.num_layers):
            if self.keys[layer] is not None:
                self.keys[layer] = self.keys[layer][batch_index]
                self.values[layer] = self.values[layer][batch_index]
        if self.key_padding is not None:
            self.key_padding = self.key_padding[batch_index]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
