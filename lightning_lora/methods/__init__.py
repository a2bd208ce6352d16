"""One module per method; ``registry.METHODS`` names them all."""

from .base import AdaptedLayer, MergeError, MethodSpec, WeightUpdate
from .inserted import InsertedAdapter
from .registry import METHODS, method_spec

__all__ = ["METHODS", "AdaptedLayer", "InsertedAdapter", "MergeError", "MethodSpec", "WeightUpdate", "method_spec"]
