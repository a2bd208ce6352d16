"""Quantizing the adapted base inside ``Trainer.fit``, without being the precision plugin.

Lightning's FSDP strategy accepts only its own precision plugin (Lightning #20855), so QLoRA that lives in a
``Precision`` subclass cannot run there. This step is instead called by ``LoRACallback(quantize=...)`` right after the
precision plugin's ``convert_module`` (inside ``strategy.setup``): after the checkpoint restore (which holds no base
weight), after a true-half cast (which would dequantize an NF4 weight: ``NF4Tensor.to(dtype)`` returns plain values),
and before the model is moved, wrapped by DDP and handed to the optimizers. Each weight is quantized on the strategy's
device, one layer at a time.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_lora.callbacks._lightning import rank_zero_info
from lightning_lora.quantize import QuantizeConfig, quantize_base, quantized_layers


def quantize_for_strategy(trainer: Any, pl_module: nn.Module, root: nn.Module, config: QuantizeConfig) -> list[str]:
    """Quantize ``root``'s adapted base onto ``trainer.strategy.root_device``; returns the layers converted.

    DDP is told not to broadcast the quantized weights at wrap time (``_ddp_params_and_buffers_to_ignore``): every
    rank quantized the same base the same way, and a broadcast would need collectives the tensor subclasses lack.
    """
    device = trainer.strategy.root_device
    converted = quantize_base(root, config, device=device)
    if converted:
        rank_zero_info(f"lightning_lora: base of {len(converted)} adapted layers quantized to {config} on {device}")
    prefix = {id(m): name for name, m in pl_module.named_modules()}.get(id(root), "")
    names = [f"{prefix}.{path}.weight" if prefix else f"{path}.weight" for path in quantized_layers(root)]
    ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
    pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))
    return converted
