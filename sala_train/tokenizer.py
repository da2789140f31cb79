"""The small tokenizer that ships with sala-train, for tests and the CPU demo.

Real runs use the teacher's own tokenizer (MiniCPM-4); this one only has to be small, deterministic and
behave like it where the code depends on it: byte-level, so any text round-trips; `<s>` = 1 prepended to
every encoding; `</s>` = 2 as both end-of-sequence and padding; ChatML turns with `<|im_start|>` and
`<|im_end|>`.

    load_tokenizer()                   the shipped tokenizer (sala_train/assets/tokenizer/)
    load_tokenizer("path/to/model")    any local Hugging Face tokenizer directory, never the network
    train_tokenizer([...], out_dir)    train a new one the way the shipped one was trained
    build_sample_text(out_path)        rebuild the English sample it was trained on

Rebuild the shipped files (see sala_train/assets/README.md):

    python -m sala_train.tokenizer build-sample
    python -m sala_train.tokenizer train
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import sysconfig
import warnings
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
DEFAULT_SAMPLE_TEXT = ASSETS_DIR / "corpus" / "sample.txt"

# Order matters: the position in this list is the token id (MiniCPM uses bos 1, eos 2, pad 2).
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN = SPECIAL_TOKENS
PAD_TOKEN = EOS_TOKEN

# ChatML: one "<|im_start|>role\ncontent<|im_end|>\n" per message; add_generation_prompt opens the
# assistant turn. No bos in the template: tokenizer(text) already prepends <s>.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# What a directory must hold for AutoTokenizer to load it: one vocabulary file, and the config.
VOCABULARY_FILES = ["tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"]
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# -----------------------------------------------------------------------------
# loading


def load_tokenizer(path: str | os.PathLike | None = None):
    """Load a Hugging Face tokenizer from a local directory (None -> the shipped one). Never downloads."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(DEFAULT_TOKENIZER_DIR if path is None else path)
    expected = (
        f"one of {', '.join(VOCABULARY_FILES)} (vocab.json with merges.txt), "
        f"together with {TOKENIZER_CONFIG_FILE}"
    )
    if not tokenizer_dir.exists():
        raise FileNotFoundError(
            f"tokenizer directory {str(tokenizer_dir)!r} does not exist; expected a local directory "
            f"holding {expected}. Pass a path to a saved tokenizer, or None for the shipped one."
        )
    if not tokenizer_dir.is_dir():
        raise ValueError(
            f"tokenizer path {str(tokenizer_dir)!r} is a file, not a directory; expected a directory "
            f"holding {expected}."
        )
    found = sorted(p.name for p in tokenizer_dir.iterdir())
    has_vocabulary = any((tokenizer_dir / name).is_file() for name in VOCABULARY_FILES)
    has_config = (tokenizer_dir / TOKENIZER_CONFIG_FILE).is_file()
    if not (has_vocabulary and has_config):
        raise ValueError(
            f"tokenizer directory {str(tokenizer_dir)!r} holds no loadable tokenizer: expected {expected}; "
            f"found {found or 'nothing'}. Save one with tokenizer.save_pretrained(dir) or "
            f"`python -m sala_train.tokenizer train --out-dir DIR`."
        )
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


# -----------------------------------------------------------------------------
# training


def train_tokenizer(text_files, out_dir, vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE on text_files, save it to out_dir with save_pretrained, and return it.

    Special tokens come first with fixed ids: <unk> 0, <s> 1 (bos), </s> 2 (eos and pad),
    <|im_start|> 3, <|im_end|> 4. vocab_size counts them and the 256 byte tokens. The same files and
    arguments give the same tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(text_files, (str, os.PathLike)):
        text_files = [text_files]
    text_files = [Path(f) for f in text_files]
    if not text_files:
        raise ValueError("train_tokenizer needs at least one text file; got an empty list.")
    for text_file in text_files:
        if not text_file.is_file():
            raise FileNotFoundError(f"text file {str(text_file)!r} for train_tokenizer does not exist.")
    minimum_vocab_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum_vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs the {len(SPECIAL_TOKENS)} special "
            f"tokens and 256 byte tokens, so at least {minimum_vocab_size}."
        )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train([str(f) for f in text_files], trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,  # else decode() turns " ." into "." and text stops round-tripping
        model_max_length=1 << 20,
    )
    hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer


# -----------------------------------------------------------------------------
# the English sample the shipped tokenizer is trained on

# Folders of the standard library whose docstrings are test scaffolding, not prose.
SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
MIN_WORDS = 8
MIN_LETTER_FRACTION = 0.88  # letters and spaces; lower means identifiers, numbers or code


def default_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_prose(paragraph_lines: list[str]) -> bool:
    """True for a docstring paragraph that reads as English sentences."""
    if any(line[:1].isspace() for line in paragraph_lines):
        return False  # indented: a code example, an argument list or a table
    text = " ".join(paragraph_lines)
    words = text.split()
    if len(words) < MIN_WORDS:
        return False
    if not text.isascii():
        return False  # keeps out non-English text and symbol tables
    if "@" in text:
        return False  # e-mail addresses (and decorators)
    if ">>>" in text or "..." in text:
        return False  # doctests and elided code
    if text.isupper():
        return False  # all capitals: licence disclaimers
    if not (text[0].isupper() and text[-1] in ".?!"):
        return False  # a sentence starts with a capital and ends with a stop
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / len(text) >= MIN_LETTER_FRACTION


def stdlib_prose_paragraphs(stdlib_dir: Path) -> list[str]:
    """The prose paragraphs of every docstring in stdlib_dir, in file order, each once."""
    paragraphs, seen = [], set()
    for path in sorted(stdlib_dir.rglob("*.py")):
        relative = path.relative_to(stdlib_dir)
        if SKIPPED_FOLDERS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue  # a few files are templates or Python-2 era data
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node)  # dedented
            if not docstring:
                continue
            for block in re.split(r"\n[ \t]*\n", docstring):
                lines = [line.rstrip() for line in block.strip("\n").split("\n")]
                if not is_prose(lines):
                    continue
                paragraph = " ".join(" ".join(lines).split())  # one line, single spaces
                if paragraph not in seen:
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
    return paragraphs


def build_sample_text(out_path, max_bytes: int = 450_000, stdlib_dir=None) -> Path:
    """Write English prose from the Python standard library's docstrings (PSF licence) to out_path.

    One paragraph per line, paragraphs separated by a blank line, at most max_bytes bytes. When the
    standard library holds more than max_bytes of prose, evenly spaced paragraphs are kept so the
    sample spans all modules instead of only the first letters of the alphabet. Deterministic for a given
    standard library (the file shipped was built from CPython 3.11.7).
    """
    stdlib_dir = default_stdlib_dir() if stdlib_dir is None else Path(stdlib_dir)
    if not (stdlib_dir / "os.py").is_file():
        raise FileNotFoundError(
            f"{str(stdlib_dir)!r} is not a Python standard library folder (no os.py in it); pass the "
            f"folder that holds os.py, e.g. {str(default_stdlib_dir())!r}."
        )
    paragraphs = stdlib_prose_paragraphs(stdlib_dir)
    total_bytes = sum(len(p) + 2 for p in paragraphs)
    keep_fraction = min(1.0, max_bytes / total_bytes)
    kept, size = [], 0
    for i, paragraph in enumerate(paragraphs):
        if math.floor((i + 1) * keep_fraction) == math.floor(i * keep_fraction):
            continue  # evenly spaced: keeps about keep_fraction of the paragraphs, from every module
        if size + len(paragraph) + 2 > max_bytes:
            break
        kept.append(paragraph)
        size += len(paragraph) + 2
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n\n".join(kept) + "\n", encoding="utf-8")
    return out_path


# -----------------------------------------------------------------------------
# command line: rebuild the shipped assets


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sala_train.tokenizer", description="Rebuild the shipped sample text and tokenizer."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("build-sample", help="write English prose from stdlib docstrings")
    sample.add_argument("--out", default=str(DEFAULT_SAMPLE_TEXT), help="output text file")
    sample.add_argument("--max-bytes", type=int, default=450_000)
    sample.add_argument("--stdlib-dir", default=None, help="standard library folder (default: this Python's)")
    train = commands.add_parser("train", help="train the byte-level BPE tokenizer")
    train.add_argument("--text", nargs="+", default=[str(DEFAULT_SAMPLE_TEXT)], help="training text files")
    train.add_argument("--out-dir", default=str(DEFAULT_TOKENIZER_DIR))
    train.add_argument("--vocab-size", type=int, default=4096)
    train.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args(argv)

    if args.command == "build-sample":
        out_path = build_sample_text(args.out, max_bytes=args.max_bytes, stdlib_dir=args.stdlib_dir)
        print(f"wrote {out_path} ({out_path.stat().st_size} bytes)")
    else:
        tokenizer = train_tokenizer(args.text, args.out_dir, args.vocab_size, args.min_frequency)
        print(f"wrote {args.out_dir} (vocabulary of {len(tokenizer)} tokens)")


if __name__ == "__main__":
    main()
