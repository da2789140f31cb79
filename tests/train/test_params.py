"""Trainable-parameter selection by pattern and the muP AdamW groups, on the tiny teacher and a tiny SALA."""

import re

import pytest
import torch

from sala_train.models import MiniCPMConfig, MiniCPMForCausalLM, SALAConfig, SALAForCausalLM
from sala_train.train.params import TrainableSelectionError, build_adamw, param_groups, select_trainable
from sala_train.train.schedules import set_learning_rate

# hidden 64 over dim_model_base 16: width multiplier 4
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.05, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, scale_emb=12.0, scale_depth=1.4, dim_model_base=16)
MIXER_TYPES = ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"]


def tiny_teacher(**overrides) -> MiniCPMForCausalLM:
    torch.manual_seed(0)
    return MiniCPMForCausalLM(MiniCPMConfig(**{**TINY, **overrides}))


def tiny_sala(mixer_types=MIXER_TYPES, **overrides) -> SALAForCausalLM:
    torch.manual_seed(0)
    config = SALAConfig(**{**TINY, **overrides}, mixer_types=list(mixer_types), lightning_nh=4, lightning_nkv=4,
                        lightning_head_dim=16, lightning_backend="torch", sparse_backend="torch")
    return SALAForCausalLM(config)


def names_matching(model, regex: str) -> list[str]:
    return [name for name, _ in model.named_parameters() if re.fullmatch(regex, name)]


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# -- selection --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shortcut,regex", [
    ("lightning", r"model\.layers\.[12]\.self_attn\..*"),
    ("sparse", r"model\.layers\.[03]\.self_attn\..*"),
    ("mixers", r"model\.layers\.\d\.self_attn\..*"),
    ("mlp", r"model\.layers\.\d\.mlp\..*"),
    ("norms", r".*norm\.weight"),
    ("embeddings", r"model\.embed_tokens\.weight|lm_head\.weight"),
    ("all", r".*"),
])
def test_shortcuts_on_sala(shortcut, regex):
    model = tiny_sala()
    selected = select_trainable(model, include=[shortcut])
    expected = names_matching(model, regex)
    assert selected == expected and expected
    assert trainable_names(model) == expected


def test_lightning_shortcut_follows_mixer_types():
    model = tiny_sala(mixer_types=["lightning-attn", "minicpm4", "minicpm4", "lightning-attn"])
    assert select_trainable(model, ["lightning"]) == names_matching(model, r"model\.layers\.[03]\.self_attn\..*")


def test_globs_regexes_and_exclude():
    model = tiny_sala()
    selected = select_trainable(model, include=["model.layers.*.mlp.*", r"re:model\.layers\.1\..*"],
                                exclude=["*up_proj*", "norms"])
    expected = [name for name in names_matching(model, r"model\.layers\.\d\.mlp\..*|model\.layers\.1\..*")
                if "up_proj" not in name and not name.endswith("norm.weight")]
    assert selected == expected
    assert trainable_names(model) == expected


def test_a_second_selection_replaces_the_first():
    model = tiny_sala()
    select_trainable(model, ["lightning"])
    select_trainable(model, ["sparse"])
    assert trainable_names(model) == names_matching(model, r"model\.layers\.[03]\.self_attn\..*")


def test_tied_head_is_selected_under_either_name():
    model = tiny_teacher(tie_word_embeddings=True)
    assert select_trainable(model, ["lm_head.weight"]) == ["model.embed_tokens.weight"]
    assert model.lm_head.weight.requires_grad


@pytest.mark.parametrize("include,exclude,message", [
    (["lightening"], [], "'lightening' matches no parameter"),
    (["all"], ["model.layers.*.mpl.*"], "exclude pattern 'model.layers.\\*.mpl.\\*' matches no parameter"),
    (["re:model.layers.(0"], [], "not a valid regular expression"),
    (["mlp"], ["all"], "leaves no parameter"),
    ([], [], "include is empty"),
    ("lightning", [], "lists of patterns"),
])
def test_bad_patterns_fail_naming_the_pattern(include, exclude, message):
    with pytest.raises(TrainableSelectionError, match=message):
        select_trainable(tiny_sala(), include, exclude)


def test_mixer_kind_shortcuts_need_a_hybrid_model():
    with pytest.raises(TrainableSelectionError, match="'lightning' needs a hybrid model"):
        select_trainable(tiny_teacher(), ["lightning"])
    # a hybrid without sparse layers: "sparse" matches nothing
    with pytest.raises(TrainableSelectionError, match="'sparse' matches no parameter"):
        select_trainable(tiny_sala(mixer_types=["lightning-attn"] * 4), ["sparse"])


# -- muP groups ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_model", [tiny_teacher, tiny_sala], ids=["teacher", "sala"])
def test_mup_groups_follow_the_rule(make_model):
    model = make_model()
    assert model.config.width_multiplier == 4.0
    groups = {group["name"]: group for group in param_groups(model, lr=1e-2, weight_decay=0.1)}
    assert set(groups) == {"matrices", "vocabulary", "vectors"}

    # every trainable parameter in exactly one group, names aligned with tensors
    named = dict(model.named_parameters())
    listed = [name for group in groups.values() for name in group["param_names"]]
    assert sorted(listed) == sorted(named)
    for group in groups.values():
        assert all(named[name] is p for name, p in zip(group["param_names"], group["params"]))

    layer_weights = names_matching(model, r"model\.layers\.\d\..*\.weight")
    assert groups["matrices"]["param_names"] == [name for name in layer_weights if not name.endswith("norm.weight")]
    assert groups["vocabulary"]["param_names"] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert groups["vectors"]["param_names"] == names_matching(model, r".*norm\.weight")
    expected = {"matrices": (0.25, 0.1), "vocabulary": (1.0, 0.0), "vectors": (1.0, 0.0)}
    for name, (lr_scale, weight_decay) in expected.items():
        assert groups[name]["lr_scale"] == lr_scale
        assert groups[name]["lr"] == pytest.approx(1e-2 * lr_scale)
        assert groups[name]["weight_decay"] == weight_decay


def test_groups_hold_only_trainable_parameters():
    model = tiny_sala()
    select_trainable(model, ["lightning"])
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    assert [group["name"] for group in groups] == ["matrices", "vectors"]  # q/k/o norms of the lightning mixers
    listed = [name for group in groups for name in group["param_names"]]
    assert sorted(listed) == sorted(trainable_names(model))


def test_options_mup_off_and_decayed_vocabulary():
    model = tiny_teacher(tie_word_embeddings=True)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1, mup=False, decay_vocabulary=True)}
    assert groups["matrices"]["lr_scale"] == 1.0
    assert groups["vocabulary"]["param_names"] == ["model.embed_tokens.weight"]  # tied: one tensor
    assert groups["vocabulary"]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="no trainable parameter"):
        for p in model.parameters():
            p.requires_grad_(False)
        param_groups(model, lr=1e-3, weight_decay=0.1)


def test_adamw_step_sizes_follow_the_groups():
    # Adam's first update is lr * g / (|g| + eps) = lr * sign(g) per entry: the step size shows each group's LR.
    model = tiny_sala()
    optimizer = build_adamw(model, lr=1.0, weight_decay=0.0, eps=1e-30)
    set_learning_rate(optimizer, 1e-2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    for group in optimizer.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            step = (p.detach() - before[name]).abs()
            assert torch.allclose(step, torch.full_like(step, 1e-2 * group["lr_scale"]), rtol=1e-4), name


def test_adamw_decays_only_matrices():
    # With zero gradients the Adam update is 0 and only the decoupled decay p *= 1 - lr * weight_decay remains.
    model = tiny_teacher()
    optimizer = build_adamw(model, lr=1e-2, weight_decay=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for group in optimizer.param_groups:
        factor = 1 - 1e-2 * group["lr_scale"] * group["weight_decay"]
        for name, p in zip(group["param_names"], group["params"]):
            torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {
        "matrices": 0.5, "vocabulary": 0.0, "vectors": 0.0}
