"""Tests of sala_train.checkpoint: round trips, the HF sharded layout, every named error, atomic writes."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sala_train.checkpoint import (
    INDEX_FILE_NAME,
    SINGLE_FILE_NAME,
    CheckpointError,
    CheckpointReader,
    CorruptCheckpointError,
    DtypeMismatchError,
    MissingKeysError,
    MissingShardError,
    MissingTensorError,
    ShapeMismatchError,
    ShardedCheckpointWriter,
    TensorInfo,
    UnexpectedKeysError,
    atomic_directory,
    parse_size,
    save_state_dict,
    validate_checkpoint,
    write_json_atomic,
)

# Small enough that make_state_dict() needs several shards, with one tensor larger than a whole shard.
SMALL_SHARD_BYTES = 1000


def make_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh random tensors of several dtypes and odd shapes, in the order a model would list them."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(37, 17, generator=g),  # fp32, 2516 bytes > one shard
        "model.layers.0.self_attn.q_proj.weight": torch.randn(17, 15, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(23, 17, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.randn(17, generator=g).to(torch.bfloat16),
        "model.layers.0.odd": torch.randn(3, 5, 7, generator=g).to(torch.float16),
        "position_ids": torch.randint(-(2**40), 2**40, (1, 63), generator=g),  # int64
        "scalar": torch.randn((), generator=g),
        "empty": torch.empty(0, 3, dtype=torch.bfloat16),
        "model.norm.weight": torch.randn(17, generator=g),
        "lm_head.weight": torch.randn(37, 17, generator=g).to(torch.bfloat16),
    }


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def assert_same_tensors(reader: CheckpointReader, expected: dict[str, torch.Tensor]) -> None:
    assert reader.keys() == sorted(expected)
    assert len(reader) == len(expected)
    for name, tensor in expected.items():
        loaded = reader.get_tensor(name)
        assert loaded.dtype == tensor.dtype, name
        assert loaded.shape == tensor.shape, name
        assert torch.equal(loaded, tensor), name  # bit-exact: no cast went through the disk


def snapshot(directory) -> dict[str, bytes]:
    """{relative path: content} of every file under ``directory``."""
    return {
        os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
        for root, _, files in os.walk(directory)
        for name in files
    }


def save_sharded(tmp_path, state_dict=None):
    directory = tmp_path / "ckpt"
    save_state_dict(state_dict or make_state_dict(), directory, max_shard_bytes=SMALL_SHARD_BYTES)
    index = json.loads((directory / INDEX_FILE_NAME).read_text())
    return directory, index


# ----------------------------------------------------------------------------------------------------
# Round trips and layout


def test_round_trip_single_file(tmp_path):
    state_dict = make_state_dict()
    config = {"hidden_size": 17}
    directory = save_state_dict(state_dict, tmp_path / "ckpt", extra_json={"config.json": config})
    assert sorted(os.listdir(directory)) == ["config.json", SINGLE_FILE_NAME]  # no index for one shard
    assert json.loads((directory / "config.json").read_text()) == config
    with safe_open(str(directory / SINGLE_FILE_NAME), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    with CheckpointReader(directory) as reader:
        assert reader.files == [directory / SINGLE_FILE_NAME]
        assert reader.total_bytes == sum(nbytes(t) for t in state_dict.values())
        assert "scalar" in reader and "nope" not in reader
        assert_same_tensors(reader, state_dict)
    # The file path itself works too.
    assert_same_tensors(CheckpointReader(directory / SINGLE_FILE_NAME), state_dict)


def test_round_trip_sharded(tmp_path):
    state_dict = make_state_dict()
    directory, index = save_sharded(tmp_path, state_dict)

    shard_names = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    count = len(shard_names)
    assert count >= 3
    assert shard_names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert SINGLE_FILE_NAME not in os.listdir(directory)

    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in state_dict.values())
    assert list(index["weight_map"]) == sorted(state_dict)  # written sorted
    # Check the index against the shards with the safetensors library itself, not with our reader.
    shard_contents = {}
    for shard in shard_names:
        with safe_open(str(directory / shard), framework="pt") as f:
            shard_contents[shard] = list(f.keys())
            assert f.metadata() == {"format": "pt"}
    assert {name: shard for shard, names in shard_contents.items() for name in names} == index["weight_map"]

    # Greedy packing in add order: shards follow the order of the state dict, none is over the limit
    # unless it holds a single tensor, and no shard could have taken the first tensor of the next one.
    shard_of = [shard_names.index(index["weight_map"][name]) for name in state_dict]
    assert shard_of == sorted(shard_of)
    names_in_order = list(state_dict)
    shard_bytes = [sum(nbytes(state_dict[n]) for n in shard_contents[s]) for s in shard_names]
    for i, shard in enumerate(shard_names):
        assert shard_bytes[i] <= SMALL_SHARD_BYTES or len(shard_contents[shard]) == 1
        if i + 1 < count:
            first_of_next = names_in_order[shard_of.index(i + 1)]
            assert shard_bytes[i] + nbytes(state_dict[first_of_next]) > SMALL_SHARD_BYTES

    for path in (directory, directory / INDEX_FILE_NAME):
        with CheckpointReader(path) as reader:
            assert reader.files == [directory / shard for shard in shard_names]
            assert reader.total_bytes == index["metadata"]["total_size"]
            assert_same_tensors(reader, state_dict)


def test_iter_tensors_yields_every_tensor_once_shard_by_shard(tmp_path):
    state_dict = make_state_dict()
    directory, _ = save_sharded(tmp_path, state_dict)
    reader = CheckpointReader(directory)
    seen = []
    for name, tensor in reader.iter_tensors():
        assert torch.equal(tensor, state_dict[name]) and tensor.dtype == state_dict[name].dtype
        seen.append(name)
    assert sorted(seen) == sorted(state_dict) and len(seen) == len(state_dict)
    files_in_order = [reader.info(name).file for name in seen]
    assert files_in_order == sorted(files_in_order)  # one shard finished before the next starts


def test_info_reads_no_tensor_data(tmp_path):
    state_dict = make_state_dict()
    directory, index = save_sharded(tmp_path, state_dict)
    reader = CheckpointReader(directory)
    # Delete every shard after opening: info() must still answer from the headers read at open.
    for shard in set(index["weight_map"].values()):
        os.remove(directory / shard)
    for name, tensor in state_dict.items():
        info = reader.info(name)
        assert isinstance(info, TensorInfo)
        assert info == (name, tuple(tensor.shape), tensor.dtype, directory / index["weight_map"][name])
        assert info.nbytes == nbytes(tensor)


def test_reads_third_party_file_without_index(tmp_path):
    state_dict = make_state_dict(seed=1)
    save_file(state_dict, str(tmp_path / "weights.safetensors"))  # no metadata, no index
    assert_same_tensors(CheckpointReader(tmp_path / "weights.safetensors"), state_dict)
    (tmp_path / "hf").mkdir()
    save_file(state_dict, str(tmp_path / "hf" / SINGLE_FILE_NAME))
    assert_same_tensors(CheckpointReader(tmp_path / "hf"), state_dict)


def test_reader_reopens_shards_after_close(tmp_path):
    state_dict = make_state_dict()
    directory, _ = save_sharded(tmp_path, state_dict)
    with CheckpointReader(directory) as reader:
        first = reader.get_tensor("lm_head.weight")
    assert torch.equal(first, state_dict["lm_head.weight"])  # tensors outlive the closed handle
    assert torch.equal(reader.get_tensor("model.norm.weight"), state_dict["model.norm.weight"])


def test_unknown_tensor_name_is_a_key_error_naming_the_checkpoint(tmp_path):
    directory = save_state_dict(make_state_dict(), tmp_path / "ckpt")
    reader = CheckpointReader(directory)
    for lookup in (reader.info, reader.get_tensor):
        pattern = re.escape(str(directory)) + r".*'model\.norm\.weights'"
        with pytest.raises(MissingKeysError, match=pattern) as err:
            lookup("model.norm.weights")
        assert isinstance(err.value, KeyError)
        assert "model.norm.weight" in str(err.value)  # the close match is suggested


# ----------------------------------------------------------------------------------------------------
# Broken checkpoints


def test_missing_shard(tmp_path):
    directory, index = save_sharded(tmp_path)
    shard = index["weight_map"]["lm_head.weight"]
    os.remove(directory / shard)
    with pytest.raises(MissingShardError, match=re.escape(str(directory / shard))) as err:
        CheckpointReader(directory)
    assert "lm_head.weight" in str(err.value)
    assert str(directory / INDEX_FILE_NAME) in str(err.value)
    assert "lm_head.weight" in err.value.keys


def test_index_names_tensor_missing_from_its_shard(tmp_path):
    directory, index = save_sharded(tmp_path)
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.layers.7.mlp.down_proj.weight"] = shard
    (directory / INDEX_FILE_NAME).write_text(json.dumps(index))
    with pytest.raises(MissingTensorError, match=re.escape(str(directory / shard))) as err:
        CheckpointReader(directory)
    assert "model.layers.7.mlp.down_proj.weight" in str(err.value)
    assert err.value.keys == ["model.layers.7.mlp.down_proj.weight"]


@pytest.mark.parametrize("cut", [1, 333])
def test_truncated_shard(tmp_path, cut):
    directory, index = save_sharded(tmp_path)
    shard = directory / index["weight_map"]["model.embed_tokens.weight"]
    size = shard.stat().st_size
    os.truncate(shard, size - cut)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(shard))) as err:
        CheckpointReader(directory)
    assert f"truncated: its header says the tensor data ends at byte {size}" in str(err.value)
    assert f"({cut} missing)" in str(err.value)


def test_file_truncated_inside_its_header(tmp_path):
    directory = save_state_dict(make_state_dict(), tmp_path / "ckpt")
    os.truncate(directory / SINGLE_FILE_NAME, 40)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(directory / SINGLE_FILE_NAME))) as err:
        CheckpointReader(directory)
    assert "only 32 bytes follow it" in str(err.value)


@pytest.mark.parametrize("content, problem", [
    (struct.pack("<Q", 12) + b"{not json!!}", "not valid JSON"),
    (b"\x00\x01\x02", "only 3 bytes"),
    (os.urandom(64), "header length field says"),
])
def test_garbage_header(tmp_path, content, problem):
    file = tmp_path / "broken.safetensors"
    file.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(file))) as err:
        CheckpointReader(file)
    assert problem in str(err.value)


@pytest.mark.parametrize("content, problem", [
    ('{"metadata": {"total_size": 10}, "weight_map": {', "not valid JSON"),
    ('{"metadata": {"total_size": 10}}', "'weight_map'"),
    ('{"weight_map": {"a": 3}}', "'weight_map'"),
    ('{"weight_map": {"a": "../other/model.safetensors"}}', "outside the checkpoint directory"),
])
def test_bad_index(tmp_path, content, problem):
    directory, _ = save_sharded(tmp_path)
    (directory / INDEX_FILE_NAME).write_text(content)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(directory / INDEX_FILE_NAME))) as err:
        CheckpointReader(directory)
    assert problem in str(err.value)


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path)) + ".*empty directory") as err:
        CheckpointReader(tmp_path)
    assert INDEX_FILE_NAME in str(err.value) and SINGLE_FILE_NAME in str(err.value)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="found pytorch_model.bin"):
        CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nowhere")) + ": no such file"):
        CheckpointReader(tmp_path / "nowhere")


def test_all_errors_are_checkpoint_errors():
    for error in (MissingShardError, MissingTensorError, CorruptCheckpointError, UnexpectedKeysError,
                  MissingKeysError, ShapeMismatchError, DtypeMismatchError):
        assert issubclass(error, CheckpointError) and issubclass(error, RuntimeError)


# ----------------------------------------------------------------------------------------------------
# Validation


@pytest.fixture
def saved(tmp_path):
    """(reader, state dict, {name: shard path}) of a sharded checkpoint."""
    state_dict = make_state_dict()
    directory, index = save_sharded(tmp_path, state_dict)
    with CheckpointReader(directory) as reader:
        yield reader, state_dict, {name: directory / shard for name, shard in index["weight_map"].items()}


def shapes_of(state_dict):
    return {name: tuple(t.shape) for name, t in state_dict.items()}


def test_validate_accepts_matching_checkpoint(saved):
    reader, state_dict, _ = saved
    validate_checkpoint(reader, shapes_of(state_dict))


def test_validate_unexpected_keys(saved):
    reader, state_dict, files = saved
    expected = shapes_of(state_dict)
    del expected["lm_head.weight"], expected["position_ids"]
    with pytest.raises(UnexpectedKeysError, match=re.escape(str(reader.path))) as err:
        validate_checkpoint(reader, expected)
    message = str(err.value)
    for name in ("lm_head.weight", "position_ids"):
        assert f"{name} (in {files[name]})" in message
    assert "key map" in message
    assert sorted(err.value.keys) == ["lm_head.weight", "position_ids"]
    # Exact names and glob patterns can be skipped on purpose.
    validate_checkpoint(reader, expected, ignore_unexpected=["lm_head.weight", "position_*"])


def test_validate_unexpected_keys_also_lists_missing_ones(saved):
    reader, state_dict, _ = saved
    expected = shapes_of(state_dict)
    expected["model.final_norm.weight"] = expected.pop("model.norm.weight")  # a renamed key
    with pytest.raises(UnexpectedKeysError, match=r"model\.norm\.weight") as err:
        validate_checkpoint(reader, expected)
    assert "model.final_norm.weight" in str(err.value)


def test_validate_missing_keys(saved):
    reader, state_dict, _ = saved
    expected = shapes_of(state_dict)
    expected["model.layers.1.mlp.up_proj.weight"] = (23, 17)
    expected["model.layers.1.odd"] = (3,)
    with pytest.raises(MissingKeysError, match=re.escape(str(reader.path))) as err:
        validate_checkpoint(reader, expected)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value) and "model.layers.1.odd" in str(err.value)
    assert sorted(err.value.keys) == ["model.layers.1.mlp.up_proj.weight", "model.layers.1.odd"]


def test_validate_shape_mismatch_reports_every_offender(saved):
    reader, state_dict, files = saved
    expected = shapes_of(state_dict)
    expected["lm_head.weight"] = (38, 17)
    expected["scalar"] = (1,)
    with pytest.raises(ShapeMismatchError) as err:
        validate_checkpoint(reader, expected)
    message = str(err.value)
    assert f"lm_head.weight in {files['lm_head.weight']}: expected [38, 17], found [37, 17]" in message
    assert f"scalar in {files['scalar']}: expected [1], found []" in message
    assert sorted(err.value.keys) == ["lm_head.weight", "scalar"]


def test_validate_dtype_mismatch(tmp_path):
    state_dict = {name: t.bfloat16() for name, t in make_state_dict().items() if t.is_floating_point()}
    state_dict["model.norm.weight"] = state_dict["model.norm.weight"].float()
    state_dict["position_ids"] = torch.arange(5)
    directory = save_state_dict(state_dict, tmp_path / "ckpt")
    reader = CheckpointReader(directory)
    with pytest.raises(DtypeMismatchError, match=re.escape(str(directory))) as err:
        validate_checkpoint(reader, shapes_of(state_dict), torch.bfloat16)
    message = str(err.value)
    assert f"model.norm.weight in {directory / SINGLE_FILE_NAME}: found torch.float32" in message
    assert "position_ids" in message and "not a floating-point tensor" in message
    assert "torch.bfloat16" in message
    assert sorted(err.value.keys) == ["model.norm.weight", "position_ids"]
    del state_dict["model.norm.weight"], state_dict["position_ids"]
    reader = CheckpointReader(save_state_dict(state_dict, tmp_path / "ok"))
    validate_checkpoint(reader, shapes_of(state_dict), torch.bfloat16)


def test_validate_check_order(saved):
    """Keys before shapes before dtypes, whatever else is wrong."""
    reader, state_dict, _ = saved
    expected = shapes_of(state_dict)
    expected["lm_head.weight"] = (1, 1)
    with pytest.raises(ShapeMismatchError):
        validate_checkpoint(reader, expected, torch.float32)  # the dtypes are wrong too
    expected["extra.weight"] = (2,)
    with pytest.raises(MissingKeysError):
        validate_checkpoint(reader, expected, torch.float32)


def test_validate_accepts_any_object_with_keys_and_info(saved):
    """Loaders validate through renamed views that have only keys() and info(), no .path."""
    reader, state_dict, files = saved

    class RenamedView:
        def keys(self):
            return ["renamed." + name for name in reader.keys()]

        def info(self, name):
            return reader.info(name.removeprefix("renamed."))._replace(name=name)

    expected = {"renamed." + name: shape for name, shape in shapes_of(state_dict).items()}
    validate_checkpoint(RenamedView(), expected)
    del expected["renamed.scalar"]
    with pytest.raises(UnexpectedKeysError, match=re.escape(str(files["scalar"].parent))):
        validate_checkpoint(RenamedView(), expected)


def test_long_key_lists_are_truncated(tmp_path):
    state_dict = {f"model.layers.{i}.weight": torch.zeros(2) for i in range(25)}
    reader = CheckpointReader(save_state_dict(state_dict, tmp_path / "ckpt"))
    with pytest.raises(UnexpectedKeysError, match="and 15 more") as err:
        validate_checkpoint(reader, {})
    assert str(err.value).count("(in ") == 10
    with pytest.raises(MissingKeysError, match=r"\(and 15 more\)"):
        validate_checkpoint(reader, {**shapes_of(state_dict), **{f"x.{i}": (1,) for i in range(25)}})


# ----------------------------------------------------------------------------------------------------
# Writing


def test_writer_rejects_duplicate_names_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="'model.norm.weight' was already added"):
        with ShardedCheckpointWriter(tmp_path / "ckpt") as writer:
            writer.add("model.norm.weight", torch.ones(3))
            writer.add("model.norm.weight", torch.ones(3))
    assert os.listdir(tmp_path) == []


def test_writer_snapshots_tensors_and_unties_shared_storage(tmp_path):
    weight = torch.randn(6, 4)
    expected = {"embed": weight.clone(), "tied": weight.clone(), "view": weight[1:3].clone(),
                "t": weight.t().clone()}
    with ShardedCheckpointWriter(tmp_path / "ckpt") as writer:
        writer.add("embed", weight)
        writer.add("tied", weight)  # same storage: safetensors alone would refuse this
        writer.add("view", weight[1:3])
        writer.add("t", weight.t())  # not contiguous
        weight.zero_()  # the caller keeps training: the checkpoint must hold the values at add() time
    assert_same_tensors(CheckpointReader(tmp_path / "ckpt"), expected)


def test_writer_extra_files_and_metadata(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(b'{"model": "bpe"}\n')
    directory = tmp_path / "ckpt"
    with ShardedCheckpointWriter(directory, max_shard_bytes="1KB", metadata={"step": "100"}) as writer:
        for name, tensor in make_state_dict().items():
            writer.add(name, tensor)
        writer.write_json("config.json", {"model_type": "minicpm"})
        writer.copy_file(tokenizer)
        writer.copy_file(tokenizer, "tokenizer/copy.json")
        with pytest.raises(ValueError, match="outside|relative path"):
            writer.write_json("../escape.json", {})
        with pytest.raises(ValueError, match="written by the checkpoint writer"):
            writer.write_json(INDEX_FILE_NAME, {})
    assert json.loads((directory / "config.json").read_text()) == {"model_type": "minicpm"}
    assert (directory / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert (directory / "tokenizer" / "copy.json").read_bytes() == tokenizer.read_bytes()
    for file in CheckpointReader(directory).files:
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "step": "100"}


def test_exception_inside_writer_leaves_existing_checkpoint_untouched(tmp_path):
    directory, _ = save_sharded(tmp_path)
    (directory / "config.json").write_text("{}")
    before = snapshot(directory)
    with pytest.raises(RuntimeError, match="out of memory"):
        with ShardedCheckpointWriter(directory, max_shard_bytes=SMALL_SHARD_BYTES) as writer:
            for name, tensor in make_state_dict(seed=5).items():  # enough to flush shards to staging
                writer.add(name, tensor)
            writer.write_json("config.json", {"new": True})
            assert len(os.listdir(tmp_path)) == 2  # the staging directory exists beside the target
            raise RuntimeError("out of memory")
    assert snapshot(directory) == before
    assert os.listdir(tmp_path) == ["ckpt"]  # no staging or old directories left behind


def test_exception_inside_writer_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardedCheckpointWriter(tmp_path / "new") as writer:
            writer.add("a", torch.ones(2))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_writer_replaces_existing_checkpoint(tmp_path):
    directory, _ = save_sharded(tmp_path)
    (directory / "stale.txt").write_text("from the old checkpoint")
    new_state_dict = {"model.norm.weight": torch.randn(5, dtype=torch.float64)}
    save_state_dict(new_state_dict, directory, extra_json={"config.json": {"v": 2}})
    assert sorted(os.listdir(directory)) == ["config.json", SINGLE_FILE_NAME]  # no stale shards or index
    assert_same_tensors(CheckpointReader(directory), new_state_dict)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_writer_without_tensors_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="no tensors were added"):
        with ShardedCheckpointWriter(tmp_path / "ckpt") as writer:
            writer.write_json("config.json", {})
    assert os.listdir(tmp_path) == []


def test_atomic_directory_keeps_permissions_and_cleans_up(tmp_path):
    with atomic_directory(tmp_path / "out") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-")
        (staging / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    # Same permissions as a directory made with mkdir (mkdtemp would give 0o700).
    (tmp_path / "reference").mkdir()
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "reference").stat().st_mode
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        with atomic_directory(tmp_path / "file"):
            pass


def test_write_json_atomic(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.parametrize("size, expected", [
    ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("100KB", 100_000),
    ("100KiB", 102_400), ("1.5GB", 1_500_000_000), ("7 mb", 7_000_000), ("1234", 1234), ("64B", 64),
    (1234, 1234), (0, 0),
])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["five GB", "5XB", "", "GB", "-1GB", "5 G B", -3, 1.5, None, True])
def test_parse_size_rejects(size):
    shown = repr(size) if isinstance(size, str) else str(size)  # the message quotes strings
    with pytest.raises(ValueError, match=re.escape(shown)):
        parse_size(size)
