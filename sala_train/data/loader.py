"""The data loader of one data-parallel rank: packed batches, sharded across ranks, exactly resumable.

    loader = PackedLoader(config, tokenizer, rank=r, world_size=w)
    batch = next(loader)          # input_ids, position_ids, labels: int64 [B, T] (+ cu_seqlens int32 [n + 1])
    state = loader.state_dict()   # plain Python (ints, lists, dicts): goes into the training checkpoint
    loader.load_state_dict(state) # the next batch is the one an uninterrupted run would have served

Pipeline (the same on every rank): sources -> tokenized documents -> per-source passes -> weighted mixture
-> packer -> the epoch's stream of packed sequences (see streams.py and packing.py for the rules).

Sharding. Step k of an epoch takes the next ``world_size * batch_size`` sequences of that stream and rank
r keeps sequences [r * B, (r + 1) * B) of them. Ranks never share a sequence, together they cover the
step, and the split depends only on the global stream, not on how the data is cut into files. The last,
incomplete step of an epoch (fewer than w * B sequences left) is dropped so that every rank takes the same
number of steps; the next epoch is reshuffled, so it is not always the same sequences. Running the
pipeline on every rank costs index work (map-style ranks only read the tokens of the sequences they keep)
or tokenization (streaming), both small next to a training step.

Resume. The state holds the epoch, the step within it and the pipeline's position: each source's pass and
position in it (map-style; the order itself is recomputed from the seed) or its count of raw records
read, the documents in its shuffle buffer and the buffer's generator state (streaming); the mixture's
token counts; the packer's open sequences and the sequences packed but not served yet. Map-style state
names documents by row, so it stays small; streaming state carries the buffered tokens (bounded by
shuffle_buffer documents per source plus pack_window sequences). Since the state is that of the global
stream, a run may resume with another world size or batch size: it continues where the stream stopped
(exactness, batch for batch, needs the same world size and batch size).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .config import DataConfig
from .packing import Document, Packer, Piece, collate, pack_sequence
from .streams import CachedDocuments, Mixture, StreamedDocuments
from .tokenize import TokenArrays, streamed_source, tokenization_key, tokenized_source

STATE_VERSION = 1
# Options that change the global stream of packed sequences; a state is only valid under the same ones.
STREAM_OPTIONS = (
    "seed",
    "seq_len",
    "shuffle",
    "streaming",
    "pack_window",
    "long_doc_threshold",
    "long_doc_repeat",
)
STREAMING_OPTIONS = ("shuffle_buffer",)  # matter only when streaming


class PackedLoader:
    """Infinite iterator (or ``max_epochs`` epochs) over packed batches for data-parallel rank ``rank``."""

    def __init__(self, config: DataConfig, tokenizer, rank: int = 0, world_size: int = 1):
        self.config = config.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the data-parallel world of size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad packed sequences with")
        self.tokenizer = tokenizer
        self.source_keys = [tokenization_key(source, tokenizer) for source in config.sources]
        self.datasets = None if config.streaming else self._tokenize_sources()
        self.lengths = None
        if self.datasets is not None:
            # the length column only: enough to plan every pass and every packed sequence
            self.lengths = [ds.lengths if isinstance(ds, TokenArrays) else
                            ds.data.column("length").to_numpy().astype(np.int64) for ds in self.datasets]
        self.epoch, self.step = 0, 0
        self._begin_epoch()

    # ------------------------------------------------------------------ pipeline

    def _tokenize_sources(self):
        import torch.distributed as dist

        # With several processes, global rank 0 tokenizes first and the others then read its cache files
        # (a shared cache_dir), instead of every rank tokenizing the same data at once.
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and dist.get_rank() != 0:
            dist.barrier()
        datasets = [
            TokenArrays(source, self.tokenizer) if source.type == "tokens" else
            tokenized_source(source, self.tokenizer, self.config.cache_dir, self.config.num_proc)
            for source in self.config.sources
        ]
        if distributed and dist.get_rank() == 0:
            dist.barrier()
        return datasets

    def _streams(self):
        config = self.config
        options = dict(
            seed=config.seed,
            epoch=self.epoch,
            shuffle=config.shuffle,
            long_doc_threshold=config.long_doc_threshold,
            long_doc_repeat=config.long_doc_repeat,
        )
        streams = []
        for i, source in enumerate(config.sources):
            if config.streaming:

                def open_stream(skip, source=source):
                    return streamed_source(source, self.tokenizer, skip)

                streams.append(
                    StreamedDocuments(i, source.path, open_stream, config.shuffle_buffer, **options)
                )
            else:
                streams.append(CachedDocuments(i, source.path, self.lengths[i], **options))
        return streams

    def _begin_epoch(self):
        self.mixture = Mixture(self._streams(), [source.weight for source in self.config.sources])
        self.packer = Packer(self.config.seq_len, self.config.pack_window)
        self.pending: deque[list[Piece]] = deque()  # packed, not served yet
        self.epoch_finished = False

    def _next_sequence(self) -> list[Piece] | None:
        """The next packed sequence of the epoch's global stream, or None at its end."""
        while not self.pending:
            if self.epoch_finished:
                return None
            document = self.mixture.next_document()
            if document is None:
                self.pending.extend(self.packer.flush())
                self.epoch_finished = True
            else:
                self.pending.extend(self.packer.add(document))
        return self.pending.popleft()

    def _read(self, document: Document):
        row = self.datasets[document.source][document.row]
        return row["input_ids"], row.get("loss_mask")

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """The next batch for this rank: input_ids, position_ids, labels int64 [B, T] (+ cu_seqlens)."""
        B = self.config.batch_size
        step_size = self.world_size * B
        while True:
            if self.config.max_epochs is not None and self.epoch >= self.config.max_epochs:
                raise StopIteration
            group = []
            while len(group) < step_size and (sequence := self._next_sequence()) is not None:
                group.append(sequence)
            if len(group) == step_size:
                break
            if self.step == 0:
                raise ValueError(
                    f"one epoch of the data packs into {len(group)} sequences of {self.config.seq_len} "
                    f"tokens, fewer than one step needs (world_size {self.world_size} x batch_size {B} = "
                    f"{step_size}); add data or lower data.batch_size / data.seq_len."
                )
            # End of the epoch: the incomplete step is dropped (module docstring), the next epoch begins.
            self.epoch, self.step = self.epoch + 1, 0
            self._begin_epoch()
        self.step += 1
        mine = group[self.rank * B : (self.rank + 1) * B]
        sequences = [pack_sequence(pieces, self.config.seq_len, self.pad_id, self._read) for pieces in mine]
        return collate(sequences, cu_seqlens=self.config.cu_seqlens)

    # ------------------------------------------------------------------ resume

    def _stream_options(self) -> tuple[str, ...]:
        return STREAM_OPTIONS + (STREAMING_OPTIONS if self.config.streaming else ())

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.world_size,
            "batch_size": self.config.batch_size,
            "options": {name: getattr(self.config, name) for name in self._stream_options()},
            "weights": [source.weight for source in self.config.sources],
            "sources": list(self.source_keys),
            "mixture": self.mixture.state_dict(),
            "open_sequences": [[encode_piece(p) for p in pieces] for pieces in self.packer.open],
            "pending": [[encode_piece(p) for p in pieces] for pieces in self.pending],
            "epoch_finished": self.epoch_finished,
        }

    def load_state_dict(self, state: dict):
        problems = []
        if state.get("version") != STATE_VERSION:
            problems.append(f"state version {state.get('version')} (this code reads {STATE_VERSION})")
        for name in self._stream_options():
            saved, current = state["options"].get(name), getattr(self.config, name)
            if saved != current:
                problems.append(f"data.{name}: saved {saved!r}, config {current!r}")
        if state["weights"] != [source.weight for source in self.config.sources]:
            problems.append(
                f"source weights: saved {state['weights']}, config {[s.weight for s in self.config.sources]}"
            )
        if state["sources"] != self.source_keys:
            problems.append(
                "the sources' files or the tokenizer changed (fingerprints differ: "
                f"saved {state['sources']}, now {self.source_keys})"
            )
        if problems:
            raise ValueError(
                "cannot resume the data loader: the saved position belongs to a different data stream:\n  - "
                + "\n  - ".join(problems)
                + "\nRestore the original data config and files, or start this stage's data from the "
                "beginning."
            )
        self.epoch, self.step = state["epoch"], state["step"]
        self._begin_epoch()
        self.mixture.load_state_dict(state["mixture"])
        self.packer.open = [[decode_piece(p) for p in pieces] for pieces in state["open_sequences"]]
        self.packer.free = [
            self.config.seq_len - sum(p.length for p in pieces) for pieces in self.packer.open
        ]
        self.pending = deque([decode_piece(p) for p in pieces] for pieces in state["pending"])
        self.epoch_finished = state["epoch_finished"]


def encode_piece(piece: Piece) -> dict:
    """A piece as plain Python: a row reference (map-style) or its own tokens (streaming)."""
    document = piece.document
    if document.tokens is None:
        return {
            "source": document.source,
            "row": document.row,
            "length": document.length,
            "start": piece.start,
            "end": piece.end,
        }
    loss_mask = document.loss_mask
    return {
        "source": document.source,
        "tokens": document.tokens[piece.start : piece.end].tolist(),
        "loss_mask": None if loss_mask is None else loss_mask[piece.start : piece.end].tolist(),
    }


def decode_piece(entry: dict) -> Piece:
    if "row" in entry:
        return Piece(
            Document(entry["source"], entry["length"], row=entry["row"]), entry["start"], entry["end"]
        )
    tokens = np.asarray(entry["tokens"], dtype=np.int32)
    loss_mask = None if entry["loss_mask"] is None else np.asarray(entry["loss_mask"], dtype=np.int8)
    return Piece(Document(entry["source"], len(tokens), tokens=tokens, loss_mask=loss_mask), 0, len(tokens))
