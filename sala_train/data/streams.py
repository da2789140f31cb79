"""Documents of each source, pass after pass, and their weighted mixture.

Order within a source. Pass p of source i in epoch e is shuffled by a generator seeded with
(seed, e, i, p), so it depends on nothing else (not on the rank, not on what other sources did):

- map-style (``CachedDocuments``): a permutation of the source's non-empty rows;
- streaming (``StreamedDocuments``): the file order through a shuffle buffer of ``shuffle_buffer``
  documents (a global permutation would need the whole corpus); with ``shuffle=False`` both paths give
  the file order, which makes them yield identical packed sequences.

Long-document up-sampling. With ``long_doc_threshold = L > 0`` and ``long_doc_repeat = k``, every
document of at least L tokens (eos included) enters each pass k times instead of once: its copies are
separate entries of the pass, so shuffling places them apart. The rule is exact (not sampled), so the
token share of long documents is known in advance: k * long_tokens / (k * long_tokens + short_tokens).

Mixture (``Mixture``). Weights are token shares, normalised. The next document always comes from the
source furthest below its share, i.e. the one with the smallest tokens_taken / weight (ties: lowest
index). This is deterministic and keeps every source within one document of its share at all times.
An epoch ends once every source has finished at least one pass; sources that finish early start their
next (reshuffled) pass. So a small source with a large weight is repeated within an epoch, and the
source with the most tokens per unit of weight sets the epoch's length. With one source an epoch is
exactly one pass.
"""

from __future__ import annotations

import numpy as np

from .packing import Document
from .sources import DataSourceError


class DocumentStream:
    """Documents of source ``index``, pass after pass (subclasses say where they come from)."""

    def __init__(
        self,
        index: int,
        name: str,
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        long_doc_threshold: int = 0,
        long_doc_repeat: int = 1,
    ):
        self.index, self.name = index, name
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.long_doc_threshold, self.long_doc_repeat = long_doc_threshold, long_doc_repeat
        self.pass_index = 0

    def pass_rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.index, self.pass_index])

    def copies(self, length: int) -> int:
        """How many times a document of this length enters a pass (long-document up-sampling)."""
        long = self.long_doc_threshold > 0 and length >= self.long_doc_threshold
        return self.long_doc_repeat if long else 1

    def first_pass_done(self) -> bool:
        return self.pass_index > 0 or self.pass_exhausted()

    def next_document(self) -> Document:
        if self.pass_exhausted():
            self.pass_index += 1
            self.start_pass()
            if self.pass_exhausted():
                raise DataSourceError(f"data source {self.name!r} has no non-empty documents")
        return self.take()

    # subclasses: start_pass(), pass_exhausted(), take(), state_dict(), load_state_dict()


class CachedDocuments(DocumentStream):
    """Documents of a tokenized map-style source, as references (source, row, length)."""

    def __init__(self, index: int, name: str, lengths: np.ndarray, **options):
        super().__init__(index, name, **options)
        self.lengths = lengths
        self.rows = np.flatnonzero(lengths > 0)  # empty documents are skipped
        if len(self.rows) == 0:
            raise DataSourceError(f"data source {name!r} has no non-empty documents ({len(lengths)} records)")
        self.start_pass()

    def start_pass(self):
        rows = self.rows
        if self.long_doc_threshold > 0 and self.long_doc_repeat > 1:
            counts = np.where(self.lengths[rows] >= self.long_doc_threshold, self.long_doc_repeat, 1)
            rows = np.repeat(rows, counts)  # copies side by side, as a stream without shuffling has them
        self.order = self.pass_rng().permutation(rows) if self.shuffle else rows
        self.position = 0

    def pass_exhausted(self) -> bool:
        return self.position >= len(self.order)

    def take(self) -> Document:
        row = int(self.order[self.position])
        self.position += 1
        return Document(self.index, int(self.lengths[row]), row=row)

    def state_dict(self) -> dict:
        return {"pass": self.pass_index, "position": self.position}

    def load_state_dict(self, state: dict):
        self.pass_index = state["pass"]
        self.start_pass()  # the order is a function of (seed, epoch, source, pass): recomputed, not stored
        self.position = state["position"]


class StreamedDocuments(DocumentStream):
    """Documents of a streamed source, tokenized on the fly, through a seeded shuffle buffer.

    ``open_stream(skip)`` returns an iterable of tokenized rows starting at raw record ``skip``. The state
    is the count of raw records read in this pass, the documents waiting in the buffer (with their
    tokens) and the buffer's generator state, so a resumed stream skips the records already read instead
    of tokenizing them again.
    """

    def __init__(self, index: int, name: str, open_stream, shuffle_buffer: int = 10_000, **options):
        super().__init__(index, name, **options)
        self.open_stream = open_stream
        self.buffer_size = shuffle_buffer if self.shuffle else 1
        self.start_pass()

    def start_pass(self):
        self.records_read = 0
        self.buffer: list[Document] = []
        self.rng = self.pass_rng()
        self.iterator = None
        self.source_done = False

    def _read_record(self):
        if self.iterator is None:
            self.iterator = iter(self.open_stream(self.records_read))
        try:
            row = next(self.iterator)
        except StopIteration:
            self.source_done = True
            return
        self.records_read += 1
        length = int(row["length"])
        if length == 0:
            return
        tokens = np.asarray(row["input_ids"], dtype=np.int32)
        loss_mask = np.asarray(row["loss_mask"], dtype=np.int8) if row.get("loss_mask") is not None else None
        for _ in range(self.copies(length)):
            self.buffer.append(Document(self.index, length, tokens=tokens, loss_mask=loss_mask))

    def _fill(self, size: int):
        while len(self.buffer) < size and not self.source_done:
            self._read_record()

    def pass_exhausted(self) -> bool:
        self._fill(1)
        return not self.buffer

    def take(self) -> Document:
        self._fill(self.buffer_size)
        if not self.shuffle:
            return self.buffer.pop(0)
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def state_dict(self) -> dict:
        buffer = [
            {"tokens": d.tokens.tolist(), "loss_mask": None if d.loss_mask is None else d.loss_mask.tolist()}
            for d in self.buffer
        ]
        return {
            "pass": self.pass_index,
            "records_read": self.records_read,
            "source_done": self.source_done,
            "buffer": buffer,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict):
        self.pass_index = state["pass"]
        self.start_pass()
        self.records_read = state["records_read"]
        self.source_done = state["source_done"]
        self.buffer = [
            Document(
                self.index,
                len(d["tokens"]),
                tokens=np.asarray(d["tokens"], dtype=np.int32),
                loss_mask=None if d["loss_mask"] is None else np.asarray(d["loss_mask"], dtype=np.int8),
            )
            for d in state["buffer"]
        ]
        self.rng.bit_generator.state = state["rng"]


class Mixture:
    """Weighted mixture of document streams by tokens (rule in the module docstring)."""

    def __init__(self, streams: list[DocumentStream], weights: list[float]):
        total = float(sum(weights))
        self.streams = streams
        self.weights = [w / total for w in weights]
        self.tokens_taken = [0] * len(streams)

    def next_document(self) -> Document | None:
        """The next document of the epoch, or None once every source has finished a pass."""
        if all(stream.first_pass_done() for stream in self.streams):
            return None
        i = min(range(len(self.streams)), key=lambda i: (self.tokens_taken[i] / self.weights[i], i))
        document = self.streams[i].next_document()
        self.tokens_taken[i] += document.length
        return document

    def state_dict(self) -> dict:
        return {"tokens_taken": list(self.tokens_taken), "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict):
        self.tokens_taken = list(state["tokens_taken"])
        for stream, stream_state in zip(self.streams, state["streams"]):
            stream.load_state_dict(stream_state)
