"""Sharded safetensors checkpoints in the Hugging Face layout: read, validate, write atomically.

A checkpoint directory holds either one ``model.safetensors`` or several shards
``model-00001-of-00004.safetensors`` ... plus ``model.safetensors.index.json``::

    {"metadata": {"total_size": 16396361728},
     "weight_map": {"lm_head.weight": "model-00004-of-00004.safetensors", ...}}

beside ``config.json``, ``generation_config.json`` and the tokenizer files.

Reading (``CheckpointReader``) checks the whole layout on open from the file headers alone (every shard
exists, no file is truncated, every tensor the index names is in its shard) and then reads tensors one at
a time, so an 8B checkpoint streams through a machine with less RAM than the checkpoint.

Writing (``ShardedCheckpointWriter``) keeps at most one shard in memory and builds the checkpoint in a
hidden staging directory beside the target; only the final rename makes it visible, so a crash or an
exception never leaves a half-written checkpoint where a good one was.

Every error is a ``CheckpointError`` whose message names the file (full path), the tensor(s), what was
expected, what was found, and what to do.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import re
import secrets
import shutil
import struct
import warnings
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# safetensors header dtype strings -> torch dtypes. getattr: the float8 / unsigned types are missing
# from older torch builds, and a checkpoint using one then fails with a clear message instead.
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in [
        ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("U16", "uint16"), ("I16", "int16"),
        ("U32", "uint32"), ("I32", "int32"), ("U64", "uint64"), ("I64", "int64"),
        ("F16", "float16"), ("BF16", "bfloat16"), ("F32", "float32"), ("F64", "float64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("C64", "complex64"), ("C128", "complex128"),
    ]
    if hasattr(torch, name)
}


# ----------------------------------------------------------------------------------------------------
# Errors


class CheckpointError(RuntimeError):
    """Base of every error raised by this module. ``keys`` holds the offending tensor names, if any."""

    def __init__(self, message: str, keys: Iterable[str] = ()):
        super().__init__(message)
        self.keys = list(keys)


class MissingShardError(CheckpointError):
    """The index names a shard file that does not exist."""


class MissingTensorError(CheckpointError):
    """The index maps a tensor to a shard whose header does not contain it."""


class CorruptCheckpointError(CheckpointError):
    """A truncated or garbled safetensors file, or an index that is not valid JSON of the right shape."""


class UnexpectedKeysError(CheckpointError):
    """The checkpoint holds tensors the model does not expect."""


class MissingKeysError(CheckpointError, KeyError):
    """Tensors that were asked for are not in the checkpoint. Also a KeyError, so ``reader.info(name)``
    behaves like a mapping lookup."""

    # KeyError.__str__ would print the message as a quoted repr (newlines as "\n"); keep it readable.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(CheckpointError):
    """Tensors whose shape differs from the one the model expects."""


class DtypeMismatchError(CheckpointError):
    """Tensors whose dtype differs from the one the model config declares."""


def _format_names(names: Iterable[str], limit: int = 10) -> str:
    """'a, b, c' for short lists, 'a, b, ... (and 37 more)' for long ones, so messages stay readable."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} ... (and {len(names) - limit} more)"


def _format_lines(lines: list[str], limit: int = 10) -> str:
    """One offending item per indented line, at most ``limit`` of them."""
    shown = "".join(f"\n  {line}" for line in lines[:limit])
    return shown if len(lines) <= limit else f"{shown}\n  ... and {len(lines) - limit} more"


# ----------------------------------------------------------------------------------------------------
# Reading


class TensorInfo(NamedTuple):
    """What a safetensors header says about one tensor; getting it reads no tensor data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_index(index_file: Path) -> dict[str, str]:
    """Parse ``model.safetensors.index.json`` and return its weight_map {tensor name: shard file name}."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(
            f"{index_file}: not valid JSON ({err}). The index was probably cut short or edited by hand; "
            f"restore it from the original checkpoint."
        ) from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()
    ):
        found = sorted(index) if isinstance(index, dict) else type(index).__name__
        raise CorruptCheckpointError(
            f"{index_file}: expected a JSON object with a 'weight_map' object mapping tensor names to shard "
            f"file names, found {found}. Restore the index from the original checkpoint."
        )
    for name, file in weight_map.items():
        # A shard must sit beside the index: an absolute or '..' path would read files outside the checkpoint.
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise CorruptCheckpointError(
                f"{index_file}: tensor '{name}' maps to '{file}', which is outside the checkpoint directory. "
                f"Shard names in the weight_map must be plain file names."
            )
    return weight_map


def _describe_header_problem(file: Path) -> str:
    """Say precisely why a safetensors file does not open: too short, truncated, or not JSON.

    The safetensors library detects these but says only e.g. "incomplete metadata, file not fully covered";
    here we read the 8-byte little-endian header length and the JSON header to give sizes in bytes.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return (f"the file is only {size} bytes, but a safetensors file starts with an 8-byte header "
                    f"length; it is truncated or not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return (f"the header length field says {header_len} bytes of JSON header, but only {size - 8} "
                    f"bytes follow it; the file is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return f"the {header_len}-byte header is not valid JSON ({err}); the file is corrupt"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    data_end = max(
        (entry["data_offsets"][1] for key, entry in header.items()
         if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
         and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)),
        default=0,
    )
    expected_size = 8 + header_len + data_end
    if expected_size > size:
        return (f"the file is truncated: its header says the tensor data ends at byte {expected_size}, "
                f"but the file has only {size} bytes ({expected_size - size} missing)")
    return "the header is inconsistent (tensor offsets overlap, leave gaps, or do not match the shapes)"


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, dtype)} of one safetensors file, from its header only (no tensor data)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            header = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
    except Exception as err:  # the library raises its own SafetensorError; add the byte-level diagnosis
        raise CorruptCheckpointError(
            f"{file}: cannot read the safetensors header: {_describe_header_problem(file)} "
            f"(safetensors says: {err}). Copy or download the file again, or re-save the checkpoint."
        ) from err
    result = {}
    for name, (shape, dtype_code) in header.items():
        if dtype_code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{file}: tensor '{name}' has dtype {dtype_code}, which this torch {torch.__version__} "
                f"cannot represent. Convert the checkpoint to a supported dtype or upgrade torch.",
                keys=[name],
            )
        result[name] = (shape, _SAFETENSORS_DTYPES[dtype_code])
    return result


class CheckpointReader:
    """Lazy, validated access to a safetensors checkpoint (one file or HF shards + index).

    ``path`` is a directory holding ``model.safetensors.index.json`` or ``model.safetensors`` (if both are
    there the single file wins, as in transformers), a path to the index file, or a path to any single
    ``.safetensors`` file. Opening reads every header and raises if the checkpoint is incomplete; tensor
    data is read only by ``get_tensor`` / ``iter_tensors``, with plain reads (no memory map, no file left
    open). ``with CheckpointReader(path) as reader:`` works as well.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.index_file: Path | None = None
        weight_map = self._locate_weight_map()  # {tensor name: shard path}

        shard_names: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            shard_names.setdefault(file, []).append(name)
        self._check_shards_exist(shard_names)

        # {name: TensorInfo}, shard by shard in file-name order, names sorted inside a shard.
        self._tensors: dict[str, TensorInfo] = {}
        for file in sorted(shard_names):
            header = _read_header(file)
            absent = [name for name in shard_names[file] if name not in header]
            if absent:
                raise MissingTensorError(
                    f"{self.index_file}: maps {len(absent)} tensor(s) to {file}, but that shard does not "
                    f"contain them: {_format_names(absent)}. The shard holds: "
                    f"{_format_names(sorted(header), 5)}. The index and the shards come from different "
                    f"saves; re-download the checkpoint or re-save it.",
                    keys=absent,
                )
            for name in sorted(shard_names[file]):
                shape, dtype = header[name]
                self._tensors[name] = TensorInfo(name, shape, dtype, file)
        self._ranges: dict[Path, dict[str, tuple[int, int]]] = {}  # shard path -> tensor name -> byte range

    def _locate_weight_map(self) -> dict[str, Path]:
        """Find the index or the single file and return {tensor name: path of the file holding it}."""
        path = self.path
        if path.is_dir():
            if (path / SINGLE_FILE_NAME).is_file():
                path = path / SINGLE_FILE_NAME
            elif (path / INDEX_FILE_NAME).is_file():
                path = path / INDEX_FILE_NAME
            else:
                found = sorted(entry.name for entry in path.iterdir())
                raise CheckpointError(
                    f"{path}: not a safetensors checkpoint: expected {INDEX_FILE_NAME} (sharded) or "
                    f"{SINGLE_FILE_NAME} (single file), found "
                    f"{_format_names(found) if found else 'an empty directory'}. "
                    f"Point to the directory the checkpoint was saved or downloaded into."
                )
        elif not path.is_file():
            raise CheckpointError(
                f"{path}: no such file or directory. Expected a checkpoint directory holding "
                f"{INDEX_FILE_NAME} or {SINGLE_FILE_NAME}, or a path to a .safetensors file."
            )
        if path.name.endswith(".index.json"):
            self.index_file = path
            return {name: path.parent / file for name, file in _read_index(path).items()}
        # A single file has no index: its header is the weight map.
        return {name: path for name in _read_header(path)}

    def _check_shards_exist(self, shard_names: dict[Path, list[str]]) -> None:
        missing = [file for file in sorted(shard_names) if not file.is_file()]
        if missing:
            lines = [f"{file} (should hold {_format_names(sorted(shard_names[file]), 3)})"
                     for file in missing]
            raise MissingShardError(
                f"{self.index_file}: {len(missing)} of {len(shard_names)} shard file(s) named by the index "
                f"do not exist:{_format_lines(lines)}\nCopy or download the missing shard(s) into "
                f"{self.index_file.parent}.",
                keys=[name for file in missing for name in shard_names[file]],
            )

    # -- mapping-like access (header only) ---------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype and file of one tensor, from the header (reads no tensor data)."""
        if name not in self._tensors:
            close = difflib.get_close_matches(name, self._tensors, n=3)
            hint = f" Similar names: {', '.join(close)}." if close else ""
            raise MissingKeysError(f"{self.path}: no tensor named '{name}' in this checkpoint.{hint}",
                                   keys=[name])
        return self._tensors[name]

    @property
    def files(self) -> list[Path]:
        """The safetensors files of this checkpoint, sorted."""
        return sorted({info.file for info in self._tensors.values()})

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the whole checkpoint (headers not counted)."""
        return sum(info.nbytes for info in self._tensors.values())

    # -- tensor data -------------------------------------------------------------------------------------

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (on CPU, with its stored dtype); nothing else is read.

        Plain positioned reads into fresh memory rather than the library's memory map: pages of a mapped
        shard stay resident (and count in the process's RSS) until the map is closed, so streaming a
        16 GB checkpoint through a map costs up to a whole shard of RAM; here a tensor's memory goes
        when the caller drops it.
        """
        info = self.info(name)
        begin, end = self._data_range(info.file, name)
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        buffer = bytearray(end - begin)
        with open(info.file, "rb") as f:
            f.seek(begin)
            if f.readinto(buffer) != len(buffer):
                raise CorruptCheckpointError(f"{info.file}: tensor '{name}' ends past the end of the file; "
                                             "the file is truncated")
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def _data_range(self, file: Path, name: str) -> tuple[int, int]:
        """Absolute byte range of a tensor's data in its file (from the header, cached per file)."""
        if file not in self._ranges:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            start = 8 + header_len
            self._ranges[file] = {key: (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
                                  for key, entry in header.items() if key != "__metadata__"}
        return self._ranges[file][name]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for every tensor, shard by shard, one tensor in memory at a time.

        Reads go through ``get_tensor`` (no memory map), so memory is one tensor at a time.
        """
        for file in self.files:
            for name in [name for name, info in self._tensors.items() if info.file == file]:
                yield name, self.get_tensor(name)

    def close(self) -> None:
        """Forget the cached header offsets; no file stays open between reads, so there is nothing else to
        release. The reader stays usable."""
        self._ranges.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CheckpointReader('{self.path}', {len(self)} tensors in {len(self.files)} file(s), "
                f"{self.total_bytes / 1e9:.2f} GB)")


# ----------------------------------------------------------------------------------------------------
# Validation


def _checkpoint_location(reader) -> str:
    """Where the checkpoint lives, for messages; works for any object with keys()/info() (a renamed view)."""
    if getattr(reader, "path", None) is not None:
        return str(reader.path)
    parents = sorted({str(reader.info(name).file.parent) for name in reader.keys()})
    return ", ".join(parents) if parents else "the checkpoint"


def validate_checkpoint(
    reader,
    expected_shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype | None = None,
    *,
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Check a checkpoint against what a model expects, from the headers only.

    reader: a CheckpointReader, or any object with ``keys()`` and ``info(name) -> TensorInfo``.
    expected_shapes: {tensor name: shape} the model needs.
    dtype: if given, every tensor must have this (floating) dtype, e.g. the config.json ``torch_dtype``.
    ignore_unexpected: names or fnmatch patterns (``model.layers.*.rotary_emb.inv_freq``) of checkpoint
        tensors the model may skip.

    Checks run in order (missing/unexpected keys, then shapes, then dtypes), and the first failing check
    raises one error listing every offending tensor of that kind.
    """
    ignore = list(ignore_unexpected)
    names = reader.keys()
    present = set(names)
    where = _checkpoint_location(reader)
    unexpected = [
        name for name in names
        if name not in expected_shapes and not any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore)
    ]
    missing = sorted(name for name in expected_shapes if name not in present)
    missing_text = (
        f"\nThe model also expects {len(missing)} tensor(s) that are not there: {_format_names(missing)}."
        if missing else ""
    )
    if unexpected:
        lines = [f"{name} (in {reader.info(name).file})" for name in unexpected]
        raise UnexpectedKeysError(
            f"{where}: {len(unexpected)} tensor(s) in the checkpoint that the model does not expect:"
            f"{_format_lines(lines)}{missing_text}\nIf the checkpoint names tensors differently, rename them "
            f"with a key map before loading; if these tensors are safe to skip, pass them in "
            f"ignore_unexpected.",
            keys=unexpected,
        )
    if missing:
        raise MissingKeysError(
            f"{where}: {len(missing)} tensor(s) the model expects are not in the checkpoint: "
            f"{_format_names(missing)}. Check that the checkpoint matches the model config (number of "
            f"layers, tied embeddings, mixer types) or map the checkpoint's names with a key map.",
            keys=missing,
        )

    wrong_shape = []
    for name in names:
        info = reader.info(name)
        if name in expected_shapes and tuple(info.shape) != tuple(expected_shapes[name]):
            wrong_shape.append((name, f"{name} in {info.file}: expected {list(expected_shapes[name])}, "
                                      f"found {list(info.shape)}"))
    if wrong_shape:
        raise ShapeMismatchError(
            f"{where}: {len(wrong_shape)} tensor(s) have the wrong shape:"
            f"{_format_lines([line for _, line in wrong_shape])}"
            f"\nThe checkpoint was saved for a different model size; check hidden_size, head counts and "
            f"vocab_size in config.json.",
            keys=[name for name, _ in wrong_shape],
        )

    if dtype is not None:
        wrong_dtype = []
        for name in names:
            info = reader.info(name)
            if info.dtype != dtype:
                kind = "" if info.dtype.is_floating_point else " (not a floating-point tensor)"
                wrong_dtype.append((name, f"{name} in {info.file}: found {info.dtype}{kind}"))
        if wrong_dtype:
            raise DtypeMismatchError(
                f"{where}: expected every tensor to be {dtype} (the dtype the model config declares, e.g. "
                f"config.json torch_dtype), but {len(wrong_dtype)} tensor(s) differ:"
                f"{_format_lines([line for _, line in wrong_dtype])}\nFix torch_dtype in config.json, "
                f"re-save the checkpoint in {dtype}, or skip the dtype check and cast on load.",
                keys=[name for name, _ in wrong_dtype],
            )


# ----------------------------------------------------------------------------------------------------
# Writing


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string: '5GB' = 5 * 10**9, '2GiB' = 2 * 2**30, '500MB', '100KB', '1.5GB'."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise ValueError(f"size {size} is negative; expected a number of bytes >= 0")
        return size
    if not isinstance(size, str):
        raise ValueError(f"size {size!r} is not an int or a string like '5GB' or '2GiB'")
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", size, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"size {size!r} is not understood; expected bytes as an int or a string like "
                         f"'500MB', '5GB' (powers of 10) or '2GiB' (powers of 2)")
    number, unit = match.group(1), (match.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if "I" in unit else 1000
    # Fraction: '1.1GB' is exactly 1100000000, where float arithmetic would round.
    return int(Fraction(number) * base**power)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_directory(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable. Directories cannot be opened on Windows."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(directory) / name)
        _fsync_directory(Path(directory))


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON so that readers see the old file or the new one, never half of it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(_json_text(obj))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a staging folder and swap it into place only when the block succeeds.

    Yields the staging directory ``.{name}.tmp-{pid}-{random}`` beside ``path`` (same filesystem, so the
    renames are atomic). On success every file is fsynced, an existing ``path`` is renamed aside to
    ``.{name}.old-...``, the staging directory is renamed to ``path``, the parent is fsynced and the old
    directory deleted: a reader sees the old checkpoint, then (after a gap of one rename in which ``path``
    does not exist) the new one, never a mix. On an exception the staging directory is removed and
    ``path`` is untouched. A process killed mid-write leaves only a hidden ``.tmp-`` directory behind.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a directory; cannot replace it with a checkpoint "
                              f"directory. Remove it or choose another output path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: that creates the directory with mode 0o700, which the checkpoint would keep.
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)  # put the previous checkpoint back
            raise
        _fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as err:  # the new checkpoint is already in place; do not fail the save for this
            warnings.warn(f"saved {target}, but could not delete the previous version moved to {old} "
                          f"({err}); delete it by hand", stacklevel=3)


class ShardedCheckpointWriter:
    """Write a checkpoint in the HF safetensors layout, one shard in memory at a time, atomically.

    Usage::

        with ShardedCheckpointWriter(out_dir, max_shard_bytes=parse_size("5GB")) as writer:
            for name, tensor in model.state_dict().items():
                writer.add(name, tensor)
            writer.write_json("config.json", config)

    Tensors are copied to CPU at ``add``. When the next tensor would push the current shard past
    ``max_shard_bytes``, the shard is written to disk first (a tensor larger than the limit gets a shard
    of its own). Nothing appears at ``directory`` until ``close()`` (called by a successful ``with``),
    which names the shards ``model-00001-of-0000M.safetensors`` + index, or a single
    ``model.safetensors`` when one shard suffices, and swaps the directory into place (see
    ``atomic_directory``). An exception inside the ``with`` leaves ``directory`` as it was.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        self.directory = Path(directory)
        self.max_shard_bytes = parse_size(max_shard_bytes)
        if self.max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes!r}")
        metadata = dict(metadata or {})
        bad = {key: value for key, value in metadata.items()
               if not (isinstance(key, str) and isinstance(value, str))}
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; these entries do not: {bad}")
        self.metadata = {"format": "pt", **metadata}

        self._current: dict[str, torch.Tensor] = {}  # the shard being filled
        self._current_bytes = 0
        self._shard_files: list[Path] = []  # shards already flushed, in staging, with temporary names
        self._shard_of: dict[str, int] = {}  # tensor name -> 0-based shard number
        self._extra_files: set[str] = set()
        self.total_size = 0
        self._closed = False
        # Enter the staging context by hand: it must stay open across add() calls until close() or abort().
        self._atomic = atomic_directory(self.directory)
        self._staging = self._atomic.__enter__()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; may write the current shard to disk first."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in self._shard_of:
            raise ValueError(f"tensor '{name}' was already added to the checkpoint for {self.directory}; "
                             f"every tensor name must be unique")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor '{name}': expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.is_meta or tensor.layout != torch.strided:
            where = "on the meta device" if tensor.is_meta else tensor.layout
            raise ValueError(f"tensor '{name}' is {where}; only dense tensors with data can be saved")
        # Always copy: the checkpoint must hold the values at add() time even if the caller keeps updating
        # the tensor in place before this shard is flushed, and safetensors refuses tensors that share
        # storage (tied weights, views). The copy costs at most one shard of memory.
        tensor = tensor.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
        nbytes = tensor.numel() * tensor.element_size()
        if self._current and self._current_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._current[name] = tensor
        self._current_bytes += nbytes
        self._shard_of[name] = len(self._shard_files)
        self.total_size += nbytes

    def _flush(self) -> None:
        """Write the current shard into staging under a temporary name (renamed once the count is known)."""
        file = self._staging / f"shard-{len(self._shard_files) + 1:05d}.safetensors.partial"
        save_file(self._current, str(file), metadata=self.metadata)
        self._shard_files.append(file)
        self._current = {}
        self._current_bytes = 0

    def _extra_path(self, relative_path: str | os.PathLike) -> Path:
        relative = Path(relative_path)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"'{relative_path}': extra files go inside the checkpoint directory; give a "
                             f"relative path without '..'")
        name = relative.as_posix()
        if name == INDEX_FILE_NAME or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name):
            raise ValueError(f"'{name}' is written by the checkpoint writer itself; add tensors with add()")
        if name in self._extra_files:
            raise ValueError(f"'{name}' was already added to the checkpoint for {self.directory}")
        self._extra_files.add(name)
        path = self._staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_json(self, relative_path: str | os.PathLike, obj) -> None:
        """Add a JSON file (config.json, generation_config.json, ...) to the checkpoint."""
        self._check_open()
        self._extra_path(relative_path).write_text(_json_text(obj), encoding="utf-8")

    def copy_file(self, src: str | os.PathLike, relative_path: str | os.PathLike | None = None) -> None:
        """Copy a file (tokenizer files, README, ...) into the checkpoint; by default under its own name."""
        self._check_open()
        src = Path(src)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such file to copy into the checkpoint for {self.directory}")
        shutil.copyfile(src, self._extra_path(src.name if relative_path is None else relative_path))

    def close(self) -> None:
        """Write the last shard, name the shards, write the index, fsync, swap the directory into place."""
        if self._closed:
            return
        try:
            if not self._shard_of:
                raise ValueError(f"no tensors were added to the checkpoint for {self.directory}; "
                                 f"nothing to save")
            self._flush()
            count = len(self._shard_files)
            if count == 1:
                final_names = [SINGLE_FILE_NAME]
            else:
                final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
            for file, final_name in zip(self._shard_files, final_names):
                os.rename(file, self._staging / final_name)
            if count > 1:
                weight_map = {name: final_names[shard] for name, shard in sorted(self._shard_of.items())}
                index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
                (self._staging / INDEX_FILE_NAME).write_text(_json_text(index), encoding="utf-8")
        except BaseException as err:
            self.abort(err)
            raise
        self._closed = True
        self._atomic.__exit__(None, None, None)

    def abort(self, error: BaseException | None = None) -> None:
        """Throw away everything written so far; ``directory`` stays as it was."""
        if self._closed:
            return
        self._closed = True
        self._current = {}
        error = error or RuntimeError("checkpoint write aborted")
        # Re-enters atomic_directory's failure path, which deletes the staging directory.
        self._atomic.__exit__(type(error), error, error.__traceback__)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the checkpoint writer for {self.directory} is already closed")

    def __enter__(self) -> ShardedCheckpointWriter:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc_value)


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    extra_json: dict[str, object] | None = None,
) -> Path:
    """Save a state dict (and e.g. ``{"config.json": config}``) as a checkpoint directory; return its path."""
    with ShardedCheckpointWriter(directory, max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in state_dict.items():
            writer.add(name, tensor)
        for relative_path, obj in (extra_json or {}).items():
            writer.write_json(relative_path, obj)
    return Path(directory)
