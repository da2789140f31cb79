"""Passes, long-document up-sampling and weighted mixtures on synthetic sources (no tokenizer needed)."""

from collections import Counter

import numpy as np
import pytest

from sala_train.data import CachedDocuments, DataSourceError, Mixture, StreamedDocuments

OPTIONS = dict(seed=3, epoch=0, shuffle=True)


def one_pass(stream):
    documents = [stream.next_document()]
    while not stream.pass_exhausted():
        documents.append(stream.next_document())
    return documents


def test_a_pass_is_a_permutation_of_the_non_empty_documents():
    lengths = np.array([5, 0, 7, 3, 0, 9, 1])
    stream = CachedDocuments(0, "toy", lengths, **OPTIONS)
    rows = [d.row for d in one_pass(stream)]
    assert sorted(rows) == [0, 2, 3, 5, 6]
    second = [d.row for d in one_pass(stream)]  # the next pass is reshuffled
    assert sorted(second) == sorted(rows) and stream.pass_index == 1
    again = CachedDocuments(0, "toy", lengths, **OPTIONS)
    assert [d.row for d in one_pass(again)] == rows  # deterministic given the seed


def test_long_documents_enter_each_pass_repeat_times():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=500)
    threshold, repeat = 150, 3
    stream = CachedDocuments(
        0, "toy", lengths, long_doc_threshold=threshold, long_doc_repeat=repeat, **OPTIONS
    )
    counts = Counter(d.row for d in one_pass(stream))
    for row, length in enumerate(lengths):
        assert counts[row] == (repeat if length >= threshold else 1)
    long_tokens = lengths[lengths >= threshold].sum()
    expected_share = repeat * long_tokens / (repeat * long_tokens + lengths[lengths < threshold].sum())
    got_share = sum(lengths[r] * c for r, c in counts.items() if lengths[r] >= threshold) / sum(
        lengths[r] * c for r, c in counts.items()
    )
    assert got_share == pytest.approx(expected_share, rel=1e-12)


def fake_stream(lengths):
    """open_stream(skip) for StreamedDocuments over rows with these lengths (tokens = row number)."""
    rows = [{"input_ids": [i] * int(n), "length": int(n)} for i, n in enumerate(lengths)]
    return lambda skip: iter(rows[skip:])


@pytest.mark.parametrize("shuffle", [False, True])
def test_streamed_pass_has_the_same_documents_and_copies_as_map_style(shuffle):
    lengths = np.array([4, 0, 30, 2, 25, 8, 0, 40, 1])
    options = dict(seed=1, epoch=2, shuffle=shuffle, long_doc_threshold=20, long_doc_repeat=2)
    cached = [d.row for d in one_pass(CachedDocuments(0, "toy", lengths, **options))]
    streamed = [
        int(d.tokens[0]) for d in one_pass(StreamedDocuments(0, "toy", fake_stream(lengths), 3, **options))
    ]
    assert Counter(streamed) == Counter(cached)
    if not shuffle:
        assert streamed == cached == [0, 2, 2, 3, 4, 4, 5, 7, 7, 8]


def test_streamed_documents_resume_mid_pass_with_their_buffer():
    lengths = np.arange(1, 60)
    stream = StreamedDocuments(0, "toy", fake_stream(lengths), shuffle_buffer=7, **OPTIONS)
    head = [int(stream.next_document().tokens[0]) for _ in range(20)]
    state = stream.state_dict()
    tail = [int(stream.next_document().tokens[0]) for _ in range(30)]
    resumed = StreamedDocuments(0, "toy", fake_stream(lengths), shuffle_buffer=7, **OPTIONS)
    resumed.load_state_dict(state)
    assert state["records_read"] < len(lengths)  # it skips what was read, keeps what is buffered
    assert [int(resumed.next_document().tokens[0]) for _ in range(30)] == tail
    assert len(set(head + tail)) == 50


def test_mixture_follows_token_weights_and_ends_the_epoch_after_every_source_finished_a_pass():
    # Tolerance: the deficit rule keeps each source within one document of its share at every draw,
    # so over the epoch |share - weight| <= max document length / total tokens (< 0.2% here).
    rng = np.random.default_rng(0)
    lengths = [
        rng.integers(1, 300, size=2000),
        rng.integers(50, 1000, size=300),
        rng.integers(1, 100, size=400),
    ]
    weights = [5.0, 3.0, 2.0]
    streams = [CachedDocuments(i, f"s{i}", lengths[i], **OPTIONS) for i in range(3)]
    mixture = Mixture(streams, weights)
    taken = np.zeros(3)
    while (document := mixture.next_document()) is not None:
        taken[document.source] += document.length
    shares = taken / taken.sum()
    tolerance = max(int(x.max()) for x in lengths) / taken.sum()
    np.testing.assert_allclose(shares, np.array(weights) / sum(weights), atol=tolerance)
    assert tolerance < 2e-3
    # the source with the most tokens per unit of weight sets the epoch: it is read exactly once
    tokens_per_weight = [x.sum() / w for x, w in zip(lengths, weights)]
    anchor = int(np.argmax(tokens_per_weight))
    assert streams[anchor].pass_index == 0 and streams[anchor].pass_exhausted()
    assert all(s.first_pass_done() for s in streams)
    others = [s.pass_index for i, s in enumerate(streams) if i != anchor]
    assert min(others) >= 1  # the smaller sources were repeated to keep their share


def test_a_source_without_documents_is_named():
    with pytest.raises(DataSourceError, match="'empty.jsonl' has no non-empty documents"):
        CachedDocuments(0, "empty.jsonl", np.array([0, 0]), **OPTIONS)
