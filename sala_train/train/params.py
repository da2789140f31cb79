"""Which parameters a stage trains, and the muP-aware AdamW parameter groups.

Trainable selection (``select_trainable``) takes patterns over parameter names:

    "all", "mixers", "lightning", "sparse", "mlp", "norms", "embeddings"   named shortcuts (SHORTCUTS)
    "model.layers.*.mlp.*"                                                glob (fnmatch, whole name)
    "re:model\\.layers\\.(0|3)\\..*"                                      regular expression (whole name)

"lightning" and "sparse" are the mixers (``model.layers.{i}.self_attn``) of the layers that
``config.mixer_types`` marks as such, so the conversion stage is ``include=["lightning"]``.

muP parameter groups (``param_groups``). MiniCPM trains with muP and the paper's LRs are base rates (SPEC 6).
The rule implemented here, with w = config.width_multiplier = hidden_size / dim_model_base:

    group        parameters                                   lr_scale   weight decay
    matrices     2-D weights of the decoder layers            1 / w      weight_decay
                 (attention / mixer projections, MLP)
    vocabulary   embed_tokens and lm_head (one tensor if tied)  1          0 (decay_vocabulary=True: weight_decay)
    vectors      norms and any bias or other < 2-D tensor      1          0

The hidden matrices are muP's "matrix-like" parameters (both dimensions grow with width): Adam's update of
size ~lr per entry would grow their effect on the output with width, so their LR shrinks as 1/w. The
embedding and the output head are "vector-like" (one dimension is the vocabulary): the embedding keeps the
base LR (as in MiniCPM), and so does the head, because MiniCPM's forward already divides the head's input by
w (``lm_head(h / w)``, muP's MuReadout); scaling its LR as well would count the width twice. Weight decay is
AdamW's decoupled decay (``p -= lr * weight_decay * p``), so a matrix decays with its own, scaled LR.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from sala_train.models.sala import LIGHTNING, SPARSE

SHORTCUTS = {
    "all": "every parameter",
    "mixers": "the attention / mixer of every layer (model.layers.{i}.self_attn)",
    "lightning": "the mixers of the layers config.mixer_types marks 'lightning-attn'",
    "sparse": "the mixers of the layers config.mixer_types marks 'minicpm4' (sparse attention)",
    "mlp": "the MLP of every layer",
    "norms": "every RMSNorm weight (layer norms, final norm, q/k/o norms of the mixers)",
    "embeddings": "embed_tokens and lm_head",
}
REGEX_PREFIX = "re:"

_LAYER_MIXER = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.")


class TrainableSelectionError(ValueError):
    """A trainable-parameter pattern that is unknown, invalid or matches nothing; the message names it."""


def _mixer_kind_layers(model: nn.Module, kind: str, shortcut: str) -> set[int]:
    mixer_types = getattr(getattr(model, "config", None), "mixer_types", None)
    if mixer_types is None:
        raise TrainableSelectionError(
            f"trainable pattern {shortcut!r} needs a hybrid model whose config has mixer_types; "
            f"{type(model).__name__} has none (use 'mixers' or a name pattern instead)")
    wanted = {"lightning": LIGHTNING, "sparse": SPARSE}[kind]
    return {i for i, mixer_type in enumerate(mixer_types) if mixer_type == wanted}


def _matcher(model: nn.Module, pattern: str) -> Callable[[str], bool]:
    """A predicate over parameter names for one pattern (shortcut, ``re:`` regex or glob)."""
    if pattern == "all":
        return lambda name: True
    if pattern == "mixers":
        return lambda name: _LAYER_MIXER.search(name) is not None
    if pattern in ("lightning", "sparse"):
        layers = _mixer_kind_layers(model, pattern, pattern)

        def in_layers(name: str) -> bool:
            found = _LAYER_MIXER.search(name)
            return found is not None and int(found.group(1)) in layers

        return in_layers
    if pattern == "mlp":
        return lambda name: ".mlp." in name
    if pattern == "norms":
        return lambda name: name.endswith("norm.weight")
    if pattern == "embeddings":
        return lambda name: "embed_tokens." in name or name.startswith("lm_head.") or ".lm_head." in name
    if pattern.startswith(REGEX_PREFIX):
        try:
            regex = re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as err:
            raise TrainableSelectionError(
                f"trainable pattern {pattern!r} is not a valid regular expression: {err}") from err
        return lambda name: regex.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def match_parameters(model: nn.Module, pattern: str) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters ``pattern`` selects. A tied
    parameter matches under any of its names (``lm_head.weight`` selects a tied embedding)."""
    matches = _matcher(model, pattern)
    canonical = {id(p): name for name, p in model.named_parameters()}
    found = {canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if matches(name)}
    return [name for name in canonical.values() if name in found]


def select_trainable(model: nn.Module, include: Sequence[str] = ("all",), exclude: Sequence[str] = ()) -> list[str]:
    """Make exactly the parameters matched by ``include`` and by none of ``exclude`` trainable.

    Sets ``requires_grad`` on every parameter of ``model`` and returns the trainable names in model order.
    Raises TrainableSelectionError for a pattern that matches no parameter (a typo must not silently
    freeze or train the wrong layers), for an invalid regex, and when nothing is left to train.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TrainableSelectionError("include and exclude are lists of patterns, e.g. include=['lightning']")
    if not include:
        raise TrainableSelectionError("include is empty: name what to train (e.g. ['all'] or ['lightning'])")

    def union(patterns: Sequence[str], role: str) -> set[str]:
        selected = set()
        for pattern in patterns:
            names = match_parameters(model, pattern)
            if not names:
                examples = ", ".join(name for name, _ in list(model.named_parameters())[:4])
                raise TrainableSelectionError(
                    f"{role} pattern {pattern!r} matches no parameter of {type(model).__name__}. Patterns are "
                    f"shortcuts {sorted(SHORTCUTS)}, globs over names ('model.layers.*.mlp.*') or regexes "
                    f"('{REGEX_PREFIX}...'); names look like: {examples}, ...")
            selected.update(names)
        return selected

    trainable = union(include, "include") - union(exclude, "exclude")
    if not trainable:
        raise TrainableSelectionError(f"include {list(include)} minus exclude {list(exclude)} leaves no parameter "
                                      "to train")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        if name in trainable:
            names.append(name)
    return names


# -- muP parameter groups ---------------------------------------------------------------------------------

def param_groups(model: nn.Module, lr: float, weight_decay: float, *, mup: bool = True,
                 width_multiplier: float | None = None, decay_vocabulary: bool = False) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of ``model`` under the muP rule of this module.

    Returns up to three groups (empty ones are left out), each a dict with ``params``, ``param_names``,
    ``name`` ("matrices", "vocabulary", "vectors"), ``lr_scale``, ``lr = lr * lr_scale`` and
    ``weight_decay``. Schedules set ``group["lr"] = schedule_lr * group["lr_scale"]``
    (``sala_train.train.schedules.set_learning_rate``). ``mup=False`` gives every group lr_scale 1.
    ``width_multiplier`` defaults to ``model.config.width_multiplier``.
    """
    if width_multiplier is None:
        width_multiplier = getattr(getattr(model, "config", None), "width_multiplier", 1.0) if mup else 1.0
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier = {width_multiplier!r}: expected a positive number")
    vocabulary_ids = {id(p) for module in _vocabulary_modules(model) for p in module.parameters()}

    groups = {
        "matrices": dict(lr_scale=1.0 / width_multiplier if mup else 1.0, weight_decay=weight_decay),
        "vocabulary": dict(lr_scale=1.0, weight_decay=weight_decay if decay_vocabulary else 0.0),
        "vectors": dict(lr_scale=1.0, weight_decay=0.0),
    }
    for group in groups.values():
        group.update(params=[], param_names=[])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in vocabulary_ids:
            group = groups["vocabulary"]
        elif param.ndim >= 2:
            group = groups["matrices"]
        else:
            group = groups["vectors"]
        group["params"].append(param)
        group["param_names"].append(name)
    if not any(group["params"] for group in groups.values()):
        raise ValueError(f"{type(model).__name__} has no trainable parameter (see select_trainable)")
    return [dict(name=name, lr=lr * group["lr_scale"], **group) for name, group in groups.items() if group["params"]]


def _vocabulary_modules(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the output head (HF's accessors; nn.Embedding modules as a fallback)."""
    modules = []
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, accessor, lambda: None)()
        if module is not None:
            modules.append(module)
    if not modules:
        modules = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return modules


def build_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                eps: float = 1e-8, *, mup: bool = True, decay_vocabulary: bool = False) -> torch.optim.AdamW:
    """torch AdamW over ``param_groups(model, ...)`` (the trainable parameters only)."""
    groups = param_groups(model, lr, weight_decay, mup=mup, decay_vocabulary=decay_vocabulary)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
