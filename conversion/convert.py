"""MiniCPM-4 checkpoint + LayerPlan -> SALA checkpoint (SPEC section 3): a config rewrite plus a weight
adapter, streamed tensor by tensor so that an 8B checkpoint converts in a few GiB of RAM.

    embeddings, MLPs, norms, lm_head     copied
    sparse layers                        q/k/v/o copied; o_gate created (random, like other projections);
                                         no RoPE (HyPE: attn_use_rope false)
    lightning layers                     q/o copied; k/v expanded from the KV heads to all heads (head i takes
                                         KV head i // group); q_norm, k_norm, o_norm = 1; z_proj created
                                         (random); or all of them from aligned students (HALO stage 1)

Verification mode (``verify=True``): every layer stays attention with RoPE and without gate, dense at any
length: the converted model must reproduce the teacher's logits (the invariant of STYLE habit 4).
Every tensor mapped, created or dropped goes into ``conversion_report.json`` / ``.md``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sala_train.checkpoint import CheckpointReader, ShardedCheckpointWriter, parse_size, validate_checkpoint
from sala_train.layer_selection import LayerPlan, LayerPlanError
from sala_train.models import MiniCPMForCausalLM
from sala_train.models.minicpm import init_std

log = logging.getLogger(__name__)

# files of a teacher directory that travel to the student unchanged
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "generation_config.json")


class ConversionError(ValueError):
    """The teacher, plan or output cannot be converted; nothing was written."""


@dataclass
class ConversionReport:
    teacher: str
    output: str
    plan: str
    mapped: list[tuple[str, str, list[int], str]] = field(default_factory=list)  # source, target, shape, how
    created: list[tuple[str, list[int], str]] = field(default_factory=list)  # target, shape, init
    dropped: list[tuple[str, str]] = field(default_factory=list)  # source, why

    def to_markdown(self) -> str:
        lines = [f"# Conversion report", "", f"teacher `{self.teacher}` -> `{self.output}`, plan `{self.plan}`", "",
                 f"{len(self.mapped)} mapped, {len(self.created)} created, {len(self.dropped)} dropped", "",
                 "| target | shape | from |", "|---|---|---|"]
        lines += [f"| {t} | {s} | {how}: `{src}` |" for src, t, s, how in self.mapped]
        lines += [f"| {t} | {s} | created: {init} |" for t, s, init in self.created]
        if self.dropped:
            lines += ["", "Dropped:", ""] + [f"- `{src}`: {why}" for src, why in self.dropped]
        return "\n".join(lines) + "\n"


def sala_config_for(teacher_config, plan: LayerPlan, *, sparse_config: dict | None = None, verify: bool = False):
    """The student's MiniCPMSALAConfig: the teacher's keys plus the hybrid keys of SPEC 2.4."""
    from sala_train.models.sala import MiniCPMSALAConfig

    values = teacher_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype"):
        values.pop(key, None)
    values.pop("sparse_config", None)  # MiniCPM4's own InfLLM-V2 settings: replaced by the student's
    hybrid = dict(
        mixer_types=plan.mixer_types(),
        sparse_config=dict(sparse_config or {}),
        attn_use_rope=False,
        attn_use_output_gate=True,
        lightning_use_rope=True,
        lightning_nh=teacher_config.num_attention_heads,
        lightning_nkv=teacher_config.num_attention_heads,
        lightning_head_dim=teacher_config.head_dim,
        lightning_scale="1/sqrt(d)",
        qk_norm=True,
        use_output_gate=True,
        use_output_norm=True,
    )
    # max_position_embeddings and rope_scaling stay the teacher's (in `values`): the lightning layers use the
    # teacher's rotary settings, LongRoPE factors included, so that the verification mode is exact
    if verify:
        hybrid.update(mixer_types=["minicpm4"] * len(plan), attn_use_rope=True, attn_use_output_gate=False,
                      sparse_config={**hybrid["sparse_config"], "dense_len": 2**62})
    return MiniCPMSALAConfig(**values, **hybrid)


def _load_teacher(teacher_dir: Path) -> tuple:
    if not teacher_dir.is_dir():
        raise ConversionError(f"teacher directory {teacher_dir} does not exist")
    config = MiniCPMForCausalLM.load_config(teacher_dir)
    if getattr(config, "model_type", "minicpm") != "minicpm":
        raise ConversionError(f"{teacher_dir}/config.json: model_type is {config.model_type!r}, expected 'minicpm'")
    return config


def convert(
    teacher_dir: str | Path,
    plan: LayerPlan,
    output_dir: str | Path,
    *,
    sparse_config: dict | None = None,
    aligned: str | Path | None = None,
    verify: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert a MiniCPM-4 checkpoint into a SALA checkpoint; see the module docstring.

    ``aligned``: a safetensors checkpoint (file or directory) of aligned lightning students, tensors named as
    in the student (``model.layers.{i}.self_attn.*``); they replace the initial weights of those layers.
    Raises ConversionError (or a CheckpointError naming the file) before anything is written.
    """
    from sala_train.models.sala import MiniCPMSALAForCausalLM
    from sala_train.models.sala.remote_code import write_remote_code

    teacher_dir, output_dir = Path(teacher_dir), Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"output directory {output_dir} exists; remove it or pass overwrite=True")
    teacher_config = _load_teacher(teacher_dir)
    try:
        plan.validate(teacher_config.num_hidden_layers, source=f"layer plan {plan.format()}")
    except LayerPlanError as err:
        raise ConversionError(f"{err} (teacher {teacher_dir})") from err
    config = sala_config_for(teacher_config, plan, sparse_config=sparse_config, verify=verify)
    target_shapes = MiniCPMSALAForCausalLM.expected_tensor_shapes(config)
    report = ConversionReport(str(teacher_dir), str(output_dir), "attention (verify)" if verify else plan.format())

    reader = CheckpointReader(teacher_dir)
    ignore = ["lm_head.weight"] if teacher_config.tie_word_embeddings else []
    validate_checkpoint(reader, MiniCPMForCausalLM.expected_tensor_shapes(teacher_config), None,
                        ignore_unexpected=ignore)
    aligned_reader = CheckpointReader(aligned) if aligned is not None else None
    kinds = ["sparse" if verify else k for k in plan.kinds]
    group = teacher_config.num_key_value_groups
    generator = torch.Generator().manual_seed(seed)
    out_dtype = dtype

    def emit(writer, name, tensor):
        expected = target_shapes.pop(name)
        if tuple(tensor.shape) != tuple(expected):
            raise ConversionError(f"internal: {name} has shape {list(tensor.shape)}, expected {list(expected)}")
        writer.add(name, tensor.to(out_dtype) if out_dtype is not None else tensor)

    with ShardedCheckpointWriter(output_dir, max_shard_bytes=parse_size(max_shard_size)) as writer:
        names = [n for n in reader.keys() if n not in ignore]
        for name in tqdm(names, desc="converting", unit="tensor", disable=not progress):
            tensor = reader.get_tensor(name)
            out_dtype = dtype or tensor.dtype
            layer, _, rest = _split_layer(name)
            if layer is None or not rest.startswith("self_attn."):
                emit(writer, name, tensor)
                report.mapped.append((name, name, list(tensor.shape), "copy"))
                continue
            projection = rest.removeprefix("self_attn.")
            if aligned_reader is not None and kinds[layer] == "lightning" and name in aligned_reader:
                continue  # written from the aligned student below
            if kinds[layer] == "sparse" or projection in ("q_proj.weight", "o_proj.weight"):
                emit(writer, name, tensor)
                report.mapped.append((name, name, list(tensor.shape), "copy"))
            elif projection in ("k_proj.weight", "v_proj.weight"):
                d = teacher_config.head_dim
                expanded = tensor.view(-1, d, tensor.shape[-1]).repeat_interleave(group, dim=0).reshape(-1, tensor.shape[-1])
                emit(writer, name, expanded)
                report.mapped.append((name, name, list(expanded.shape), f"KV heads repeated x{group}"))
            else:
                report.dropped.append((name, "no counterpart in a lightning layer"))
        # tensors the teacher does not have: aligned students, then new parameters
        for name in sorted(target_shapes, key=_natural_key):
            shape = target_shapes[name]
            if aligned_reader is not None and name in aligned_reader:
                tensor = aligned_reader.get_tensor(name)
                emit(writer, name, tensor)
                report.mapped.append((str(aligned), name, list(shape), "aligned student"))
                continue
            if name.endswith("norm.weight"):
                emit(writer, name, torch.ones(shape))
                report.created.append((name, list(shape), "ones"))
            else:
                std = init_std(config, name)
                emit(writer, name, torch.empty(shape).normal_(0.0, std, generator=generator))
                report.created.append((name, list(shape), f"normal(0, {std:.4g})"))
        if target_shapes:  # pragma: no cover - guarded by expected_tensor_shapes
            raise ConversionError(f"tensors never produced: {sorted(target_shapes)[:10]}")

        hf = config.to_dict()
        hf["architectures"] = ["MiniCPMSALAForCausalLM"]
        hf["dtype"] = hf["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        writer.write_json("config.json", hf)
        for file in TOKENIZER_FILES:
            if (teacher_dir / file).is_file():
                writer.copy_file(teacher_dir / file, file)
        with tempfile.TemporaryDirectory() as code_dir:
            write_remote_code(code_dir)
            for path in sorted(Path(code_dir).iterdir()):
                writer.copy_file(path, path.name)
        writer.write_json("conversion_report.json", {
            "teacher": report.teacher, "plan": report.plan, "mapped": report.mapped, "created": report.created,
            "dropped": report.dropped, "plan_evidence": plan.evidence})
        with tempfile.TemporaryDirectory() as tmp:
            md = Path(tmp) / "conversion_report.md"
            md.write_text(report.to_markdown())
            writer.copy_file(md, md.name)
    reader.close()
    if aligned_reader is not None:
        aligned_reader.close()
    log.info("converted %s -> %s: %d mapped, %d created, %d dropped", teacher_dir, output_dir, len(report.mapped),
             len(report.created), len(report.dropped))
    return report


def _split_layer(name: str) -> tuple[int | None, str, str]:
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]), ".".join(parts[:3]), ".".join(parts[3:])
    return None, "", name


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]
