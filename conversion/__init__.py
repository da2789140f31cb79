"""sala_train.conversion: MiniCPM-4 checkpoint + layer plan -> SALA checkpoint."""

from .convert import ConversionError, ConversionReport, convert, sala_config_for
from .verify import format_layer_statistics, layer_statistics, write_layer_statistics

__all__ = ["ConversionError", "ConversionReport", "convert", "format_layer_statistics", "layer_statistics",
           "sala_config_for", "write_layer_statistics"]
