"""Text for HALO layer selection: a token stream to align the students on, and held-out documents for the sweep.

A document is a paragraph of a text file (paragraphs are separated by blank lines). Every ``heldout_every``-th
document is held out: the alignment never sees it, and the sweep's general task (LM loss on text) and the
needle-in-a-haystack task read it. Evenly spaced rather than "the last 5%", so that both halves span the whole
corpus (the shipped sample is ordered by standard-library module).

Everything is tokenized into memory, which is right for the small corpora of a CPU run or a study
(the shipped sample is about 100K tokens). HALO's 320M alignment tokens need a pre-tokenized dataset instead.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Corpus:
    train_tokens: torch.Tensor  # int64 [N]: the training documents, EOS after each
    heldout_documents: list[str]  # documents the alignment never sees
    heldout_tokens: torch.Tensor  # int64 [M]: the held-out documents, EOS after each
    fingerprint: str  # sha256 of the training tokens: a resumed alignment must see the same data

    def train_sequences(self, seq_len: int) -> torch.Tensor:
        """The training stream cut into consecutive sequences, int64 [num_sequences, seq_len] (a view; the
        tail that does not fill a sequence is dropped)."""
        n = self.train_tokens.numel() // seq_len
        if n == 0:
            raise ValueError(f"the alignment text has {self.train_tokens.numel()} tokens, fewer than one sequence "
                             f"of align.seq_len = {seq_len}; add text (data.text_files) or lower align.seq_len")
        return self.train_tokens[: n * seq_len].view(n, seq_len)


def read_documents(files: list[str | os.PathLike]) -> list[str]:
    """Paragraphs (blank-line separated, stripped, non-empty) of every file, in order."""
    documents = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} (data.text_files) does not exist")
        text = path.read_text(encoding="utf-8")
        documents += [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not documents:
        raise ValueError(f"no text in data.text_files = {[str(f) for f in files]}")
    return documents


def _tokens(tokenizer, documents: list[str]) -> torch.Tensor:
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.int64)


def load_corpus(files: list[str | os.PathLike], tokenizer, heldout_fraction: float = 0.05) -> Corpus:
    """Tokenize ``files`` and hold out about ``heldout_fraction`` of their documents (at least one)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
    documents = read_documents(files)
    if len(documents) < 2:
        raise ValueError(f"data.text_files hold {len(documents)} document(s); need at least 2 (one to align on, "
                         "one held out); separate paragraphs with blank lines")
    every = max(2, round(1.0 / heldout_fraction))
    held = [i % every == every - 1 for i in range(len(documents))]
    if not any(held):  # fewer documents than the stride: hold out the last one
        held[-1] = True
    train = [d for d, h in zip(documents, held) if not h]
    heldout = [d for d, h in zip(documents, held) if h]
    train_tokens = _tokens(tokenizer, train)
    fingerprint = hashlib.sha256(train_tokens.numpy().tobytes()).hexdigest()
    return Corpus(train_tokens, heldout, _tokens(tokenizer, heldout), fingerprint)
