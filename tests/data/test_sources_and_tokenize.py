"""Reading sources (jsonl, parquet, text, save_to_disk), errors for people, the tokenization cache and the
SFT loss mask."""

import os

import datasets
import pytest

from sala_train.data import (
    DataSourceError,
    DocumentTokenizer,
    SourceConfig,
    load_source,
    tokenize_conversation,
    tokenized_source,
)


def lengths(dataset):
    return dataset.data.column("length").to_pylist()


def test_text_documents_get_bos_and_eos(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"body": "Hello world."}, {"body": ""}, {"body": "Second one."}]
    )
    ds = tokenized_source(SourceConfig(path=str(path), text_field="body"), tokenizer, tmp_path / "cache")
    assert ds[0]["input_ids"].tolist() == tokenizer("Hello world.")["input_ids"] + [tokenizer.eos_token_id]
    assert ds[0]["input_ids"][0] == tokenizer.bos_token_id
    assert lengths(ds) == [len(ds[0]["input_ids"]), 0, len(ds[2]["input_ids"])]  # empty kept, length 0
    assert "loss_mask" not in ds.column_names


def test_parquet_text_and_saved_sources(tmp_path, tokenizer, paragraphs):
    records = {"text": paragraphs[:5]}
    datasets.Dataset.from_dict(records).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_dict(records).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "t.txt").write_text("\n\n".join(paragraphs[:5]) + "\n", encoding="utf-8")
    results = [
        tokenized_source(SourceConfig(path=str(tmp_path / name)), tokenizer, tmp_path / "cache")["input_ids"]
        for name in ("p.parquet", "saved", "t.txt")
    ]
    for ids in results[1:]:  # text files: one document per paragraph, same tokens as the records
        assert [x.tolist() for x in ids] == [x.tolist() for x in results[0]]


def test_second_run_reads_the_cache_instead_of_tokenizing(tmp_path, tokenizer, corpus, monkeypatch):
    source = SourceConfig(path=str(corpus["web"]))
    first = tokenized_source(source, tokenizer, tmp_path / "cache")
    cache_files = sorted(os.listdir(tmp_path / "cache" / "tokenized"))
    assert len(cache_files) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this source")

    monkeypatch.setattr(DocumentTokenizer, "__call__", refuse)
    second = tokenized_source(source, tokenizer, tmp_path / "cache")
    assert lengths(second) == lengths(first)
    assert sorted(os.listdir(tmp_path / "cache" / "tokenized")) == cache_files
    monkeypatch.undo()

    # editing the file changes the key: a new cache file, with the new tokens
    with open(corpus["web"], "a", encoding="utf-8") as f:
        f.write('{"text": "One more document."}\n')
    third = tokenized_source(source, tokenizer, tmp_path / "cache")
    assert len(third) == len(first) + 1
    assert len(os.listdir(tmp_path / "cache" / "tokenized")) == 2


def test_sft_loss_mask_covers_assistant_turns_and_their_end_token(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is packing?"},
        {"role": "assistant", "content": "Putting documents side by side."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Less padding."},
    ]
    ids, mask = tokenize_conversation(tokenizer, messages)
    # the ids are the chat template's, with the tokenizer's bos in front
    template_ids = tokenizer.apply_chat_template(messages, tokenize=True)
    template_ids = template_ids["input_ids"] if hasattr(template_ids, "keys") else template_ids
    assert ids == [tokenizer.bos_token_id] + list(template_ids)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained) == "Putting documents side by side.<|im_end|>Less padding.<|im_end|>"
    # nothing of the system or user turns, nor the template's "<|im_start|>assistant\n" or trailing "\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for i, m in zip(ids, mask) if i == im_end and m) == 2
    assert sum(1 for i in ids if i == im_end) == 5
    assert mask[-1] == 0 and ids[-1] == tokenizer.convert_tokens_to_ids(
        "\u010a"
    )  # "\n" after the last <|im_end|>


def test_chat_source_rows_carry_the_mask(tmp_path, tokenizer, corpus):
    ds = tokenized_source(SourceConfig(path=str(corpus["chat"]), chat=True), tokenizer, tmp_path / "cache")
    assert (
        ds.features["loss_mask"].feature.dtype == "int8" and ds.features["input_ids"].feature.dtype == "int32"
    )
    row = ds[3]
    assert len(row["loss_mask"]) == len(row["input_ids"]) == row["length"]
    assert 0 < row["loss_mask"].sum() < row["length"]


# ----------------------------------------------------------------------------- bad input


def test_missing_file_and_empty_glob_are_named(tmp_path):
    with pytest.raises(DataSourceError, match=r"'.*nowhere\.jsonl' does not exist"):
        load_source(SourceConfig(path=str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(DataSourceError, match=r"matches no file"):
        load_source(SourceConfig(path=str(tmp_path / "shards" / "*.jsonl")))


def test_unknown_extension_and_plain_directory(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataSourceError, match=r"cannot tell the format of \.csv files; set type"):
        load_source(SourceConfig(path=str(tmp_path / "data.csv")))
    with pytest.raises(DataSourceError, match="is a directory but not a save_to_disk dataset"):
        load_source(SourceConfig(path=str(tmp_path)))


def test_record_without_the_text_field_names_file_record_and_field(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"content": "a"}, {"content": "b"}])
    with pytest.raises(
        DataSourceError, match=r"bad\.jsonl.*has no field 'text'; its fields are \['content'\].*text_field"
    ):
        tokenized_source(SourceConfig(path=str(path)), tokenizer, tmp_path / "cache")
    path = write_jsonl(tmp_path / "holes.jsonl", [{"text": "a"}, {"text": "b"}, {"other": 1}])
    with pytest.raises(DataSourceError, match=r"holes\.jsonl'?: record 2 .*'text' = None, expected a string"):
        tokenized_source(SourceConfig(path=str(path)), tokenizer, tmp_path / "cache")


def test_bad_chat_message_is_named(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user"}]},
        ],
    )
    with pytest.raises(DataSourceError, match=r"chat\.jsonl'?: record 1 .*without a string role and content"):
        tokenized_source(SourceConfig(path=str(path), chat=True), tokenizer, tmp_path / "cache")
