"""The loader end to end on small jsonl corpora: boundaries over a whole epoch, SFT labels, sharding,
exact resume (map-style and streaming), streaming == map-style, and its config checks."""

import itertools
import json
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from sala_train.data import IGNORE_INDEX, DataConfig, PackedLoader, SourceConfig, split_document
from sala_train.data.packing import Document

SEQ_LEN = 128


def make_config(tmp_path, sources, **overrides):
    options = dict(seq_len=SEQ_LEN, batch_size=2, seed=7, cache_dir=str(tmp_path / "cache"), pack_window=4)
    options.update(overrides)
    return DataConfig(sources=sources, **options)


def segments(batch, pad_id):
    """Every real segment of a batch as (tokens, labels) tuples, split where position_ids restart;
    checks on the way that padding is a final segment of pad tokens with labels -100."""
    found = []
    for ids, positions, labels in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
        starts = torch.nonzero(positions == 0).flatten().tolist() + [len(ids)]
        for k, (a, b) in enumerate(itertools.pairwise(starts)):
            assert positions[a:b].tolist() == list(range(b - a))  # positions count up within a segment
            tokens, target = ids[a:b].tolist(), labels[a:b].tolist()
            if set(tokens) == {pad_id} and set(target) == {IGNORE_INDEX}:
                assert k == len(starts) - 2, "padding must come last in a row"
                continue
            found.append((tuple(tokens), tuple(target)))
    return found


def expected_pieces(loader, source=0):
    """Every piece (tokens, labels) the epoch must contain for one source, from its tokenized rows."""
    pieces = Counter()
    dataset = loader.datasets[source]
    for row in range(len(dataset)):
        record = dataset[row]
        length = int(record["length"])
        if length == 0:
            continue
        tokens, mask = record["input_ids"], record.get("loss_mask")
        for piece in split_document(Document(source, length, tokens=tokens, loss_mask=mask), SEQ_LEN):
            ids = [int(t) for t in tokens[piece.start : piece.end]]
            labels = (
                ids
                if mask is None
                else [t if m else IGNORE_INDEX for t, m in zip(ids, mask[piece.start : piece.end])]
            )
            pieces[(tuple(ids), tuple(labels))] += 1
    return pieces


@pytest.mark.parametrize("kind", ["web", "chat"])
def test_an_epoch_holds_every_document_once_contiguous_with_restarting_positions(
    tmp_path, tokenizer, corpus, kind
):
    config = make_config(
        tmp_path, [SourceConfig(path=str(corpus[kind]), chat=kind == "chat")], batch_size=1, max_epochs=1
    )
    loader = PackedLoader(config, tokenizer)
    seen = Counter()
    for batch in loader:
        assert batch["input_ids"].shape == (1, SEQ_LEN)
        seen.update(segments(batch, tokenizer.pad_token_id))
    # nothing lost, nothing duplicated; each segment is one document (or one seq_len piece of a longer
    # one) in order, and its labels are -100 exactly where the SFT loss mask is 0
    assert seen == expected_pieces(loader)
    if kind == "web":
        assert any(len(tokens) == SEQ_LEN for tokens, _ in seen)  # long documents were cut into pieces


def test_ranks_split_each_step_disjointly_and_completely(tmp_path, tokenizer, corpus):
    sources = [
        SourceConfig(path=str(corpus["web"]), weight=3),
        SourceConfig(path=str(corpus["books"]), weight=1),
    ]
    world, per_rank, steps = 3, 2, 12
    reference = PackedLoader(make_config(tmp_path, sources, batch_size=world * per_rank), tokenizer)
    ranks = [
        PackedLoader(make_config(tmp_path, sources, batch_size=per_rank), tokenizer, rank=r, world_size=world)
        for r in range(world)
    ]
    for _ in range(steps):
        whole = next(reference)
        parts = [next(rank) for rank in ranks]
        for key in ("input_ids", "position_ids", "labels"):
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
        rows = {tuple(row.tolist()) for p in parts for row in p["input_ids"]}
        assert len(rows) == world * per_rank  # no two ranks hold the same sequence


def test_same_batches_across_runs_and_new_order_each_epoch(tmp_path, tokenizer, corpus):
    config = make_config(tmp_path, [SourceConfig(path=str(corpus["web"]))], max_epochs=2)
    first = list(PackedLoader(config, tokenizer))
    second = list(PackedLoader(config, tokenizer))
    assert len(first) == len(second) and all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second)
    )
    half = len(first) // 2
    assert not torch.equal(first[0]["input_ids"], first[half]["input_ids"])  # epoch 2 is reshuffled


def resume_config(tmp_path, corpus, streaming):
    sources = [
        SourceConfig(path=str(corpus["web"]), weight=2),
        SourceConfig(path=str(corpus["books"]), weight=1),
        SourceConfig(path=str(corpus["chat"]), weight=1, chat=True),
    ]
    return make_config(
        tmp_path,
        sources,
        batch_size=4,
        streaming=streaming,
        shuffle_buffer=16,
        long_doc_threshold=200,
        long_doc_repeat=2,
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "streaming"])
def test_resume_gives_exactly_the_batches_of_an_uninterrupted_run(tmp_path, tokenizer, corpus, streaming):
    config = resume_config(tmp_path, corpus, streaming)
    uninterrupted = PackedLoader(config, tokenizer, rank=1, world_size=2)
    run, epochs = [], []
    while len(epochs) < 15 or epochs[-15] == 0:  # into the second epoch, 15 steps beyond its start
        run.append(next(uninterrupted))
        epochs.append(uninterrupted.epoch)
    second_epoch = epochs.index(1)

    for stop in (9, second_epoch + 3):  # mid-epoch, and after the epoch boundary
        interrupted = PackedLoader(config, tokenizer, rank=1, world_size=2)
        for _ in range(stop):
            next(interrupted)
        state = json.loads(json.dumps(interrupted.state_dict()))  # survives a JSON (or torch.save) round trip
        resumed = PackedLoader(config, tokenizer, rank=1, world_size=2)
        resumed.load_state_dict(state)
        for expected in run[stop : stop + 10]:
            got = next(resumed)
            for key in expected:
                assert torch.equal(got[key], expected[key]), f"{key} differs after resuming at step {stop}"


def test_streaming_yields_the_same_packed_sequences_as_map_style(tmp_path, tokenizer, corpus):
    sources = [
        SourceConfig(path=str(corpus["web"]), weight=2),
        SourceConfig(path=str(corpus["chat"]), chat=True),
    ]
    options = dict(shuffle=False, max_epochs=1, long_doc_threshold=150, long_doc_repeat=3)
    mapped = list(PackedLoader(make_config(tmp_path, sources, **options), tokenizer))
    streamed = list(PackedLoader(make_config(tmp_path, sources, streaming=True, **options), tokenizer))
    assert len(mapped) == len(streamed) > 10
    for a, b in zip(mapped, streamed):
        for key in a:
            assert torch.equal(a[key], b[key])


def test_cu_seqlens_batches(tmp_path, tokenizer, corpus):
    config = make_config(tmp_path, [SourceConfig(path=str(corpus["web"]))], batch_size=1, cu_seqlens=True)
    batch = next(PackedLoader(config, tokenizer))
    cu = batch["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == SEQ_LEN and cu.dtype == torch.int32
    starts = torch.nonzero(batch["position_ids"][0] == 0).flatten()
    assert starts.tolist() == cu[:-1].tolist()


def test_resume_refuses_a_different_stream(tmp_path, tokenizer, corpus):
    loader = PackedLoader(make_config(tmp_path, [SourceConfig(path=str(corpus["web"]))]), tokenizer)
    next(loader)
    state = loader.state_dict()
    other = PackedLoader(
        make_config(tmp_path, [SourceConfig(path=str(corpus["web"]))], seq_len=256), tokenizer
    )
    with pytest.raises(
        ValueError, match=r"(?s)cannot resume the data loader.*data\.seq_len: saved 128, config 256"
    ):
        other.load_state_dict(state)


def test_too_little_data_for_one_step(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "A short document."}, {"text": "Another one."}])
    loader = PackedLoader(make_config(tmp_path, [SourceConfig(path=str(path))], batch_size=4), tokenizer)
    with pytest.raises(
        ValueError, match=r"packs into 1 sequences .* fewer than one step needs \(world_size 1 x batch_size 4"
    ):
        next(loader)


def test_config_is_an_omegaconf_structured_config_and_validates():
    schema = OmegaConf.structured(DataConfig)
    override = OmegaConf.create(
        {"seq_len": 512, "sources": [{"path": "a/*.jsonl", "weight": 0.3}, {"path": "b", "chat": True}]}
    )
    config = OmegaConf.to_object(OmegaConf.merge(schema, override))
    assert isinstance(config, DataConfig) and isinstance(config.sources[1], SourceConfig)
    assert config.sources[1].chat and config.validate() is config
    bad = DataConfig(
        sources=[SourceConfig(path="x", weight=0)], batch_size=2, cu_seqlens=True, long_doc_repeat=0
    )
    with pytest.raises(ValueError) as error:
        bad.validate()
    for key in (
        "data.sources[0].weight=0",
        "data.cu_seqlens=true needs data.batch_size=1",
        "data.long_doc_repeat=0",
    ):
        assert key in str(error.value)
