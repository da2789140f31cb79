"""sala_train.layer_selection: the layer plan and HALO layer selection (arrives with the conversion issue)."""
