"""The shipped tokenizer, train_tokenizer, load_tokenizer's errors, and the English sample behind them."""

import json
import platform
import random
import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from sala_train.tokenizer import (
    DEFAULT_SAMPLE_TEXT,
    DEFAULT_TOKENIZER_DIR,
    build_sample_text,
    load_tokenizer,
    main,
    train_tokenizer,
)

SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def small_text_file(tmp_path_factory):
    # 20 KB of the shipped sample: enough for a few hundred merges, trains in milliseconds
    text = DEFAULT_SAMPLE_TEXT.read_text(encoding="utf-8")[:20_000]
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(text, encoding="utf-8")
    return path


def assert_special_ids(tok):
    assert tok.convert_tokens_to_ids(list(SPECIAL_IDS)) == list(SPECIAL_IDS.values())
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "</s>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)


def random_text(seed, length=300):
    """Fresh text mixing ASCII, whitespace, digits, accented Latin, CJK, emoji and other planes."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0x30, 0x39), (0xC0, 0x17F), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F),
              (0x0400, 0x04FF), (0x10000, 0x1FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


# -----------------------------------------------------------------------------
# the shipped tokenizer


def test_shipped_tokenizer_loads_both_ways(tokenizer):
    direct = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR, local_files_only=True)
    text = "The history of the printing press, 1440 to 1500."
    assert tokenizer(text).input_ids == direct(text).input_ids
    assert DEFAULT_TOKENIZER_DIR.is_dir()
    total_bytes = sum(p.stat().st_size for p in DEFAULT_TOKENIZER_DIR.iterdir())
    assert total_bytes < 1_000_000, f"shipped tokenizer is {total_bytes} bytes; keep it under 1 MB"


def test_shipped_special_tokens_and_vocab_size(tokenizer):
    assert_special_ids(tokenizer)
    assert len(tokenizer) == 4096
    assert tokenizer.vocab_size == 4096
    assert tokenizer("hello").input_ids[0] == 1
    assert tokenizer("hello").input_ids.count(1) == 1
    # the chat markers are single tokens, never split into bytes
    assert tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids[0] == 3
    assert tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids[-1] == 4


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "Line one.\nLine two.\n\n\tIndented line\r\nwindows ending\n",
        "  leading and trailing spaces  ",
        "Digits 0123456789, 3.14159, -42, 1e-9, 2026-11-27.",
        "Ünïcödé: café, naïve, Straße, Привет мир, 日本語のテキスト, العربية, emoji 🙂🚀👩‍💻.",
        "Odd spacing: a , b . c ; 'quoted' \"double\" (paren) [bracket] {brace}",
        "",
    ],
)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_random_text(tokenizer, seed):
    text = random_text(seed)
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_tokenizer_compresses_english(tokenizer):
    # trained on English prose: a typical sentence takes well under one token per 2 characters
    text = "The function returns the number of bytes written to the file, or raises an error."
    assert len(tokenizer(text).input_ids) < len(text) / 3


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == expected.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"


def test_shipped_tokenizer_is_what_train_gives(tmp_path):
    """The committed tokenizer is what `python -m sala_train.tokenizer train` builds from sample.txt."""
    train_tokenizer([DEFAULT_SAMPLE_TEXT], tmp_path, vocab_size=4096)
    shipped = json.loads((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    rebuilt = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert rebuilt["model"]["vocab"] == shipped["model"]["vocab"]
    assert rebuilt["model"]["merges"] == shipped["model"]["merges"]
    assert rebuilt["added_tokens"] == shipped["added_tokens"]


# -----------------------------------------------------------------------------
# train_tokenizer


def test_train_tokenizer_loadable_and_deterministic(tmp_path, small_text_file):
    returned = train_tokenizer([small_text_file], tmp_path / "a", vocab_size=400)
    train_tokenizer(small_text_file, tmp_path / "b", vocab_size=400)  # a single path works too
    first = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert first == (tmp_path / "b" / "tokenizer.json").read_bytes()

    loaded = load_tokenizer(tmp_path / "a")
    assert_special_ids(loaded)
    assert len(loaded) == 400
    text = "A new sentence with numbers 12 and 345, ünïcödé and\nnew lines."
    assert loaded(text).input_ids == returned(text).input_ids
    assert loaded(text).input_ids[0] == 1
    assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_train_tokenizer_rejects_bad_arguments(tmp_path, small_text_file):
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small.*at least 261"):
        train_tokenizer([small_text_file], tmp_path / "out", vocab_size=100)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt.*does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "out")
    with pytest.raises(ValueError, match="at least one text file"):
        train_tokenizer([], tmp_path / "out")


def test_command_line_train(tmp_path, small_text_file, capsys):
    main(["train", "--text", str(small_text_file), "--out-dir", str(tmp_path), "--vocab-size", "300"])
    assert "vocabulary of 300 tokens" in capsys.readouterr().out
    assert len(load_tokenizer(tmp_path)) == 300


# -----------------------------------------------------------------------------
# load_tokenizer's errors


def test_load_tokenizer_missing_path(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match=r"no_such_tokenizer.*does not exist.*tokenizer\.json"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(str(missing))


def test_load_tokenizer_empty_directory(tmp_path):
    expected_files = r"no loadable tokenizer: expected one of tokenizer\.json, tokenizer\.model, vocab\.json"
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + expected_files):
        load_tokenizer(tmp_path)


def test_load_tokenizer_directory_without_config(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer_config\.json; found \['tokenizer\.json'\]"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_file_path(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match=r"is a file, not a directory"):
        load_tokenizer(path)


# -----------------------------------------------------------------------------
# the English sample


def test_sample_text_is_english_prose():
    raw = DEFAULT_SAMPLE_TEXT.read_bytes()
    assert 300_000 <= len(raw) <= 600_000, f"sample.txt is {len(raw)} bytes"
    text = raw.decode("utf-8")
    assert text.isascii()
    assert "@" not in text, "no e-mail addresses"
    assert ">>>" not in text, "no doctests"
    paragraphs = text.strip().split("\n\n")
    assert len(paragraphs) > 2000
    assert all(p[0].isupper() and p[-1] in ".?!" and "\n" not in p for p in paragraphs)
    words = Counter(re.findall(r"[a-z]+", text.lower()))
    total = sum(words.values())
    for common_word in ["the", "of", "is", "to", "and", "a", "if", "be"]:
        assert words[common_word] / total > 0.005, f"{common_word!r} is rare: not English prose?"


def test_build_sample_text_filters_to_prose(tmp_path):
    stdlib = tmp_path / "stdlib"
    (stdlib / "tests").mkdir(parents=True)
    (stdlib / "os.py").write_text('"""The os module gives a portable way to use system features."""')
    (stdlib / "tests" / "skipped.py").write_text('"""Test modules are skipped even when they are prose."""')
    (stdlib / "shapes.py").write_text(
        '"""Shapes and the areas that they cover on the plane.\n'
        "\n"
        "Write to guido" + "@" + "example.org for details about this module please.\n"
        "\n"
        ">>> area(square(2)) == 4 and the rest of this line\n"
        "\n"
        "Example:\n"
        "    x = square(2); y = circle(3); print(x, y, x + y, x * y)\n"
        '"""\n'
        "\n"
        "def area(shape):\n"
        '    """Return the area of a shape, in square units of its own coordinates."""\n'
        "\n"
        "def perimeter(shape):\n"
        '    """Return the area of a shape, in square units of its own coordinates."""\n'
    )
    out = build_sample_text(tmp_path / "out" / "sample.txt", stdlib_dir=stdlib)
    assert out.read_text(encoding="utf-8").split("\n\n") == [
        "The os module gives a portable way to use system features.",
        "Shapes and the areas that they cover on the plane.",
        "Return the area of a shape, in square units of its own coordinates.\n",
    ]
    build_sample_text(tmp_path / "small.txt", max_bytes=80, stdlib_dir=stdlib)
    assert len((tmp_path / "small.txt").read_bytes()) <= 80

    with pytest.raises(FileNotFoundError, match=r"not a Python standard library folder \(no os\.py"):
        build_sample_text(tmp_path / "x.txt", stdlib_dir=tmp_path / "out")


@pytest.mark.slow  # parses the whole standard library: about 5 s
@pytest.mark.skipif(
    platform.python_implementation() != "CPython" or platform.python_version() != "3.11.7",
    reason="sample.txt was built from the CPython 3.11.7 standard library; other versions differ",
)
def test_sample_text_is_what_build_sample_gives(tmp_path):
    rebuilt = build_sample_text(tmp_path / "sample.txt")
    assert rebuilt.read_bytes() == DEFAULT_SAMPLE_TEXT.read_bytes()
