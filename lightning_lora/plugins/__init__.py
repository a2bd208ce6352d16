"""Lightning glue for quantized bases: ``quantization.py`` (called by ``LoRACallback(quantize=...)``) and
``precision.py`` (``QuantizedPrecision``, the same step as a precision plugin)."""

from .precision import QuantizedPrecision
from .quantization import quantize_for_strategy

__all__ = ["QuantizedPrecision", "quantize_for_strategy"]
