"""The corpus of the conversion quality study: English documentation from Debian packages, as token arrays.

    apt-get install linux-doc python3-doc         # the sources (installed by the user, not by this script)
    python benchmarks/quality/prepare_corpus.py   # -> benchmarks/quality/data/ (git-ignored, see docs/quality.md)

Steps (deterministic: the same packages give the same bytes):
  1. read every HTML page of the Linux kernel documentation (/usr/share/doc/linux-doc/html) and of the Python
     documentation (/usr/share/doc/python3.X/html), keep the article body, drop code blocks, tables, scripts,
     navigation and index pages (html.parser from the standard library: a real parser, no regular expressions
     over markup);
  2. clean: whitespace collapsed, paragraphs of fewer than 6 words or mostly non-letters dropped, paragraphs
     found in more than 3 documents dropped (boilerplate), exact duplicate documents dropped;
  3. split by document: a page is held out when sha256(its path) puts it in the first ``--heldout-percent``;
  4. train a byte-level BPE (sala_train.tokenizer.train_tokenizer, HF tokenizers) on the train split only;
  5. tokenize: each document as the training loader sees it (<s> ids </s>), concatenated, stored as uint16.

Output (``--out``):
  tokenizer/                 the BPE (HF files), trained on the train split
  train.bin, heldout.bin     uint16 token ids, documents back to back
  train.idx, heldout.idx     int64 [documents + 1] offsets of the documents into the .bin
  meta.json                  sources (package, version, license file), sizes, token counts, sha256 of the arrays

The trainer reads the arrays directly (a data source of ``type: tokens``, no Hugging Face datasets); text is not
stored: byte-level BPE decodes exactly, and `study.py text` decodes what needs text (HALO's alignment text, the
evaluation's haystacks). So about 2 bytes per token travel to a GPU machine.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html.parser
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

INSTALL_HINT = "apt-get install linux-doc python3-doc"
SKIPPED_TAGS = {"script", "style", "pre", "table", "nav", "header", "footer", "head", "svg", "math", "form"}
SKIPPED_CLASSES = {"highlight", "sphinxsidebar", "related", "footer", "headerlink", "toctree-wrapper", "rst-versions",
                   "wy-nav-side", "breadcrumbs", "contents", "topic", "admonition-title"}
BLOCK_TAGS = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "div", "section", "blockquote", "br", "tr",
              "ul", "ol", "dl", "article", "caption"}
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}
SKIPPED_PAGES = re.compile(r"(^|/)(genindex|py-modindex|search|searchindex|objects|index|contents|copyright|license|"
                           r"bugs|about|download)[^/]*\.html$|(^|/)_[a-z]+/")
MIN_WORDS = 6
MIN_LETTER_FRACTION = 0.85
MAX_DOCUMENTS_PER_PARAGRAPH = 3


class ArticleText(html.parser.HTMLParser):
    """Paragraphs of a Sphinx page's article body (role="main" or itemprop="articleBody"; the whole <body>
    when neither exists), without code blocks, tables, navigation and permalink marks."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, opens the article, opens a skipped region)
        self.in_article = 0
        self.skipping = 0
        self.has_article = False
        self.article: list[str] = []  # text pieces of the article body, "\n\n" at block boundaries
        self.body: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in VOID_TAGS:
            if tag == "br":
                self._text("\n\n")
            return
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        opens_article = attrs.get("role") == "main" or attrs.get("itemprop") == "articleBody"
        skip = tag in SKIPPED_TAGS or bool(classes & SKIPPED_CLASSES)
        self.stack.append((tag, opens_article, skip))
        self.in_article += opens_article
        self.has_article |= opens_article
        self.skipping += skip
        if tag in BLOCK_TAGS:
            self._text("\n\n")

    def handle_endtag(self, tag):
        if tag in VOID_TAGS or not any(t == tag for t, _, _ in self.stack):
            return  # a stray end tag: ignore rather than unwind the stack
        while self.stack:
            open_tag, opened_article, skipped = self.stack.pop()
            self.in_article -= opened_article
            self.skipping -= skipped
            if open_tag == tag:
                break
        if tag in BLOCK_TAGS:
            self._text("\n\n")

    def handle_data(self, data):
        if not self.skipping:
            self._text(data)

    def _text(self, text):
        if self.skipping:
            return
        self.body.append(text)
        if self.in_article:
            self.article.append(text)

    def paragraphs(self) -> list[str]:
        text = "".join(self.article if self.has_article else self.body).replace("\u00b6", "")
        return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < MIN_WORDS:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters / len(paragraph) >= MIN_LETTER_FRACTION and paragraph.isascii()


def page_paragraphs(path: Path) -> list[str]:
    parser = ArticleText()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return [p for p in parser.paragraphs() if is_prose(p)]


def package_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None


def find_sources(linux_doc: str | None, python_doc: str | None) -> list[dict]:
    """The HTML trees to read, with their package and license file; a clear error if one is missing."""
    python_doc = python_doc or next(iter(sorted(glob.glob("/usr/share/doc/python3.*/html"), reverse=True)), None)
    linux_doc = linux_doc or "/usr/share/doc/linux-doc/html"
    sources, missing = [], []
    for name, root, package, license_file in (
            ("linux-doc", linux_doc, "linux-doc", "/usr/share/doc/linux-doc/copyright"),
            ("python-doc", python_doc, "python3-doc", None)):
        if root is None or not Path(root).is_dir() or not any(Path(root).rglob("*.html")):
            missing.append(f"{name}: no HTML pages under {root or '/usr/share/doc/python3.*/html'}")
            continue
        if license_file is None:  # python3.X-doc ships its copyright beside the html folder
            license_file = str(Path(root).parent / "copyright")
            if not Path(license_file).exists():
                license_file = str(Path(root) / "license.html")
        sources.append({"name": name, "root": str(root), "package": package,
                        "version": package_version(package),
                        "license_file": license_file if Path(license_file).exists() else None,
                        "license": "GPL-2.0 (Linux kernel documentation)" if name == "linux-doc"
                        else "PSF-2.0 (Python documentation)"})
    if missing:
        raise SystemExit("prepare_corpus: the Debian documentation packages are missing:\n  " + "\n  ".join(missing)
                         + f"\nInstall them with: {INSTALL_HINT}  (or pass --linux-doc / --python-doc DIR)")
    return sources


def read_documents(sources: list[dict], max_pages: int | None) -> list[dict]:
    """One document per HTML page: {"id": "<source>/<relative path>", "text": paragraphs joined by blank lines},
    in sorted order; boilerplate paragraphs (in more than 3 documents) and duplicate documents dropped."""
    pages = []
    for source in sources:
        root = Path(source["root"])
        files = sorted(p for p in root.rglob("*.html") if not SKIPPED_PAGES.search(str(p.relative_to(root))))
        pages += [(f"{source['name']}/{p.relative_to(root)}", p) for p in files[:max_pages]]
    paragraphs = {doc_id: page_paragraphs(path) for doc_id, path in pages}
    seen_in = Counter(p for paras in paragraphs.values() for p in set(paras))
    documents, seen = [], set()
    for doc_id, paras in paragraphs.items():
        text = "\n\n".join(p for p in paras if seen_in[p] <= MAX_DOCUMENTS_PER_PARAGRAPH)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if len(text) >= 200 and digest not in seen:
            seen.add(digest)
            documents.append({"id": doc_id, "text": text})
    return documents


def is_heldout(doc_id: str, percent: float) -> bool:
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 10000 < percent * 100


def write_tokens(documents: list[dict], tokenizer, out: Path, name: str) -> dict:
    ids = tokenizer([d["text"] for d in documents], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter((t for x in ids for t in (*x, eos)), dtype=np.uint16, count=int(offsets[-1]))
    (out / f"{name}.bin").write_bytes(tokens.tobytes())
    (out / f"{name}.idx").write_bytes(offsets.tobytes())
    return {"documents": len(documents), "tokens": int(offsets[-1]), "text_bytes": sum(len(d["text"].encode())
            for d in documents), "bin_bytes": tokens.nbytes,
            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/quality/data")
    parser.add_argument("--linux-doc", help="HTML tree of the Linux documentation (default /usr/share/doc/linux-doc/html)")
    parser.add_argument("--python-doc", help="HTML tree of the Python documentation (default /usr/share/doc/python3.*/html)")
    parser.add_argument("--heldout-percent", type=float, default=5.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-pages", type=int, default=None, help="pages per source (a quick look; default all)")
    args = parser.parse_args(argv)

    from sala_train.tokenizer import train_tokenizer

    started = time.perf_counter()
    sources = find_sources(args.linux_doc, args.python_doc)
    documents = read_documents(sources, args.max_pages)
    train = [d for d in documents if not is_heldout(d["id"], args.heldout_percent)]
    heldout = [d for d in documents if is_heldout(d["id"], args.heldout_percent)]
    if not train or not heldout:
        raise SystemExit(f"prepare_corpus: {len(train)} train and {len(heldout)} held-out documents; both splits need "
                         "at least one (more pages, or another --heldout-percent)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text = out / "tokenizer_train.txt"  # the BPE's input, deleted once trained
    train_text.write_text("\n\n".join(d["text"] for d in train), encoding="utf-8")
    tokenizer = train_tokenizer(train_text, out / "tokenizer", vocab_size=args.vocab_size)
    train_text.unlink()
    if len(tokenizer) > 65535:
        raise SystemExit(f"prepare_corpus: --vocab-size {args.vocab_size} does not fit uint16 token arrays")
    splits = {"train": write_tokens(train, tokenizer, out, "train"),
              "heldout": write_tokens(heldout, tokenizer, out, "heldout")}
    probe = heldout[0]["text"]  # byte-level BPE round trip: the study rebuilds the text from the arrays
    if tokenizer.decode(tokenizer(probe, add_special_tokens=False)["input_ids"]) != probe:
        raise SystemExit("prepare_corpus: the tokenizer does not decode its own ids back to the text; the study "
                         "rebuilds text from token arrays and needs an exact round trip")
    meta = {"sources": sources, "splits": splits, "vocab_size": len(tokenizer),
            "heldout_percent": args.heldout_percent, "split_rule": "sha256(document id)[:8] % 10000 < percent * 100",
            "heldout_ids": [d["id"] for d in heldout],
            "bytes_on_disk": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
            "seconds": round(time.perf_counter() - started, 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    meta["bytes_on_disk"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    for name, split in splits.items():
        print(f"{name}: {split['documents']} documents, {split['text_bytes'] / 1e6:.1f} MB of text, "
              f"{split['tokens'] / 1e6:.2f}M tokens, {split['bin_bytes'] / 2**20:.1f} MiB as uint16")
    print(f"wrote {out} ({meta['bytes_on_disk'] / 2**20:.1f} MiB) in {meta['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
