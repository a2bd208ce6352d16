"""One module per method; importing this package registers them all in ``methods.base.METHODS``."""

from . import bottleneck, dora, lora  # noqa: F401
from .base import METHODS, InsertedAdapter, MethodSpec, WeightAdapter, method_spec

__all__ = ["METHODS", "InsertedAdapter", "MethodSpec", "WeightAdapter", "method_spec"]
