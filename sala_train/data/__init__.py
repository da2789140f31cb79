"""Training data: local sources through Hugging Face ``datasets``, tokenization cached on disk, packing to
the stage length with document boundaries kept, weighted mixtures, long-document up-sampling, sharding
across data-parallel ranks, exact resume, and streaming for corpora larger than RAM.

    from sala_train.data import DataConfig, SourceConfig, PackedLoader

    config = DataConfig(sources=[SourceConfig(path="corpus/*.jsonl")], seq_len=4096, batch_size=2)
    loader = PackedLoader(config, tokenizer, rank=dp_rank, world_size=dp_world)
    batch = next(loader)   # input_ids, position_ids, labels: int64 [2, 4096]

Files: config.py (DataConfig), sources.py (reading files), tokenize.py (documents -> ids, cache, SFT loss
mask), packing.py (the packing rule, batches), streams.py (passes, shuffling, up-sampling, mixture),
loader.py (sharding, resume).
"""

from .config import DataConfig, SourceConfig
from .loader import PackedLoader
from .packing import IGNORE_INDEX, Document, Packer, Piece, collate, pack_sequence, split_document
from .sources import DataSourceError, load_source, resolve_files, source_fingerprint
from .streams import CachedDocuments, Mixture, StreamedDocuments
from .tokenize import (
    DocumentTokenizer,
    streamed_source,
    tokenization_key,
    tokenize_conversation,
    tokenized_source,
    tokenizer_fingerprint,
)

__all__ = [
    "IGNORE_INDEX",
    "CachedDocuments",
    "DataConfig",
    "DataSourceError",
    "Document",
    "DocumentTokenizer",
    "Mixture",
    "PackedLoader",
    "Packer",
    "Piece",
    "SourceConfig",
    "StreamedDocuments",
    "collate",
    "load_source",
    "pack_sequence",
    "resolve_files",
    "source_fingerprint",
    "split_document",
    "streamed_source",
    "tokenization_key",
    "tokenize_conversation",
    "tokenized_source",
    "tokenizer_fingerprint",
]
