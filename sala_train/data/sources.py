"""Local data sources through Hugging Face ``datasets``: jsonl/json, parquet and text files, or a
``save_to_disk`` directory. Never the network.

    files = resolve_files(source)              the files a path or glob names, sorted
    kind = source_type(source, files)          json | parquet | text | saved
    fingerprint = source_fingerprint(source)   changes when a file or a reading option changes
    dataset = load_source(source, cache_dir)   a map-style datasets.Dataset
    dataset = load_source(source, streaming=True)   a datasets.IterableDataset, read lazily
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

from .config import SourceConfig

EXTENSION_TYPES = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
# What datasets.save_to_disk writes: a Dataset has state.json, a DatasetDict has dataset_dict.json.
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")


class DataSourceError(ValueError):
    """A data source that cannot be read: missing files, unknown type, missing field."""


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def is_saved_dataset(path) -> bool:
    path = Path(_expand(str(path)))
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def resolve_files(source: SourceConfig) -> list[Path]:
    """The files of a source, sorted (a save_to_disk directory resolves to itself)."""
    pattern = _expand(source.path)
    if source.type == "saved" or (source.type == "auto" and is_saved_dataset(pattern)):
        if not is_saved_dataset(pattern):
            raise DataSourceError(
                f"{source.describe()}: {pattern!r} is not a datasets.save_to_disk directory (expected a "
                f"folder holding {' or '.join(SAVED_DATASET_MARKERS)}). Save one with "
                "Dataset.save_to_disk(path)."
            )
        return [Path(pattern)]
    if os.path.isdir(pattern):
        raise DataSourceError(
            f"{source.describe()}: {pattern!r} is a directory but not a save_to_disk dataset; give a glob "
            f"for its files instead, e.g. {os.path.join(pattern, '*.jsonl')!r}."
        )
    files = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        what = "matches no file" if glob.has_magic(pattern) else "does not exist"
        raise DataSourceError(f"{source.describe()}: {pattern!r} {what}. Check data.sources[].path.")
    return files


def source_type(source: SourceConfig, files: list[Path]) -> str:
    """The datasets builder for a source: the configured type, or one read off the file extensions."""
    if source.type != "auto":
        return source.type
    if len(files) == 1 and files[0].is_dir():
        return "saved"
    kinds = {EXTENSION_TYPES.get(f.suffix.lower()) for f in files}
    if None in kinds:
        unknown = sorted({f.suffix or f.name for f in files if f.suffix.lower() not in EXTENSION_TYPES})
        raise DataSourceError(
            f"{source.describe()}: cannot tell the format of {', '.join(unknown)} files; set "
            f"type to json, parquet or text (known extensions: {', '.join(EXTENSION_TYPES)})."
        )
    if len(kinds) > 1:
        raise DataSourceError(
            f"{source.describe()}: the files mix formats ({', '.join(sorted(kinds))}); "
            "use one source per format."
        )
    return kinds.pop()


def source_fingerprint(source: SourceConfig) -> str:
    """A hash of what a source reads: every file's path, size and mtime, and the options that change the
    documents (type, fields, chat, text unit, split). The weight is left out: it does not change tokens."""
    files = resolve_files(source)
    listed = []
    for root in files:
        members = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in members:
            stat = f.stat()
            listed.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    options = {
        "type": source_type(source, files),
        "text_field": source.text_field,
        "chat": source.chat,
        "messages_field": source.messages_field,
        "text_unit": source.text_unit,
        "split": source.split,
    }
    blob = json.dumps({"files": listed, "options": options}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def load_source(source: SourceConfig, cache_dir: str | os.PathLike | None = None, streaming: bool = False):
    """The raw records of a source: a ``datasets.Dataset``, or a ``datasets.IterableDataset`` when streaming.

    ``cache_dir`` receives the arrow files datasets builds from json/parquet/text (map-style only), so
    nothing lands in the user's global Hugging Face cache.
    """
    import datasets

    files = resolve_files(source)
    kind = source_type(source, files)
    if kind == "saved":
        loaded = datasets.load_from_disk(str(files[0]))
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataSourceError(
                    f"{source.describe()}: the saved DatasetDict has no split {source.split!r}; it has "
                    f"{', '.join(loaded)}. Set split."
                )
            loaded = loaded[source.split]
        return loaded.to_iterable_dataset() if streaming else loaded

    options = {"sample_by": source.text_unit} if kind == "text" else {}
    if not streaming and cache_dir is not None:
        options["cache_dir"] = str(Path(_expand(str(cache_dir))) / "raw")
    try:
        return datasets.load_dataset(
            kind, data_files=[str(f) for f in files], split="train", streaming=streaming, **options
        )
    except Exception as error:  # datasets wraps parse errors in several types; name the source
        raise DataSourceError(
            f"{source.describe()}: datasets could not read it as {kind}: {error}"
        ) from error
