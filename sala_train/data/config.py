"""The data group of the recipes: where documents come from, how they are mixed, packed and sharded.

Plain dataclasses with the types OmegaConf structured configs accept (int, float, str, bool, Optional,
List of nested dataclasses), so the trainer can embed ``DataConfig`` in its Hydra schema as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

# `type` of a source; "auto" picks one from the file extensions (or a save_to_disk directory).
# "tokens": documents already tokenized, as token ids back to back in <name>.bin (uint16, or uint32 for vocabularies
# over 65535 when the file name ends in .u32.bin) with int64 document offsets in <name>.idx; read without
# Hugging Face datasets (see sala_train.data.tokenize.TokenArrays).
SOURCE_TYPES = ("auto", "json", "parquet", "text", "saved", "tokens")
# How a plain-text file splits into documents (Hugging Face's text builder, `sample_by`).
TEXT_UNITS = ("line", "paragraph", "document")


@dataclass
class SourceConfig:
    """One data source: local files (a path or glob, `~` allowed) or a ``datasets.save_to_disk`` directory.

    Text sources read ``text_field`` of each record. Chat sources (``chat: true``) read ``messages_field``,
    a list of ``{role, content}``, render it with the tokenizer's chat template and train only on the
    assistant turns.
    """

    path: str = ""
    type: str = "auto"  # auto | json (also .jsonl) | parquet | text | saved (a save_to_disk directory) | tokens
    weight: float = 1.0  # share of the mixture's tokens; weights are normalised over the sources
    text_field: str = "text"
    chat: bool = False
    messages_field: str = "messages"
    text_unit: str = "paragraph"  # text files only: one document per line | paragraph | whole file
    split: str = "train"  # saved datasets only: the split of a DatasetDict directory

    def describe(self) -> str:
        return f"data source {self.path!r}"


@dataclass
class DataConfig:
    """Sources, their mixture, and the packed batches one data-parallel rank sees.

    Every rank builds the same global stream of packed sequences and keeps a disjoint slice of each step
    (see ``sala_train.data.loader``); ``batch_size`` counts packed sequences of ``seq_len`` tokens per rank
    per micro-batch.
    """

    sources: List[SourceConfig] = field(default_factory=list)
    seq_len: int = 4096
    batch_size: int = 1
    seed: int = 0
    shuffle: bool = True  # map-style: a fresh permutation per pass; streaming: a shuffle buffer
    cache_dir: str = "~/.cache/sala_train/data"  # tokenized sources (and datasets' own arrow files)
    streaming: bool = False  # read sources lazily (corpora larger than RAM or disk cache)
    shuffle_buffer: int = 10_000  # streaming only: documents held for shuffling, per source
    pack_window: int = 16  # packed sequences kept open for first-fit packing (1 = greedy, in order)
    # Long-context stages: documents of at least long_doc_threshold tokens appear long_doc_repeat times
    # per pass over their source (0 = off).
    long_doc_threshold: int = 0
    long_doc_repeat: int = 1
    max_epochs: Optional[int] = None  # None: the loader cycles forever (the trainer stops by token budget)
    cu_seqlens: bool = False  # also return cu_seqlens (needs batch_size 1)
    num_proc: Optional[int] = None  # processes for tokenizing map-style sources

    def validate(self) -> "DataConfig":
        """Raise a ValueError naming the key for anything the loader cannot do; returns self."""
        problems = []
        if not self.sources:
            problems.append("data.sources is empty: give at least one source with a path")
        for i, source in enumerate(self.sources):
            key = f"data.sources[{i}]"
            if not source.path:
                problems.append(f"{key}.path is empty: give a file, a glob or a save_to_disk directory")
            if source.type not in SOURCE_TYPES:
                problems.append(f"{key}.type={source.type!r} is not one of {', '.join(SOURCE_TYPES)}")
            if not source.weight > 0:
                problems.append(f"{key}.weight={source.weight} must be > 0 (drop the source to leave it out)")
            if source.text_unit not in TEXT_UNITS:
                problems.append(f"{key}.text_unit={source.text_unit!r} is not one of {', '.join(TEXT_UNITS)}")
        if self.seq_len < 2:
            problems.append(f"data.seq_len={self.seq_len} must be at least 2 (one input and one target)")
        if self.batch_size < 1:
            problems.append(f"data.batch_size={self.batch_size} must be at least 1")
        if self.pack_window < 1:
            problems.append(f"data.pack_window={self.pack_window} must be at least 1")
        if self.shuffle_buffer < 1:
            problems.append(f"data.shuffle_buffer={self.shuffle_buffer} must be at least 1")
        if self.long_doc_threshold < 0:
            problems.append(
                f"data.long_doc_threshold={self.long_doc_threshold} must be >= 0 (0 turns it off)"
            )
        if self.long_doc_repeat < 1:
            problems.append(
                f"data.long_doc_repeat={self.long_doc_repeat} must be at least 1 (1 = no up-sampling)"
            )
        if self.max_epochs is not None and self.max_epochs < 1:
            problems.append(f"data.max_epochs={self.max_epochs} must be at least 1, or null to cycle forever")
        if self.streaming and any(source.type == "tokens" for source in self.sources):
            problems.append("data.streaming=true cannot read token-array sources (type: tokens); they are "
                            "memory-mapped already: set streaming false")
        if self.cu_seqlens and self.batch_size != 1:
            problems.append(
                f"data.cu_seqlens=true needs data.batch_size=1 (cu_seqlens packs one row), got "
                f"{self.batch_size}; with larger batches the model finds document starts from position_ids"
            )
        if problems:
            raise ValueError("invalid data config:\n  - " + "\n  - ".join(problems))
        return self
