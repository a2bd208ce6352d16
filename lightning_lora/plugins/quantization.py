"""Quantizing the adapted base inside ``Trainer.fit``, with or without being the precision plugin.

Lightning's FSDP strategy accepts only its own precision plugin (Lightning #20855), so QLoRA that exists only as a
``Precision`` subclass cannot run there. The step is therefore one function, ``quantize_for_strategy``, that
``LoRACallback(quantize=...)`` calls right after the precision plugin's ``convert_module`` (inside ``strategy.setup``):
after the checkpoint restore (which holds no base weight), after a true-half cast (which would dequantize an NF4
weight: ``NF4Tensor.to(dtype)`` returns plain values), and before the model is moved, wrapped by DDP and handed to the
optimizers; each weight is quantized on the strategy's device, one layer at a time. ``precision.QuantizedPrecision`` is
the same step as a precision plugin, for ``Trainer(plugins=[...])``. (This module imports no Lightning package: the
callback imports it.)
"""

from __future__ import annotations

from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_info
from torch import nn

from lightning_lora.quantize import QuantizeConfig, quantize_base, quantized_weight_names


def quantize_for_strategy(trainer: Any, pl_module: nn.Module, root: nn.Module, config: QuantizeConfig) -> list[str]:
    """Quantize ``root``'s adapted base onto ``trainer.strategy.root_device``; returns the layers converted."""
    device = trainer.strategy.root_device
    converted = quantize_base(root, config, device=device)
    if converted:
        rank_zero_info(f"lightning_lora: {len(converted)} base layers quantized to {config} on {device}, one at a time")
    skip_in_ddp_broadcast(pl_module, root)
    return converted


def skip_in_ddp_broadcast(pl_module: nn.Module, root: nn.Module) -> None:
    """Tell DDP not to broadcast ``root``'s quantized weights when it wraps ``pl_module``
    (``_ddp_params_and_buffers_to_ignore``): every rank quantized the same base the same way, and the broadcast would
    need collectives the tensor subclasses lack."""
    prefix = {id(m): name for name, m in pl_module.named_modules()}.get(id(root), "")
    names = [f"{prefix}.{name}" if prefix else name for name in quantized_weight_names(root)]
    ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
    pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))
