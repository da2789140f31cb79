"""sala_train.layer_selection: the layer plan and HALO layer selection."""

from .plan import LIGHTNING, MIXER_TYPE, SPARSE, LayerPlan, LayerPlanError

__all__ = ["LIGHTNING", "MIXER_TYPE", "SPARSE", "LayerPlan", "LayerPlanError"]
