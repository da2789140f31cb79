"""Documents -> token ids, cached on disk.

A text document becomes ``tokenizer(text)`` (with ``<s>`` if the tokenizer adds it) followed by eos, so
the model learns where a document ends. A chat document (a list of ``{role, content}``) becomes the
tokenizer's chat template, tokenized once, with a ``loss_mask`` that is 1 on the tokens of each assistant
turn, its end-of-turn token included, and 0 on system and user turns and on the template's own tokens
(``<|im_start|>assistant\\n`` and the newline after ``<|im_end|>``). Chat documents get no extra eos: the
trained end-of-turn token already ends every answer.

Each tokenized row holds ``input_ids`` (int32), ``length`` and, for chat sources, ``loss_mask`` (int8).
Empty documents keep their row with length 0 (so row numbers match the raw records, which streaming
resume relies on) and are skipped later.

    dataset = tokenized_source(source, tokenizer, cache_dir)   map-style, cached
    iterable = streamed_source(source, tokenizer, skip=n)      streaming, tokenized on the fly

The cache file is ``<cache_dir>/tokenized/<key>.arrow`` with key = hash(source fingerprint, tokenizer
fingerprint, TOKENIZATION_VERSION): a second run with the same files and tokenizer reads it back instead
of tokenizing again; touching a file or changing the tokenizer gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import SourceConfig
from .sources import DataSourceError, load_source, resolve_files, source_fingerprint, source_type

# Bump when the layout of a tokenized row changes, so that caches written by older code are not reused.
TOKENIZATION_VERSION = 1
CHATML_END_OF_TURN = "<|im_end|>"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes the ids: vocabulary, merges, normaliser,
    post-processor (bos), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"the data pipeline needs a Hugging Face *fast* tokenizer (with .backend_tokenizer), got "
            f"{type(tokenizer).__name__}; load it with sala_train.tokenizer.load_tokenizer or use_fast=True."
        )
    blob = json.dumps(
        {
            "tokenizer": backend.to_str(),
            "chat_template": tokenizer.chat_template,
            "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn: ChatML's ``<|im_end|>`` if the vocabulary has it, else eos."""
    if CHATML_END_OF_TURN in tokenizer.get_vocab():
        return CHATML_END_OF_TURN
    return tokenizer.eos_token


def tokenize_conversation(
    tokenizer, messages: list[dict], end_of_turn: str | None = None
) -> tuple[list[int], list[int]]:
    """One conversation -> (input_ids, loss_mask), both of length n; mask 1 on assistant turns.

    The template is rendered once and tokenized once (so ids equal ``apply_chat_template`` plus the
    tokenizer's bos). Assistant spans are found in characters by rendering prefixes of the conversation:
    an answer starts where ``messages[:k]`` with the generation prompt ends and stops after the last
    end-of-turn token of ``messages[:k + 1]``. A token is trained when its first character lies in a span.
    """
    end_of_turn = end_of_turn or end_of_turn_token(tokenizer)

    def render(prefix, generation_prompt=False):
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[: k + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the chat template does not render a conversation as the concatenation of its turns (the "
                "rendering of the first turns is not a prefix of the whole), so assistant turns cannot be "
                "located; use a template without look-ahead, e.g. ChatML."
            )
        start, end = len(before), len(through)
        cut = text.rfind(end_of_turn, start, end)
        if cut >= 0:
            end = cut + len(end_of_turn)  # train the end-of-turn token, not the template's newline after it
        spans.append((start, end))

    # Templates that write <s> themselves must not get a second one from the tokenizer.
    add_special_tokens = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    loss_mask = []
    for first, last in encoding["offset_mapping"]:
        # tokens the tokenizer adds (bos) cover no characters: first == last
        trained = first < last and any(start <= first < end for start, end in spans)
        loss_mask.append(int(trained))
    return list(encoding["input_ids"]), loss_mask


class DocumentTokenizer:
    """The batched function given to ``datasets.map``: records -> ``input_ids``, ``length`` (, ``loss_mask``).

    A class rather than a closure so that ``num_proc`` workers can pickle it.
    """

    def __init__(self, tokenizer, source: SourceConfig, kind: str):
        if not source.chat and tokenizer.eos_token_id is None:
            raise ValueError(f"{source.describe()}: the tokenizer has no eos token to end documents with.")
        self.tokenizer = tokenizer
        self.source = source
        self.strip = kind == "text"  # text files split on newlines; the newlines themselves are not content
        self.field = source.messages_field if source.chat else source.text_field
        self.end_of_turn = end_of_turn_token(tokenizer) if source.chat else None

    def _record_error(self, record: int, problem: str) -> DataSourceError:
        option = "messages_field" if self.source.chat else "text_field"
        return DataSourceError(
            f"{self.source.describe()}: record {record} (0-based, in file order) {problem}. "
            f"Fix the record, or set {option} to the field that holds the "
            f"{'conversation' if self.source.chat else 'text'}."
        )

    def __call__(self, batch: dict, indices: list[int], offset: int = 0) -> dict:
        if self.field not in batch:
            raise self._record_error(
                offset + indices[0], f"has no field {self.field!r}; its fields are {sorted(batch)}"
            )
        values = batch[self.field]
        if self.source.chat:
            return self._conversations(values, indices, offset)
        texts = []
        for value, index in zip(values, indices):
            if not isinstance(value, str):
                raise self._record_error(
                    offset + index, f"has {self.field!r} = {value!r:.60}, expected a string"
                )
            texts.append(value.strip() if self.strip else value)
        non_empty = [i for i, text in enumerate(texts) if text.strip()]
        ids = [[] for _ in texts]
        encoded = self.tokenizer([texts[i] for i in non_empty], add_special_tokens=True)["input_ids"]
        for i, tokens in zip(non_empty, encoded):
            ids[i] = list(tokens) + [self.tokenizer.eos_token_id]
        return {"input_ids": ids, "length": [len(x) for x in ids]}

    def _conversations(self, values, indices, offset) -> dict:
        ids, masks = [], []
        for messages, index in zip(values, indices):
            record = offset + index
            if not isinstance(messages, list):
                raise self._record_error(
                    record, f"has {self.field!r} = {messages!r:.60}, expected a list of {{role, content}}"
                )
            for m in messages:
                if not (
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                ):
                    raise self._record_error(
                        record, f"has a message {m!r:.80} without a string role and content"
                    )
            if any(m["role"] == "assistant" for m in messages):
                try:
                    tokens, mask = tokenize_conversation(self.tokenizer, messages, self.end_of_turn)
                except ValueError as error:  # name the record; the template problem is in the message
                    raise self._record_error(record, f"cannot be rendered: {error}") from error
            else:
                tokens, mask = [], []  # nothing to train on: skipped later like an empty document
            ids.append(tokens)
            masks.append(mask)
        return {"input_ids": ids, "loss_mask": masks, "length": [len(x) for x in ids]}


def tokenized_features(chat: bool):
    import datasets

    features = {"input_ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32")}
    if chat:
        features["loss_mask"] = datasets.List(datasets.Value("int8"))
    return datasets.Features(features)


def tokenization_key(source: SourceConfig, tokenizer) -> str:
    parts = [str(TOKENIZATION_VERSION), source_fingerprint(source), tokenizer_fingerprint(tokenizer)]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:32]


def tokenized_source(source: SourceConfig, tokenizer, cache_dir, num_proc: int | None = None):
    """A source tokenized with ``datasets.map`` into ``<cache_dir>/tokenized/<key>.arrow`` (reused when it
    exists). Returns a map-style Dataset with numpy formatting: ``ds[i]["input_ids"]`` is an int32 array."""
    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    raw = load_source(source, cache_dir)
    key = tokenization_key(source, tokenizer)
    cache_file = cache_dir / "tokenized" / f"{key}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tokenized = raw.map(
        DocumentTokenizer(tokenizer, source, source_type(source, resolve_files(source))),
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=tokenized_features(source.chat),
        cache_file_name=str(cache_file),
        load_from_cache_file=True,
        new_fingerprint=key,  # the key already says what matters; hashing the tokenizer object is slow
        num_proc=num_proc,
        desc=f"tokenizing {source.path}",
    )
    return tokenized.with_format("numpy")


class TokenArrays:
    """A ``type: tokens`` source: documents tokenized beforehand, memory-mapped (no Hugging Face datasets).

    ``<name>.bin`` holds every document's token ids back to back (uint16; uint32 when the name ends in
    ``.u32.bin``), each document as the loader would tokenize it (``<s>`` ids ``</s>``); ``<name>.idx`` holds
    int64 offsets [documents + 1] into it. ``ds[i]["input_ids"]`` is document i (int32), ``lengths`` their sizes.
    """

    def __init__(self, source: SourceConfig, tokenizer):
        files = resolve_files(source)
        if len(files) != 1:
            raise DataSourceError(f"{source.describe()}: a tokens source is one <name>.bin file; the path matches "
                                  f"{len(files)} files (use one source per file)")
        path = files[0]
        index = path.with_name(path.name.removesuffix(".bin").removesuffix(".u32") + ".idx")
        if not index.is_file():
            raise DataSourceError(f"{source.describe()}: {index} is missing; a tokens source is <name>.bin with "
                                  "int64 document offsets in <name>.idx")
        import numpy as np

        dtype = np.uint32 if path.name.endswith(".u32.bin") else np.uint16
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.offsets = np.fromfile(index, dtype=np.int64)
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens) \
                or (np.diff(self.offsets) < 0).any():
            raise DataSourceError(f"{source.describe()}: the offsets in {index} do not cover the {len(self.tokens)} "
                                  f"tokens of {path} (expected 0 first, {len(self.tokens)} last, non-decreasing)")
        largest = int(self.tokens.max()) if len(self.tokens) else 0
        if largest >= len(tokenizer):
            raise DataSourceError(f"{source.describe()}: token id {largest} is outside the tokenizer's {len(tokenizer)} "
                                  "ids; the arrays were written with another tokenizer")
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, row: int) -> dict:
        import numpy as np

        return {"input_ids": np.asarray(self.tokens[self.offsets[row] : self.offsets[row + 1]], dtype=np.int32)}


def streamed_source(source: SourceConfig, tokenizer, skip: int = 0):
    """A source read lazily and tokenized on the fly: an IterableDataset of tokenized rows, starting at
    raw record ``skip`` (records before it are read past, not tokenized)."""
    raw = load_source(source, streaming=True)
    if skip:
        raw = raw.skip(skip)
    return raw.map(
        DocumentTokenizer(tokenizer, source, source_type(source, resolve_files(source))),
        batched=True,
        with_indices=True,
        fn_kwargs={"offset": skip},  # indices restart at 0 after skip; errors should name the real record
        remove_columns=raw.column_names,
    )
