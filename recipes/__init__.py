"""sala_train.recipes: the Hydra config tree (YAML files shipped as package data)."""
