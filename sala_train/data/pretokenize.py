"""`sala-pretokenize`: tokenize a data source once into token arrays (a ``type: tokens`` source).

    sala-pretokenize --source '/data/long/*.jsonl' --tokenizer /ckpt/sala-8b --out /data/long-tokens.bin
    sala-pretokenize --source corpus.txt --type text --text-unit document --out corpus.bin   # our tokenizer

The documents go through the loader's own tokenization (``tokenized_source``: ``<s>`` ids ``</s>``, the same
cache), so a recipe that reads the arrays (``data.sources=[{path: /data/long-tokens.bin, type: tokens}]``) packs
exactly the batches it would have packed from the source itself, but reads them memory-mapped, without Hugging
Face ``datasets``, on machines that lack it or where tokenizing on every node would cost start-up time.
``<name>.bin`` holds the ids (uint16; ``<name>.u32.bin`` for tokenizers of more than 65536 ids) and
``<name>.idx`` the int64 document offsets; both are written to temporary files and renamed into place.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from .config import SourceConfig
from .sources import DataSourceError
from .tokenize import tokenized_source

log = logging.getLogger(__name__)

UINT16_IDS = 1 << 16


def index_path(out: Path) -> Path:
    """docs.bin -> docs.idx, docs.u32.bin -> docs.idx (the names TokenArrays reads)."""
    return out.with_name(out.name.removesuffix(".bin").removesuffix(".u32") + ".idx")


def write_token_arrays(source: SourceConfig, tokenizer, out: str | os.PathLike, *, cache_dir,
                       num_proc: int | None = None, batch_size: int = 1024, progress: bool = True) -> dict:
    """Tokenize ``source`` and write ``out`` (<name>.bin or <name>.u32.bin) with its <name>.idx; returns the
    counts (documents, tokens, bytes)."""
    out = Path(out)
    if source.chat:
        raise DataSourceError(f"{source.describe()}: chat sources train on assistant turns only, and token arrays "
                              "hold no loss mask; read chat data from its jsonl/parquet files")
    if source.type == "tokens":
        raise DataSourceError(f"{source.describe()}: already a tokens source")
    if not out.name.endswith(".bin"):
        raise ValueError(f"--out {out}: token arrays are named <name>.bin (or <name>.u32.bin)")
    wide = out.name.endswith(".u32.bin")
    if len(tokenizer) > UINT16_IDS and not wide:
        raise ValueError(f"--out {out}: the tokenizer has {len(tokenizer)} ids, more than uint16 holds; name the "
                         f"file {out.name.removesuffix('.bin')}.u32.bin")
    dtype = np.uint32 if wide else np.uint16
    documents = tokenized_source(source, tokenizer, cache_dir, num_proc=num_proc)
    out.parent.mkdir(parents=True, exist_ok=True)
    index = index_path(out)
    tmp_bin, tmp_idx = out.with_name(f".{out.name}.tmp"), index.with_name(f".{index.name}.tmp")
    offsets = [0]
    from tqdm import tqdm

    bar = tqdm(total=len(documents), desc=f"writing {out.name}", unit="doc", disable=not progress)
    try:
        with open(tmp_bin, "wb") as f:
            for start in range(0, len(documents), batch_size):
                rows = documents[start : start + batch_size]["input_ids"]
                for ids in rows:
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    offsets.append(offsets[-1] + len(ids))
                bar.update(len(rows))
            f.flush()
            os.fsync(f.fileno())
        np.asarray(offsets, dtype=np.int64).tofile(tmp_idx)
        os.replace(tmp_bin, out)
        os.replace(tmp_idx, index)
    finally:
        bar.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    counts = {"documents": len(documents), "tokens": offsets[-1], "bytes": offsets[-1] * np.dtype(dtype).itemsize}
    log.info("wrote %d documents, %d tokens to %s and %s", counts["documents"], counts["tokens"], out, index)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("--source", required=True, help="files (a path or glob) or a save_to_disk directory")
    parser.add_argument("--type", default="auto", help="auto | json | parquet | text | saved (as in the recipes)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--text-unit", default="paragraph", help="text files: line | paragraph | document")
    parser.add_argument("--split", default="train", help="saved datasets: the split")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer or checkpoint directory (default: ours)")
    parser.add_argument("--out", required=True, help="<name>.bin (or <name>.u32.bin); <name>.idx goes beside it")
    parser.add_argument("--cache-dir", default="~/.cache/sala_train/data")
    parser.add_argument("--num-proc", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ..tokenizer import load_tokenizer

    source = SourceConfig(path=args.source, type=args.type, text_field=args.text_field, text_unit=args.text_unit,
                          split=args.split)
    counts = write_token_arrays(source, load_tokenizer(args.tokenizer), args.out, cache_dir=args.cache_dir,
                                num_proc=args.num_proc)
    print(f"{args.out}: {counts['documents']} documents, {counts['tokens']} tokens")


if __name__ == "__main__":
    main()
