"""``QuantizedPrecision``: the quantization step as a precision plugin, for ``Trainer(plugins=[...])``."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn
from typing_extensions import override

from lightning_lora.callbacks._lightning import PACKAGES, rank_zero_info
from lightning_lora.config import ConfigError
from lightning_lora.plugins.quantization import skip_in_ddp_broadcast
from lightning_lora.quantize import as_quantize_config, quantize_base, quantized_layers

# Lightning's plugin class for each precision a QuantizedPrecision can run with, from both packages when both are
# installed, so that either Trainer accepts it (see callbacks/_lightning.py).
_KINDS = {"32-true": "Precision", "bf16-mixed": "MixedPrecision", "16-mixed": "MixedPrecision",
          "bf16-true": "HalfPrecision", "16-true": "HalfPrecision"}
PRECISION_BASES: tuple[type, ...] = tuple(pl.plugins.precision.Precision for pl in PACKAGES)


class QuantizedPrecision(*PRECISION_BASES):  # type: ignore[misc]
    """``Trainer(plugins=[QuantizedPrecision("nf4", precision="bf16-mixed")])``: Lightning's plugin for ``precision``
    (32-true, bf16-mixed, 16-mixed, bf16-true or 16-true), with the frozen base of the adapted ``nn.Linear`` layers
    quantized in ``convert_module``, after that precision's own cast.

    The adapters must exist by then: add ``LoRACallback`` (which injects in ``setup``) or inject them yourself. A
    plugin replaces the Trainer's ``precision=`` argument, hence ``precision`` here. ``LoRACallback(quantize=...)``
    does the same step on the strategy's device, keeps the Trainer's ``precision=`` and takes no plugin slot
    (Lightning's FSDP accepts only its own, #20855), so prefer it.

    Args:
        quantize: the format: nf4, int8 or int4, or a dict with format and its options (``lightning_lora.quantize``).
        precision: the precision to train in, as the Trainer's ``precision=`` (default 32-true).
        device: the training device type, cuda or cpu: each base weight is moved there, quantized and kept, one
            layer at a time (on the current CUDA device, which the strategy has set), so the full-precision base
            never sits on the GPU at once; and the autocast device of mixed precision. None: weights are quantized
            where they are, and autocast uses cuda when available.
    """

    def __new__(cls, quantize: Union[str, dict[str, Any]], precision: str = "32-true",
                device: Optional[str] = None) -> QuantizedPrecision:
        if precision not in _KINDS:
            raise ConfigError(f"QuantizedPrecision(precision={precision!r}): use one of {sorted(_KINDS)}.")
        return super().__new__(_CLASSES[_KINDS[precision]])

    def __init__(self, quantize: Union[str, dict[str, Any]], precision: str = "32-true",
                 device: Optional[str] = None) -> None:
        kind = _KINDS[precision]
        if kind == "MixedPrecision":
            super().__init__(precision, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        elif kind == "HalfPrecision":
            super().__init__(precision)
        else:
            super().__init__()
        self.quantize_device = device
        config = as_quantize_config(quantize)
        if config is None:
            raise ConfigError("QuantizedPrecision(quantize=None) would quantize nothing; pass a format such as 'nf4', "
                              "or use the Trainer's own precision plugin.")
        self.quantize = config

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        module = super().convert_module(module)  # a true-half cast first: it would dequantize an NF4 weight
        device = None
        if self.quantize_device is not None:
            device = torch.device(self.quantize_device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        converted = quantize_base(module, self.quantize, device=device)
        if not quantized_layers(module):
            raise ConfigError(
                f"QuantizedPrecision found no adapted nn.Linear in {type(module).__name__} to quantize: the adapter "
                "must be injected before the strategy sets up (add LoRACallback to the Trainer's callbacks, or call "
                "lightning_lora.inject in your LightningModule's __init__ or configure_model)."
            )
        rank_zero_info(f"lightning_lora: {len(converted)} base layers quantized to {self.quantize}"
                       + (f" on {device}, one at a time" if device is not None else ""))
        skip_in_ddp_broadcast(module, module)
        return module


def _with_bases(name: str) -> type:
    bases = tuple(getattr(pl.plugins.precision, name) for pl in PACKAGES)
    return type(f"Quantized{name}", (QuantizedPrecision, *bases), {"__module__": __name__})


_CLASSES = {"Precision": QuantizedPrecision, "MixedPrecision": _with_bases("MixedPrecision"),
            "HalfPrecision": _with_bases("HalfPrecision")}
