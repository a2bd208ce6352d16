"""Lightning glue for quantized bases (``quantization.py``)."""

from .quantization import quantize_for_strategy

__all__ = ["quantize_for_strategy"]
