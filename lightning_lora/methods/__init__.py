"""One module per method; ``registry.METHODS`` names them all."""

from .base import AdaptedLayer, InsertedAdapter, MergeError, MethodSpec, WeightUpdate
from .registry import METHODS, method_spec

__all__ = ["METHODS", "AdaptedLayer", "InsertedAdapter", "MergeError", "MethodSpec", "WeightUpdate", "method_spec"]
