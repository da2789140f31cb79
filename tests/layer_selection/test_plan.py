import json

import pytest

from sala_train.layer_selection import LayerPlan, LayerPlanError

SALA = "SLLLLLLLLSLLLLLLSSLLLLSLLLLLLSSS"


def test_released_minicpm_sala_layout():
    plan = LayerPlan.parse(SALA)
    assert plan.sparse_layers == [0, 9, 16, 17, 22, 29, 30, 31]
    assert len(plan) == 32 and plan.format() == SALA
    types = plan.mixer_types()
    assert types[0] == "minicpm4" and types[1] == "lightning-attn"
    assert LayerPlan.from_mixer_types(types) == plan


def test_json_round_trip_keeps_evidence(tmp_path):
    plan = LayerPlan.parse("S L L S", evidence={"method": "halo", "scores": [1.0, 0.5, 0.2, 3.0]})
    path = plan.save(tmp_path / "plan.json")
    loaded = LayerPlan.load(path)
    assert loaded == plan and loaded.evidence["scores"] == [1.0, 0.5, 0.2, 3.0]
    assert json.loads(path.read_text())["mixer_types"] == plan.mixer_types()


def test_evenly_spaced_includes_both_ends():
    assert LayerPlan.evenly_spaced(32, 8).sparse_layers == [0, 4, 9, 13, 18, 22, 27, 31]
    assert LayerPlan.evenly_spaced(4, 1).format() == "SLLL"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: LayerPlan.parse("SLXL"), r"characters \['X'\]"),
        (lambda: LayerPlan.parse(""), "at least one layer"),
        (lambda: LayerPlan.from_mixer_types(["minicpm4", "mamba"]), r"\(1, 'mamba'\)"),
        (lambda: LayerPlan.from_sparse_layers(4, [5]), r"sparse layers \[5\] are outside 0..3"),
        (lambda: LayerPlan.parse("SLLS").validate(32, source="plan.json"), "plan.json has 4 layers .* the model has 32"),
        (lambda: LayerPlan.evenly_spaced(4, 0), "num_sparse must be in 1..4"),
    ],
)
def test_bad_plans_say_what_is_wrong(make, message):
    with pytest.raises(LayerPlanError, match=message):
        make()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        LayerPlan.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"pattern": "SQ"}')
    with pytest.raises(LayerPlanError, match="bad.json"):
        LayerPlan.load(bad)
    inconsistent = tmp_path / "inconsistent.json"
    inconsistent.write_text('{"pattern": "SL", "mixer_types": ["lightning-attn", "minicpm4"]}')
    with pytest.raises(LayerPlanError, match="disagrees"):
        LayerPlan.load(inconsistent)
