"""`type: tokens` sources: documents tokenized beforehand (uint16 ids + int64 offsets), read without datasets,
give the same packed batches as the same documents read as text."""

import json

import numpy as np
import pytest

from sala_train.data import DataConfig, PackedLoader, SourceConfig
from sala_train.data.sources import DataSourceError
from sala_train.tokenizer import load_tokenizer


def write_arrays(tokenizer, documents, stem):
    ids = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in documents]  # <s> ids </s>
    np.concatenate([np.array(x, dtype=np.uint16) for x in ids]).tofile(f"{stem}.bin")
    np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64).tofile(f"{stem}.idx")


def test_token_arrays_pack_like_the_text(tmp_path):
    tokenizer = load_tokenizer()
    rng = np.random.default_rng(0)
    words = "the river runs to a sea of green light and every boat sails far".split()
    documents = [" ".join(rng.choice(words, size=int(rng.integers(3, 120)))) for _ in range(37)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    write_arrays(tokenizer, documents, tmp_path / "docs")

    def batches(source):
        config = DataConfig(sources=[source], seq_len=61, batch_size=3, seed=5, cache_dir=str(tmp_path / "cache"),
                            long_doc_threshold=50, long_doc_repeat=2)
        loader = PackedLoader(config, tokenizer)
        return [next(loader) for _ in range(12)]

    from_text = batches(SourceConfig(path=str(tmp_path / "docs.jsonl")))
    from_tokens = batches(SourceConfig(path=str(tmp_path / "docs.bin"), type="tokens"))
    for a, b in zip(from_text, from_tokens):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key


def test_token_arrays_refuse_foreign_or_broken_files(tmp_path):
    tokenizer = load_tokenizer()
    np.array([1, 5, 9000, 2], dtype=np.uint16).tofile(tmp_path / "big.bin")  # 9000 >= the 4096 ids
    np.array([0, 4], dtype=np.int64).tofile(tmp_path / "big.idx")
    config = DataConfig(sources=[SourceConfig(path=str(tmp_path / "big.bin"), type="tokens")], seq_len=8)
    with pytest.raises(DataSourceError, match="another tokenizer"):
        PackedLoader(config, tokenizer)
    np.array([1, 5, 6, 2], dtype=np.uint16).tofile(tmp_path / "cut.bin")
    np.array([0, 3], dtype=np.int64).tofile(tmp_path / "cut.idx")  # one token left out
    config = DataConfig(sources=[SourceConfig(path=str(tmp_path / "cut.bin"), type="tokens")], seq_len=8)
    with pytest.raises(DataSourceError, match="do not cover"):
        PackedLoader(config, tokenizer)
    with pytest.raises(ValueError, match="streaming"):
        DataConfig(sources=[SourceConfig(path="x.bin", type="tokens")], streaming=True).validate()


def test_pretokenize_writes_the_arrays_the_loader_packs_like_the_source(tmp_path):
    from sala_train.data.pretokenize import main, write_token_arrays

    tokenizer = load_tokenizer()
    rng = np.random.default_rng(1)
    words = "a quiet harbour keeps seven red boats under the long grey wall".split()
    paragraphs = [" ".join(rng.choice(words, size=int(rng.integers(1, 90)))) for _ in range(23)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs) + "\n")
    text = SourceConfig(path=str(tmp_path / "book.txt"), type="text", text_unit="paragraph")
    main(["--source", str(tmp_path / "book.txt"), "--type", "text", "--out", str(tmp_path / "book.bin"),
          "--cache-dir", str(tmp_path / "cache")])
    assert (tmp_path / "book.idx").is_file() and not list(tmp_path.glob(".*.tmp"))
    offsets = np.fromfile(tmp_path / "book.idx", dtype=np.int64)
    assert len(offsets) == 24 and offsets[-1] * 2 == (tmp_path / "book.bin").stat().st_size

    def batches(source):
        config = DataConfig(sources=[source], seq_len=53, batch_size=2, seed=3, cache_dir=str(tmp_path / "cache"))
        loader = PackedLoader(config, tokenizer)
        return [next(loader) for _ in range(10)]

    for a, b in zip(batches(text), batches(SourceConfig(path=str(tmp_path / "book.bin"), type="tokens"))):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key

    with pytest.raises(ValueError, match="<name>.bin"):
        write_token_arrays(text, tokenizer, tmp_path / "book.npy", cache_dir=tmp_path / "cache")
    with pytest.raises(DataSourceError, match="loss mask"):
        write_token_arrays(SourceConfig(path=str(tmp_path / "chat.jsonl"), chat=True), tokenizer,
                           tmp_path / "chat.bin", cache_dir=tmp_path / "cache")

    class Wide:  # a tokenizer of more ids than uint16 holds must write .u32.bin
        def __len__(self):
            return 70000

    with pytest.raises(ValueError, match="u32.bin"):
        write_token_arrays(text, Wide(), tmp_path / "wide.bin", cache_dir=tmp_path / "cache")
