"""The packing rule on synthetic documents: boundaries, positions, labels, padding, cu_seqlens."""

import numpy as np
import pytest
import torch

from sala_train.data import IGNORE_INDEX, Document, Packer, collate, pack_sequence, split_document
from sala_train.models.attention import cu_seqlens_from_position_ids

PAD = 2


def make_document(source, length, first_token, loss_mask=None):
    tokens = np.arange(first_token, first_token + length, dtype=np.int32)  # distinct across documents
    return Document(source, length, tokens=tokens, loss_mask=loss_mask)


def test_short_documents_are_never_split_and_long_ones_are_cut_at_seq_len():
    seq_len = 16
    long = make_document(0, 40, 0)
    assert [(p.start, p.end) for p in split_document(long, seq_len)] == [(0, 16), (16, 32), (32, 40)]
    packer = Packer(seq_len, window=4)
    sequences = []
    for i, length in enumerate([5, 12, 40, 9, 16, 3, 7, 1]):
        sequences += packer.add(make_document(0, length, 1000 * i))
    sequences += packer.flush()
    pieces = [p for s in sequences for p in s]
    for sequence in sequences:
        assert sum(p.length for p in sequence) <= seq_len
    # every document <= seq_len appears as one whole piece; the 40-token one as its three pieces
    by_document = {}
    for p in pieces:
        by_document.setdefault(id(p.document), []).append((p.start, p.end))
    assert sorted(len(v) for v in by_document.values()) == [1, 1, 1, 1, 1, 1, 1, 3]
    assert sum(p.length for p in pieces) == 5 + 12 + 40 + 9 + 16 + 3 + 7 + 1


def test_window_one_is_greedy_in_order():
    packer = Packer(10, window=1)
    out = []
    for i, length in enumerate([4, 4, 4, 6, 2]):
        out += packer.add(make_document(0, length, 100 * i))
    out += packer.flush()
    assert [[p.length for p in s] for s in out] == [[4, 4], [4, 6], [2]]


def test_first_fit_fills_older_sequences_first():
    packer = Packer(10, window=3)
    out = []
    for i, length in enumerate([7, 8, 9, 3, 2, 1]):
        out += packer.add(make_document(0, length, 100 * i))
    # 7 | 8 | 9 open; 3 completes the first (7 + 3), 2 the second, 1 the third
    out += packer.flush()
    assert [[p.length for p in s] for s in out] == [[7, 3], [8, 2], [9, 1]]


def test_pack_sequence_positions_labels_and_padding():
    seq_len = 12
    a = make_document(0, 4, 10)
    b = make_document(
        1, 5, 20, loss_mask=np.array([0, 0, 1, 1, 1], dtype=np.int8)
    )  # SFT: prompt, then answer
    packed = pack_sequence([split_document(a, seq_len)[0], split_document(b, seq_len)[0]], seq_len, PAD)
    np.testing.assert_array_equal(packed["input_ids"], [10, 11, 12, 13, 20, 21, 22, 23, 24, PAD, PAD, PAD])
    np.testing.assert_array_equal(packed["position_ids"], [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2])
    x = IGNORE_INDEX
    np.testing.assert_array_equal(packed["labels"], [10, 11, 12, 13, x, x, 22, 23, 24, x, x, x])
    np.testing.assert_array_equal(packed["segment_lengths"], [4, 5, 3])


def test_pieces_of_a_long_document_restart_positions():
    seq_len = 8
    document = make_document(0, 19, 0)
    rows = [pack_sequence([piece], seq_len, PAD) for piece in split_document(document, seq_len)]
    np.testing.assert_array_equal(
        np.concatenate([r["input_ids"][: r["segment_lengths"][0]] for r in rows]), np.arange(19)
    )
    np.testing.assert_array_equal(rows[2]["position_ids"], [0, 1, 2, 0, 1, 2, 3, 4])


def test_collate_shapes_and_cu_seqlens_agree_with_the_model():
    seq_len = 16
    packer = Packer(seq_len, window=2)
    sequences = []
    for i, length in enumerate([3, 6, 16, 5, 9]):
        sequences += packer.add(make_document(0, length, 100 * i))
    sequences += packer.flush()
    rows = [pack_sequence(s, seq_len, PAD) for s in sequences]
    batch = collate(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].shape == (len(rows), seq_len) and batch["input_ids"].dtype == torch.int64
    for row in rows:
        single = collate([row], cu_seqlens=True)
        expected = cu_seqlens_from_position_ids(single["position_ids"])
        if expected is None:  # one segment filling the row
            expected = torch.tensor([0, seq_len])
        assert single["cu_seqlens"].dtype == torch.int32
        assert single["cu_seqlens"].tolist() == expected.tolist()
    with pytest.raises(ValueError, match="one packed row"):
        collate(rows[:2], cu_seqlens=True)
