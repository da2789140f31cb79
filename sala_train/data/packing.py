"""Packing documents into fixed-length sequences with their boundaries kept (varlen training).

The rule:

- A document of at most ``seq_len`` tokens is never split: it lies whole inside one packed sequence.
- A longer document is cut into pieces of ``seq_len`` tokens (the last one shorter); each piece starts
  its positions again at 0 and is packed like a document of its own. Restarting keeps every position id
  below ``seq_len``, the range the stage trains (RoPE never sees positions the stage does not teach), and
  keeps each packed row self-contained for attention and for the linear-attention state. The cost is one
  lost target per cut (the first token of a piece predicts nothing from before it).
- Pieces go first-fit into a window of at most ``window`` open sequences: into the oldest open sequence
  with room, else into a new one. A sequence leaves the window as soon as it is exactly full, or, when
  more than ``window`` are open, the oldest leaves with its free tail padded. ``window = 1`` is plain
  greedy packing in order; a larger window wastes less padding at the cost of holding more documents.
  Memory stays bounded (at most ``window * seq_len`` tokens), so streaming uses the same packer.

A packed sequence of T = ``seq_len`` tokens becomes

    input_ids     [T]  the pieces back to back, then pad_id
    position_ids  [T]  0, 1, ... restarting at every piece; the padding counts as one more segment
    labels        [T]  input_ids, with -100 where loss_mask is 0 (SFT prompts) and on padding

which is what the models take (``labels`` is shifted inside the model; the last token of each segment
predicts nothing, so the loss never crosses a document boundary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100  # labels the loss skips (torch cross_entropy's ignore_index)


@dataclass
class Document:
    """One tokenized document of source ``source``, ``length`` tokens long.

    Map-style documents are references (``row`` in the source's tokenized dataset) whose tokens are read
    only when a rank materialises a sequence it keeps; streamed documents carry their tokens (int32
    [length]) and loss mask (int8 [length], None: train on every token).
    """

    source: int
    length: int
    row: int = -1
    tokens: np.ndarray | None = None
    loss_mask: np.ndarray | None = None


class Piece(NamedTuple):
    """Tokens [start, end) of a document."""

    document: Document
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def split_document(document: Document, seq_len: int) -> list[Piece]:
    """A document as pieces of at most seq_len tokens (one piece when it fits)."""
    return [
        Piece(document, start, min(start + seq_len, document.length))
        for start in range(0, document.length, seq_len)
    ]


class Packer:
    """First-fit packing over a window of open sequences (rule in the module docstring).

    ``add(document)`` and ``flush()`` return the sequences that are finished, each a list of pieces whose
    lengths sum to at most seq_len, in the order they leave the window.
    """

    def __init__(self, seq_len: int, window: int = 16):
        self.seq_len = seq_len
        self.window = window
        self.open: list[list[Piece]] = []  # oldest first
        self.free: list[int] = []  # free tokens of each open sequence

    def add(self, document: Document) -> list[list[Piece]]:
        finished = []
        for piece in split_document(document, self.seq_len):
            slot = next((i for i, free in enumerate(self.free) if free >= piece.length), None)
            if slot is None:
                self.open.append([])
                self.free.append(self.seq_len)
                slot = len(self.open) - 1
            self.open[slot].append(piece)
            self.free[slot] -= piece.length
            if self.free[slot] == 0:
                finished.append(self._close(slot))
            if len(self.open) > self.window:
                finished.append(self._close(0))
        return finished

    def flush(self) -> list[list[Piece]]:
        """Every open sequence, oldest first (end of an epoch)."""
        finished = self.open
        self.open, self.free = [], []
        return finished

    def _close(self, slot: int) -> list[Piece]:
        self.free.pop(slot)
        return self.open.pop(slot)


# Reads a map-style document's tokens: Document -> (input_ids [length], loss_mask [length] or None).
TokenReader = Callable[[Document], tuple[np.ndarray, np.ndarray | None]]


def document_tokens(document: Document, read: TokenReader | None = None):
    if document.tokens is not None:
        return document.tokens, document.loss_mask
    if read is None:
        raise ValueError(f"document {document.row} of source {document.source} is a reference; pass a reader")
    return read(document)


def pack_sequence(pieces: list[Piece], seq_len: int, pad_id: int, read: TokenReader | None = None) -> dict:
    """Pieces -> numpy arrays ``input_ids``, ``position_ids``, ``labels`` (int64 [seq_len]) and
    ``segment_lengths`` (int64 [n]: each piece, then the padding if any; sums to seq_len)."""
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(seq_len, dtype=np.int64)
    segment_lengths = []
    cursor = 0
    for piece in pieces:
        tokens, loss_mask = document_tokens(piece.document, read)
        n = piece.length
        span = slice(cursor, cursor + n)
        input_ids[span] = tokens[piece.start : piece.end]
        labels[span] = tokens[piece.start : piece.end]
        if loss_mask is not None:
            labels[span][loss_mask[piece.start : piece.end] == 0] = IGNORE_INDEX
        position_ids[span] = np.arange(n)
        segment_lengths.append(n)
        cursor += n
    if cursor > seq_len:
        raise ValueError(f"pieces hold {cursor} tokens, more than seq_len={seq_len}")
    if cursor < seq_len:
        # Padding restarts its positions too: it is a segment of its own, so no real token ever attends
        # to it or carries state into it, and its labels are all -100.
        position_ids[cursor:] = np.arange(seq_len - cursor)
        segment_lengths.append(seq_len - cursor)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "segment_lengths": np.asarray(segment_lengths, dtype=np.int64),
    }


def collate(sequences: list[dict], cu_seqlens: bool = False) -> dict[str, torch.Tensor]:
    """Packed sequences -> a batch: ``input_ids``, ``position_ids``, ``labels`` (int64 [B, T]); with
    ``cu_seqlens=True`` (B must be 1) also ``cu_seqlens`` (int32 [segments + 1], 0 ... T)."""
    batch = {
        key: torch.from_numpy(np.stack([sequence[key] for sequence in sequences]))
        for key in ("input_ids", "position_ids", "labels")
    }
    if cu_seqlens:
        if len(sequences) != 1:
            raise ValueError(
                f"cu_seqlens describes one packed row; got a batch of {len(sequences)} sequences"
            )
        lengths = torch.from_numpy(sequences[0]["segment_lengths"])
        batch["cu_seqlens"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return batch
