"""LoRA (Hu et al. 2021, arXiv 2106.09685): h = W0 x + (alpha / r) B A x, with rsLoRA's alpha / sqrt(r) as an option.

Tensor names follow PEFT (``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``) so that export is a
rename. A starts Kaiming-uniform (or Gaussian), B starts at zero: the adapted model begins as the base model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, LoRAConfig
from .base import CONV_TYPES, LINEAR_TYPES, Conv1D, MethodSpec, WeightAdapter, register
from ..targeting import pattern_value


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    if isinstance(base, CONV_TYPES):
        return base.in_channels, base.out_channels
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    raise TypeError(type(base).__name__)


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapter weights train in float32 over a half-precision (or quantized) base, as PEFT's default does: bfloat16
    rounds away most AdamW updates of a LoRA factor or a DoRA magnitude near 1. The matmuls still run in the
    activations' dtype (see ``LoRALinear.forward``)."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class LoRALinear(WeightAdapter):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D`` (whose weight is stored transposed)."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(base_layer, config)
        in_features, out_features = layer_dims(base_layer)
        self.r, self.alpha, self.scaling = r, alpha, config.scaling(r, alpha)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        factory = {"device": self.weight.device, "dtype": adapter_dtype(self.weight)}
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        init_lora(self.lora_A.weight, self.lora_B.weight, config.init_weights, r)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self.enabled:
            return self.base_forward(x)
        flat = x.reshape(-1, x.shape[-1])
        out = self.base_forward(flat)  # a fresh 2-D tensor that backward does not need: safe to update in place
        return self.add_update(flat, out).view(*x.shape[:-1], out.shape[-1])

    def add_update(self, x: Tensor, out: Tensor) -> Tensor:
        """``out += scaling * B A dropout(x)``, with A and B cast to the output's dtype and the update accumulated by
        the second GEMM itself (no full-size ``* scaling`` or ``+`` kernels)."""
        after_a = F.linear(self.lora_dropout(x), self.lora_A.weight.to(out.dtype)).to(out.dtype)
        return out.addmm_(after_a, self.lora_B.weight.to(out.dtype).t(), alpha=self.scaling)

    def lora_weight(self) -> Tensor:
        """B A in (out_features, in_features) layout."""
        return self.lora_B.weight @ self.lora_A.weight

    def delta_weight(self) -> Tensor:
        delta = self.lora_weight() * self.scaling
        return delta.T if self.fan_in_fan_out else delta


class LoRAConv(WeightAdapter):
    """LoRA around ``nn.Conv1d/2d/3d``: A is a convolution with the base kernel, B a 1x1 convolution."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(base_layer, config)
        if base_layer.groups != 1:
            raise ConfigError(f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported.")
        self.r, self.alpha, self.scaling = r, alpha, config.scaling(r, alpha)
        conv = type(base_layer)
        factory = {"device": self.weight.device, "dtype": adapter_dtype(self.weight)}
        self.lora_A = conv(base_layer.in_channels, r, base_layer.kernel_size, base_layer.stride,
                           base_layer.padding, base_layer.dilation, bias=False, **factory)
        self.lora_B = conv(r, base_layer.out_channels, 1, bias=False, **factory)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        init_lora(self.lora_A.weight, self.lora_B.weight, config.init_weights, r)
        self._conv_fn = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[conv]

    def update(self, x: Tensor, base_out: Tensor) -> Tensor:
        dtype = base_out.dtype
        after_a = self.lora_A._conv_forward(self.lora_dropout(x).to(dtype), self.lora_A.weight.to(dtype), None)
        after_b = self.lora_B._conv_forward(after_a.to(dtype), self.lora_B.weight.to(dtype), None)
        return base_out + after_b * self.scaling

    def delta_weight(self) -> Tensor:
        # Composing A (in -> r, kernel k) with B (r -> out, 1x1) is a convolution of A's kernels by B.
        a = self.lora_A.weight.transpose(0, 1)
        return self._conv_fn(a, self.lora_B.weight).transpose(0, 1) * self.scaling


class LoRAEmbedding(WeightAdapter):
    """LoRA around ``nn.Embedding``: row lookup in A, then B. As in PEFT, A starts at zero and B is random."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(base_layer, config)
        num, dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.r, self.alpha, self.scaling = r, alpha, config.scaling(r, alpha)
        factory = {"device": self.weight.device, "dtype": adapter_dtype(self.weight)}
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, **factory))
        nn.init.normal_(self.lora_embedding_B)
        if config.init_weights is False:
            nn.init.normal_(self.lora_embedding_A)
        self.lora_dropout = nn.Identity()  # PEFT applies no dropout to embedding lookups

    def update(self, x: Tensor, base_out: Tensor) -> Tensor:
        base = self.original_module
        after_a = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        return base_out + (after_a @ self.lora_embedding_B.T * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling


def init_lora(a: Tensor, b: Tensor, init_weights: bool | str, r: int) -> None:
    """A as in ``nn.Linear`` (Kaiming-uniform) or Gaussian, B zero; ``False`` leaves B random too (for tests)."""
    with torch.no_grad():
        if init_weights == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)


def rank_and_alpha(config: LoRAConfig, path: str) -> tuple[int, float]:
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.alpha)
    return r, alpha


def check_rank(base_layer: nn.Module, r: int, path: str) -> None:
    in_features, out_features = layer_dims(base_layer)
    if isinstance(base_layer, CONV_TYPES):  # A reads a whole receptive field, so the update's rank can reach in * k
        in_features *= math.prod(base_layer.kernel_size)
    limit = min(in_features, out_features)
    if r > limit:
        raise ConfigError(
            f"r={r} is larger than {path} allows (its shape is {in_features} -> {out_features}, so r <= {limit}); "
            "lower r or set a smaller rank for it with rank_pattern."
        )


def build_lora(base_layer: nn.Module, config: LoRAConfig, path: str) -> WeightAdapter:
    r, alpha = rank_and_alpha(config, path)
    check_rank(base_layer, r, path)
    if isinstance(base_layer, LINEAR_TYPES):
        return LoRALinear(base_layer, config, r, alpha)
    if isinstance(base_layer, CONV_TYPES):
        return LoRAConv(base_layer, config, r, alpha)
    return LoRAEmbedding(base_layer, config, r, alpha)


def supports_lora(module: nn.Module) -> bool:
    return isinstance(module, (*LINEAR_TYPES, *CONV_TYPES, nn.Embedding)) and not isinstance(module, WeightAdapter)


register(MethodSpec("lora", build_lora, supports_lora, mergeable=True))
