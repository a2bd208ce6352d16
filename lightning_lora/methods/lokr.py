"""LoKr (Yeh et al. 2023, LyCORIS, arXiv 2309.14859): W = W0 + (alpha / r) kron(w1, w2_a w2_b).

The weight (out, in) = (a * b, c * d) is the Kronecker product of a small w1 (a, c) and a w2 (b, d), with a and b
(c and d) PEFT's factorization of out (in): the divisor pair nearest the square root, or with ``decompose_factor=f``
the pair whose smaller side is f. w2 is low rank (``lokr_w2_a @ lokr_w2_b``) unless r is at least half its larger
side, then full (``lokr_w2``); w1 likewise only with ``decompose_both``. Config fields and tensor names are PEFT's
LOKR ones, so an adapter file is PEFT's. w1 starts at zero (``init_weights="lycoris"``: w2_b, as LyCORIS does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..config import ALL_LINEAR, AdapterConfig, ConfigError, _boolean, _got, _is_int, register_config
from ..targeting import pattern_value
from . import _lycoris
from .base import AdaptedLayer, WeightUpdate, base_kind
from .lora import factory  # device and float32-over-half dtype of adapter tensors


@register_config
@dataclass
class LoKrConfig(AdapterConfig):
    """LoKr options, PEFT's ``LoKrConfig`` names: ``r``, ``alpha`` (scaling alpha / r), ``rank_dropout`` (output
    rows, rescaled by the kept fraction only with ``rank_dropout_scale``), ``module_dropout``, ``use_effective_conv2d``,
    ``decompose_both``, ``decompose_factor`` (-1: near the square root), ``init_weights`` (True, "lycoris" or False:
    nothing zero, for tests) and ``rank_pattern``/``alpha_pattern``. With no ``target_modules``, all-linear."""

    method: str = "lokr"
    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    init_weights: Union[bool, str] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    METHODS: ClassVar[tuple[str, ...]] = ("lokr",)
    PEFT_TYPE: ClassVar[Optional[str]] = "LOKR"
    FLAGS: ClassVar[tuple[str, ...]] = ("rank_dropout_scale", "use_effective_conv2d", "decompose_both")

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        super().__post_init__()
        _lycoris.check_common(self)
        for flag in self.FLAGS:
            setattr(self, flag, _boolean(flag, getattr(self, flag)))
        if not _is_int(self.decompose_factor) or not (self.decompose_factor == -1 or self.decompose_factor >= 1):
            raise ConfigError(f"decompose_factor must be -1 (factors near the square root) or an integer >= 1 such as "
                              f"4, {_got(self.decompose_factor)}.")
        self.decompose_factor = int(self.decompose_factor)
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ConfigError(f"init_weights must be True, False or 'lycoris', {_got(self.init_weights)}.")

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's ``adapter_config.json``: the exact adapted paths, per-path ranks/alphas that differ as patterns."""
        return _lycoris.peft_file_dict(self, "LoKr", layers, module_paths, model_info,
                                       **{flag: getattr(self, flag) for flag in self.FLAGS},
                                       decompose_factor=self.decompose_factor, init_weights=self.init_weights)

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoKrConfig":
        return cls(**_lycoris.peft_options(data, (*cls.FLAGS, "decompose_factor", "init_weights")))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (and LyCORIS') split of ``dimension`` into m <= n with m * n = dimension: m = ``factor`` if it divides,
    else divisors m are walked up while m < n and m <= ``factor`` (-1: any), which ends near the square root."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = next(i for i in range(m + 1, dimension + 1) if dimension % i == 0)
        new_n = dimension // new_m
        if new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrUpdate(WeightUpdate):
    """LoKr on ``nn.Linear``, ``Conv1D`` and ``nn.Conv1d/2d`` (w2 then carries the kernel)."""

    def __init__(self, base_layer: nn.Module, config: LoKrConfig, r: int, alpha: float) -> None:
        super().__init__(config)
        in_features, out_features = base_kind(base_layer).dims(base_layer)
        kernel = tuple(getattr(base_layer, "kernel_size", ()))
        in_features //= getattr(base_layer, "groups", 1)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.rank_dropout_scale = config.rank_dropout_scale
        self.weight_shape = (out_features, in_features, *kernel)
        self.is_conv = bool(kernel)
        (a, b), (c, d) = factorization(out_features, config.decompose_factor), factorization(in_features, config.decompose_factor)
        new = lambda *shape: nn.Parameter(torch.empty(*shape, **factory(base_layer)))  # noqa: E731
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = new(a, r), new(r, c)
        else:
            self.lokr_w1 = new(a, c)
        if r >= max(b, d) / 2:
            self.lokr_w2 = new(b, d, *kernel)
        elif self.is_conv and config.use_effective_conv2d and math.prod(kernel) > 1:
            self.lokr_t2 = new(r, r, *((*kernel, 1) if len(kernel) == 1 else kernel))
            self.lokr_w2_a, self.lokr_w2_b = new(r, b), new(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = new(b, r), new(r, d * math.prod(kernel))
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[config.init_weights]
        with torch.no_grad():
            for name, tensor in self.named_parameters():
                nn.init.zeros_(tensor) if name in zero else nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    def factors(self) -> tuple[Tensor, Tensor]:
        """w1 (a, c) and w2 (b, d, *kernel, or (b, d * k) for a flattened kernel)."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            return w1, self.lokr_w2
        if hasattr(self, "lokr_t2"):
            return w1, torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return w1, self.lokr_w2_a @ self.lokr_w2_b

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        w1, w2 = self.factors()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # Against a 3-D w2 (Conv1d with a full w2) torch.kron pads w1 to (1, a, c): PEFT's layout, kept so that files
        # carry over. It views its inputs, which fails on an einsum result whose size-1 dims have odd strides: copy.
        w2 = w2.clone(memory_format=torch.contiguous_format)
        return (torch.kron(w1, w2) * self.scaling).reshape(self.weight_shape)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out + scaling * kron(w1, w2) x``; on linear layers as ``w1 X w2^T`` with x viewed as X (c, d), which is
        ``kron(w1, w2) x`` without building the (a b) x (c d) matrix."""
        if _lycoris.skip_module(self):
            return out
        keep = _lycoris.rank_keep(self, out, rescale=self.rank_dropout_scale)
        if self.is_conv:
            return _lycoris.conv_update(self, layer, x, out, keep)
        dtype = out.dtype
        w1, w2 = (w.to(dtype) for w in self.factors())
        grid = x.to(dtype).reshape(-1, w1.shape[1], w2.shape[1])
        update = (w1 @ grid @ w2.T).reshape(-1, self.weight_shape[0]) * self.scaling
        return out + (update if keep is None else update * keep)


def build_lokr(base_layer: nn.Module, config: LoKrConfig, path: str) -> LoKrUpdate:
    r = pattern_value(config.rank_pattern, path, config.r)
    return LoKrUpdate(base_layer, config, r, pattern_value(config.alpha_pattern, path, config.alpha))


supports_lokr = _lycoris.supports_linear_or_conv
