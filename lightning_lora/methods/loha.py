"""LoHa (Hyeon-Woo et al. 2022, FedPara, arXiv 2108.06098): W = W0 + (alpha / r) (w1_a w1_b) * (w2_a w2_b).

The Hadamard product ``*`` of two rank-r products reaches rank r^2 with the parameters of two rank-r LoRAs. Config
fields and tensor names are PEFT's LOHA ones (``hada_w1_a`` ... ``hada_w2_b``; with ``use_effective_conv2d`` a
convolution's factors are Tucker-style cores ``hada_t1``/``hada_t2`` times channel factors, the paper's Proposition
3), so an adapter file is PEFT's. ``rank_dropout`` drops output rows of the update (rescaled by the kept fraction) and
``module_dropout`` skips the whole update for a step, as in PEFT/LyCORIS. w2_b starts at zero: training starts at W0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ALL_LINEAR, AdapterConfig, _boolean, register_config
from ..targeting import pattern_value
from . import _lycoris
from .base import AdaptedLayer, WeightUpdate, base_kind
from .lora import factory  # device and float32-over-half dtype of adapter tensors


@register_config
@dataclass
class LoHaConfig(AdapterConfig):
    """LoHa options, PEFT's ``LoHaConfig`` names: ``r``, ``alpha`` (scaling alpha / r), ``rank_dropout``,
    ``module_dropout``, ``use_effective_conv2d``, ``init_weights`` (False: w2_b random too, for tests) and
    ``rank_pattern``/``alpha_pattern``. With no ``target_modules``, every linear layer but the output head."""

    method: str = "loha"
    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    METHODS: ClassVar[tuple[str, ...]] = ("loha",)
    PEFT_TYPE: ClassVar[Optional[str]] = "LOHA"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        super().__post_init__()
        _lycoris.check_common(self)
        self.use_effective_conv2d = _boolean("use_effective_conv2d", self.use_effective_conv2d)
        self.init_weights = _boolean("init_weights", self.init_weights)

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's ``adapter_config.json``: the exact adapted paths, per-path ranks/alphas that differ as patterns."""
        return _lycoris.peft_file_dict(self, "LoHa", layers, module_paths, model_info,
                                       use_effective_conv2d=self.use_effective_conv2d, init_weights=self.init_weights)

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoHaConfig":
        return cls(**_lycoris.peft_options(data, ("use_effective_conv2d", "init_weights")))


def conv_core(t: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    """A convolution kernel (out, in, k1, k2) from a core t (r, r, k1, k2) and channel factors (r, out), (r, in)."""
    return torch.einsum("ijkl,jr,ip->prkl", t, w_b, w_a)


class LoHaUpdate(WeightUpdate):
    """LoHa on ``nn.Linear``, ``Conv1D`` and ``nn.Conv1d/2d`` (whose kernel is the flattened (out, in * k) matrix,
    or with ``use_effective_conv2d`` the core form)."""

    def __init__(self, base_layer: nn.Module, config: LoHaConfig, r: int, alpha: float) -> None:
        super().__init__(config)
        in_features, out_features = base_kind(base_layer).dims(base_layer)
        kernel = tuple(getattr(base_layer, "kernel_size", ()))
        groups = getattr(base_layer, "groups", 1)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.weight_shape = (out_features, in_features // groups, *kernel)
        self.is_conv = bool(kernel)
        new = lambda *shape: nn.Parameter(torch.empty(*shape, **factory(base_layer)))  # noqa: E731
        if self.is_conv and config.use_effective_conv2d and math.prod(kernel) > 1:
            core = (*kernel, 1) if len(kernel) == 1 else kernel
            self.hada_t1, self.hada_t2 = new(r, r, *core), new(r, r, *core)
            self.hada_w1_a, self.hada_w1_b = new(r, out_features), new(r, in_features // groups)
            self.hada_w2_a, self.hada_w2_b = new(r, out_features), new(r, in_features // groups)
        else:
            columns = in_features // groups * math.prod(kernel)
            self.hada_w1_a, self.hada_w1_b = new(out_features, r), new(r, columns)
            self.hada_w2_a, self.hada_w2_b = new(out_features, r), new(r, columns)
        with torch.no_grad():
            for name, tensor in self.named_parameters():
                if name != "hada_w2_b" or not config.init_weights:
                    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(self.hada_w2_b)

    def factors(self) -> tuple[Tensor, Tensor]:
        """The two rank-r matrices (or kernels) whose Hadamard product is the update."""
        if hasattr(self, "hada_t1"):
            return (conv_core(self.hada_t1, self.hada_w1_a, self.hada_w1_b),
                    conv_core(self.hada_t2, self.hada_w2_a, self.hada_w2_b))
        return self.hada_w1_a @ self.hada_w1_b, self.hada_w2_a @ self.hada_w2_b

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        w1, w2 = self.factors()
        return (w1 * w2 * self.scaling).reshape(self.weight_shape)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out + scaling * ((w1_a w1_b) * (w2_a w2_b)) x``. On linear layers where rank r^2 is cheaper than the full
        weight, through the face-splitting identity ``(A1 B1) * (A2 B2) = (A1 . A2)(B1 . B2)`` (row-wise Kronecker of
        the A's, column-wise of the B's), so the d x k update is never built."""
        if _lycoris.skip_module(self):
            return out
        keep = _lycoris.rank_keep(self, out, rescale=True)
        if self.is_conv:
            return _lycoris.conv_update(self, layer, x, out, keep)
        dtype = out.dtype
        d_out, d_in = self.weight_shape
        r = self.r
        if r * r * (d_in + d_out) < d_in * d_out:
            a = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(d_out, r * r)
            b = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, d_in)
            update = F.linear(F.linear(x.to(dtype), b.to(dtype)), a.to(dtype) * self.scaling)
        else:
            update = F.linear(x.to(dtype), self.delta_weight(layer).to(dtype))
        return out + (update if keep is None else update * keep)


def build_loha(base_layer: nn.Module, config: LoHaConfig, path: str) -> LoHaUpdate:
    r = pattern_value(config.rank_pattern, path, config.r)
    return LoHaUpdate(base_layer, config, r, pattern_value(config.alpha_pattern, path, config.alpha))


supports_loha = _lycoris.supports_linear_or_conv
