"""BitFit (Ben Zaken et al. 2021, arXiv 2106.10199): only the model's bias terms train.

Each targeted module (by default every module that owns a bias: linear, convolution and LayerNorm layers) gets a
trainable copy of its bias, ``<module>.bitfit.bias``; a forward hook adds ``trained - original`` to the module's
output, so the base's own bias is never written while training and ``unload`` gives the original back exactly.
Merging copies the trained biases into the base (keeping the originals for ``unmerge``); the adapter file holds just
the trained biases, named as in the model (``<module>.bias``). PEFT has no BitFit, so the file is ours
(``"method": "bitfit"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, ConfigError, register_config
from .inserted import InsertedAdapter

# modules whose bias is per channel on dim 1 (N, C, ...); every other bias is on the last dim (..., features)
CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)


@register_config
@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit: the biases of ``target_modules`` train (None: every module that has one), nothing else."""

    method: str = "bitfit"

    METHODS: ClassVar[tuple[str, ...]] = ("bitfit",)


def own_bias(module: nn.Module) -> nn.Parameter | None:
    """The floating-point 1-D bias ``module`` holds itself (not one of its children's), or None."""
    bias = module._parameters.get("bias")
    return bias if isinstance(bias, nn.Parameter) and bias.is_floating_point() and bias.dim() == 1 else None


class BiasFit(InsertedAdapter):
    """The trained bias of one module. While unmerged the module computes with its original bias and the hook adds
    the difference; merged, the module's bias holds the trained values and the original is kept here."""

    attach_name = "bitfit"
    mergeable = True

    def __init__(self, config: BitFitConfig, bias: Tensor, channel_dim: int) -> None:
        super().__init__(config)
        self.bias = nn.Parameter(bias.detach().float().clone())  # trained in float32 whatever the base's dtype
        self.channel_dim = channel_dim
        object.__setattr__(self, "_module", None)
        object.__setattr__(self, "_original", None)  # the base bias, exact, while merged

    @property
    def merged(self) -> bool:
        return self._original is not None

    def attach(self, sublayer: nn.Module) -> None:
        object.__setattr__(self, "_module", sublayer)
        super().attach(sublayer)

    def detach(self, sublayer: nn.Module) -> None:
        super().detach(sublayer)
        object.__setattr__(self, "_module", None)

    def file_tensors(self) -> dict[str, Tensor]:
        return {"bias": self.bias}

    def original_bias(self) -> Tensor:
        return self._module.bias if self._original is None else self._original

    def _rewrite_if_enabled(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Tensor) -> Tensor:
        if self.enabled == self.merged:  # the module's own bias is already the one to use
            return output
        delta = self.bias - self.original_bias().float()
        if not self.enabled:  # merged, but the base alone is asked for (disable_adapters)
            delta = -delta
        shape = [1] * output.dim()
        shape[self.channel_dim] = -1
        return output + delta.to(output.dtype).view(shape)

    def base_tensors(self) -> dict[str, Tensor]:
        return {} if self._original is None else {"bias": self._original}

    def merged_tensors(self) -> dict[str, Tensor]:
        return {"bias": self.bias.detach().to(self._module.bias.dtype)}

    def merge(self) -> None:
        if self.merged:
            return
        bias = self._module.bias
        with torch.no_grad():
            object.__setattr__(self, "_original", bias.detach().clone())
            bias.copy_(self.bias.to(bias.dtype))

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            self._module.bias.copy_(self._original)
        object.__setattr__(self, "_original", None)

    def extra_repr(self) -> str:
        return f"features={self.bias.numel()}, merged={self.merged}"


def default_targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Every module that owns a bias; a model without any is an error (BitFit would train nothing)."""
    found = [path for path, module in model.named_modules() if path and own_bias(module) is not None]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no bias terms (Llama-style models have none), so BitFit would train nothing; "
            "use another method (lora, houlsby, ...) or a model with biases (GPT-2, BERT)."
        )
    return found


def build_bitfit(module: nn.Module, config: BitFitConfig, path: str) -> BiasFit:
    bias = own_bias(module)
    if bias is None:
        raise ConfigError(f"{path} ({type(module).__name__}) has no bias to train; leave it out of target_modules.")
    return BiasFit(config, bias, 1 if isinstance(module, CHANNEL_FIRST) else -1).to(device=bias.device)


def supports_bitfit(module: nn.Module) -> bool:
    return own_bias(module) is not None
