"""Bottleneck adapters: Houlsby et al. 2019 (arXiv 1902.00751) and Pfeiffer et al. 2020 (arXiv 2005.00247).

``h + up(act(down(h)))`` after a sublayer's output projection, before the residual connection. Houlsby puts one after
the attention and one after the feed-forward sublayer of every block; Pfeiffer only after the feed-forward one.
``up`` starts at zero, so the adapted model starts as the base model.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from ..config import BottleneckConfig, ConfigError
from .base import Conv1D, InsertedAdapter, MethodSpec, register

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}

# Output projections of the attention and feed-forward sublayers, by model family (full-path regexes).
SUBLAYER_OUTPUTS: dict[str, tuple[str, str]] = {
    "llama": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "gpt2": (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),
    "bert": (r".*\.attention\.output\.dense", r".*(?<!attention)\.output\.dense"),
}


class BottleneckAdapter(InsertedAdapter):
    """One bottleneck adapter; ``adapter_down``/``adapter_up`` are its two projections."""

    attach_name = "bottleneck_adapter"

    def __init__(self, hidden_size: int, config: BottleneckConfig) -> None:
        super().__init__(config)
        bottleneck = max(1, hidden_size // config.reduction_factor)
        self.adapter_down = nn.Linear(hidden_size, bottleneck)
        self.activation = ACTIVATIONS[config.nonlinearity]()
        self.adapter_up = nn.Linear(bottleneck, hidden_size)
        nn.init.normal_(self.adapter_down.weight, std=1e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: Tensor) -> Tensor:
        x = h.to(self.adapter_down.weight.dtype)
        return h + self.adapter_up(self.activation(self.adapter_down(x))).to(h.dtype)


def output_size(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    size = getattr(module, "out_features", None)
    return size if isinstance(size, int) else None


def build_bottleneck(sublayer: nn.Module, config: BottleneckConfig, path: str) -> BottleneckAdapter:
    hidden = output_size(sublayer)
    if hidden is None:
        raise ConfigError(
            f"Cannot tell the output size of {path} ({type(sublayer).__name__}); target the sublayer's output "
            "projection (an nn.Linear) instead."
        )
    module = BottleneckAdapter(hidden, config)
    weight = getattr(sublayer, "weight", None)
    if weight is not None and weight.is_floating_point():
        module.to(device=weight.device)
    return module


def default_sublayers(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Where the adapters go in a known model family: the first family whose patterns match anything."""
    paths = [p for p, _ in model.named_modules()]
    for attention, ffn in SUBLAYER_OUTPUTS.values():
        patterns = [ffn] if config.method == "pfeiffer" else [attention, ffn]
        found = [p for p in paths if any(re.fullmatch(pattern, p) for pattern in patterns)]
        if found:
            return found
    return []


def supports_bottleneck(module: nn.Module) -> bool:
    return output_size(module) is not None


for _name in BottleneckConfig.METHODS:
    register(MethodSpec(_name, build_bottleneck, supports_bottleneck, mergeable=False, default_targets=default_sublayers))
