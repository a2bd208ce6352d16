"""``QuantizedPrecision``: the quantization step as a precision plugin, for ``Trainer(plugins=[...])``."""

from __future__ import annotations

from typing import Any, Union

from torch import nn
from typing_extensions import override

from lightning_lora.callbacks._lightning import PACKAGES, rank_zero_info
from lightning_lora.config import ConfigError
from lightning_lora.plugins.quantization import skip_in_ddp_broadcast
from lightning_lora.quantize import as_quantize_config, quantize_base, quantized_layers

PRECISION_BASES: tuple[type, ...] = tuple(pl.plugins.precision.Precision for pl in PACKAGES)


class QuantizedPrecision(*PRECISION_BASES):  # type: ignore[misc]
    # Both packages' Precision when both are installed, so that either Trainer accepts it (see callbacks/_lightning.py).
    """``Trainer(plugins=[QuantizedPrecision("nf4")])``: full precision (as ``precision="32-true"``) with the frozen
    base of the adapted ``nn.Linear`` layers quantized in ``convert_module``.

    The adapters must exist by then: add ``LoRACallback`` (which injects in ``setup``) or inject them yourself. Load
    the model in bfloat16 to compute in bfloat16 (a plugin replaces the Trainer's ``precision=``, so this one cannot be
    combined with ``bf16-mixed``). Weights are quantized where they are (usually the CPU) and then moved;
    ``LoRACallback(quantize=...)`` does the same on the device, keeps any ``precision=``, and is the form that will
    work under FSDP.

    Args:
        quantize: the format: nf4, int8 or int4, or a dict with format and its options (``lightning_lora.quantize``).
    """

    def __init__(self, quantize: Union[str, dict[str, Any]]) -> None:
        super().__init__()
        config = as_quantize_config(quantize)
        if config is None:
            raise ConfigError("QuantizedPrecision(quantize=None) would quantize nothing; pass a format such as 'nf4', "
                              "or use the Trainer's own precision plugin.")
        self.quantize = config

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        module = super().convert_module(module)
        converted = quantize_base(module, self.quantize)
        if not quantized_layers(module):
            raise ConfigError(
                f"QuantizedPrecision found no adapted nn.Linear in {type(module).__name__} to quantize: the adapter "
                "must be injected before the strategy sets up (add LoRACallback to the Trainer's callbacks, or call "
                "lightning_lora.inject in your LightningModule's __init__ or configure_model)."
            )
        rank_zero_info(f"lightning_lora: base of {len(converted)} adapted layers quantized to {self.quantize}")
        skip_in_ddp_broadcast(module, module)
        return module
