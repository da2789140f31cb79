"""sala-train: convert a Transformer LLM into a MiniCPM-SALA style sparse + linear hybrid and train it.

The import root for everything: ``sala_train.models``, ``sala_train.kernels``, ``sala_train.conversion``,
``sala_train.layer_selection``, ``sala_train.recipes``.
"""

__version__ = "0.1.0"
