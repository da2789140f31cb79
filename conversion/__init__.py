"""sala_train.conversion: MiniCPM-4 checkpoint + layer plan -> SALA checkpoint."""

from .convert import ConversionError, ConversionReport, convert, sala_config_for

__all__ = ["ConversionError", "ConversionReport", "convert", "sala_config_for"]
