"""``from_pretrained`` / ``save_pretrained`` on top of sala_train.checkpoint.

Ours rather than transformers': tensors stream one at a time from the shards into a model built on the
meta device (an 8B checkpoint never sits in RAM twice), every problem is reported with the file and
tensor at fault, and saving is atomic. The layout is the standard HF one, so transformers can read it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointReader, ShardedCheckpointWriter, TensorInfo, parse_size, validate_checkpoint

# Arguments transformers' Auto classes pass along that mean nothing for a local directory.
_HUB_KWARGS = {
    "trust_remote_code", "cache_dir", "revision", "local_files_only", "token", "use_auth_token", "subfolder",
    "_from_auto", "_from_pipeline", "adapter_kwargs", "proxies", "force_download", "resume_download",
    "code_revision", "low_cpu_mem_usage", "use_safetensors", "attn_implementation", "device_map",
    "_commit_hash", "user_agent",
}

KeyMap = Mapping[str, str] | Callable[[str], str | None] | None


def rename_key(name: str, key_map: KeyMap) -> str | None:
    """Apply a key map: a callable (None = drop the tensor) or {regex: replacement} applied in order."""
    if key_map is None:
        return name
    if callable(key_map):
        return key_map(name)
    for pattern, replacement in key_map.items():
        name = re.sub(pattern, replacement, name)
    return name


class _RenamedView:
    """A CheckpointReader seen through a key map, for validation (keys() and info() only)."""

    def __init__(self, reader: CheckpointReader, key_map: KeyMap, ignore: set[str]):
        self.reader = reader
        self.source_name: dict[str, str] = {}
        for name in reader.keys():
            new = rename_key(name, key_map)
            if new is None or new in ignore:
                continue
            if new in self.source_name:
                raise ValueError(f"key map sends both '{self.source_name[new]}' and '{name}' to '{new}'")
            self.source_name[new] = name

    def keys(self) -> list[str]:
        return list(self.source_name)

    def __contains__(self, name: str) -> bool:
        return name in self.source_name

    def info(self, name: str) -> TensorInfo:
        info = self.reader.info(self.source_name[name])
        return info._replace(name=name)


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")


class CheckpointMixin:
    """Mixed into our PreTrainedModel classes. Subclasses define ``config_class`` and
    ``expected_tensor_shapes(config)``."""

    @classmethod
    def load_config(cls, path: str | os.PathLike, **overrides):
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: no config.json in the checkpoint directory {path}")
        try:
            with open(config_file) as f:
                config_dict = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file}: not valid JSON ({err})") from err
        config_dict.update(overrides)
        try:
            return cls.config_class.from_dict(config_dict)
        except ValueError as err:
            raise type(err)(f"{config_file}: {err}") from err

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config=None,
        dtype=None,
        torch_dtype=None,
        device: str | torch.device | None = None,
        key_map: KeyMap = None,
        check_dtype: bool = True,
        **kwargs,
    ):
        """Build the model from a checkpoint directory, streaming tensors one at a time.

        ``dtype``: the dtype of the loaded parameters (default: the config's ``dtype``/``torch_dtype``,
        else float32). ``key_map``: renames checkpoint keys, {regex: replacement} or a callable (return
        None to skip a tensor). ``check_dtype``: every floating tensor must have the dtype config.json
        declares. Remaining keyword arguments override config values.
        """
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path}: not a checkpoint directory (expected config.json and model.safetensors or "
                f"model.safetensors.index.json in it); download hub models first, e.g. `hf download <repo>`"
            )
        overrides = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}
        if config is None:
            config = cls.load_config(path, **overrides)
        else:
            for key, value in overrides.items():
                setattr(config, key, value)
        declared_dtype = _resolve_dtype(getattr(config, "dtype", None))
        dtype = _resolve_dtype(dtype or torch_dtype) or declared_dtype or torch.float32

        ignore = set()
        if config.tie_word_embeddings:
            ignore.add("lm_head.weight")  # some writers store the tied head; it is the embedding
        with CheckpointReader(path) as reader:
            view = _RenamedView(reader, key_map, ignore)
            validate_checkpoint(view, cls.expected_tensor_shapes(config), declared_dtype if check_dtype else None)

            with torch.device("meta"):
                model = cls(config, *model_args)
            for name, source in view.source_name.items():
                tensor = reader.get_tensor(source).to(device=device or "cpu", dtype=dtype)
                _assign(model, name, tensor)
        model.finish_loading(device or "cpu")
        model.eval()
        return model

    def finish_loading(self, device) -> None:
        """Tie weights and rebuild non-persistent buffers after tensors were assigned into a meta model."""
        if self.config.tie_word_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.get_input_embeddings().weight
        for module in self.modules():
            if hasattr(module, "reset_parameters") and any(
                b.device.type == "meta" for b in module.buffers(recurse=False)
            ):
                module.to_empty(device=device, recurse=False)
                module.reset_parameters()
        leftover = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.device.type == "meta"]
        if leftover:
            raise RuntimeError(f"tensors never loaded (still on the meta device): {leftover[:10]}")

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        dtype=None,
        tokenizer=None,
        **unused,
    ) -> Path:
        """Write config.json, generation_config.json, sharded safetensors (+ index) and, if given, the
        tokenizer (an object with save_pretrained or a directory), atomically replacing the directory."""
        save_directory = Path(save_directory)
        dtype = _resolve_dtype(dtype)
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        saved_dtype = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        config = self.config.to_dict()
        config["architectures"] = [type(self).__name__]
        config["dtype"] = config["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
        generation = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        with (
            tempfile.TemporaryDirectory(prefix="sala-tokenizer-") as scratch,
            ShardedCheckpointWriter(save_directory, max_shard_bytes=parse_size(max_shard_size)) as writer,
        ):
            for name, tensor in state.items():
                writer.add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
            writer.write_json("config.json", config)
            writer.write_json("generation_config.json", generation)
            for source in _tokenizer_files(tokenizer, Path(scratch)):
                writer.copy_file(source, source.name)
        return save_directory


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    if isinstance(old, nn.Parameter):
        setattr(module, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        setattr(module, leaf, tensor)


def _tokenizer_files(tokenizer, scratch: Path) -> list[Path]:
    """The files of a tokenizer object (saved into ``scratch``) or of a tokenizer directory."""
    if tokenizer is None:
        return []
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(scratch)
        source = scratch
    else:
        source = Path(tokenizer)
        if not source.is_dir():
            raise FileNotFoundError(f"tokenizer directory {source} does not exist")
    skip = {"config.json", "generation_config.json", "model.safetensors.index.json"}
    return [p for p in sorted(source.iterdir())
            if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors")]
