"""One module per method; importing this package registers them all in ``methods.base.METHODS``."""

from lightning_lora.methods import bottleneck, dora, lora  # noqa: F401
from lightning_lora.methods.base import METHODS, InsertedAdapter, MethodSpec, WeightAdapter, method_spec

__all__ = ["METHODS", "InsertedAdapter", "MethodSpec", "WeightAdapter", "method_spec"]
