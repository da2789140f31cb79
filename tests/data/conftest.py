"""Small corpora on disk for the data tests, made from the English sample the tokenizer ships with."""

import json

import pytest

from sala_train.tokenizer import DEFAULT_SAMPLE_TEXT, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def paragraphs():
    text = DEFAULT_SAMPLE_TEXT.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """write_jsonl(path, records) -> path, one JSON object a line."""
    return _write_jsonl


def text_documents(paragraphs, count, start=0, max_paragraphs=6):
    """`count` distinct documents of 1..max_paragraphs paragraphs: ~10 to a few hundred tokens each."""
    documents = []
    for i in range(count):
        n = 1 + (i * 7) % max_paragraphs
        first = (start + i * 3) % (len(paragraphs) - n)
        documents.append(f"[{start + i}] " + " ".join(paragraphs[first : first + n]))
    return documents


def conversations(paragraphs, count):
    chats = []
    for i in range(count):
        messages = []
        if i % 2 == 0:
            messages.append({"role": "system", "content": "You answer in one paragraph."})
        for turn in range(1 + i % 3):
            messages.append(
                {"role": "user", "content": f"Question {i}.{turn}: {paragraphs[(i + turn) % 50][:80]}"}
            )
            messages.append({"role": "assistant", "content": paragraphs[(7 * i + turn) % len(paragraphs)]})
        chats.append({"messages": messages})
    return chats


@pytest.fixture
def corpus(tmp_path, paragraphs):
    """Three jsonl sources: `web` (200 documents), `books` (60 longer ones), `chat` (40 conversations)."""
    return {
        "web": _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in text_documents(paragraphs, 200)]),
        "books": _write_jsonl(
            tmp_path / "books.jsonl",
            [{"text": t} for t in text_documents(paragraphs, 60, start=1000, max_paragraphs=14)],
        ),
        "chat": _write_jsonl(tmp_path / "chat.jsonl", conversations(paragraphs, 40)),
    }
