"""Bone (Kang and Yin 2024, arXiv 2409.15371) and MiSS, its successor in PEFT (``peft.tuners.miss``).

Bone, the block-affine update (PEFT's MiSS ``init_weights="bat"``): cut W into r x r blocks W_ij and train one
r x r matrix B_i per row of blocks: ``W'_ij = W_ij + W_ij B_i + B_i``. The update reads the weight, so W's shape must
divide into blocks (checked before any module changes). MiSS (the default ``init_weights=True``): one trained
``(r, out)`` matrix M shared by every column block, ``W' = W + [M^T M^T ... ]`` (truncated to ``in``), computed as
``y = W x + M^T sum_j x_j`` over the r-wide input slices (the last one zero-padded); ``init_weights="mini"``
trains only ``(r, mini_r)`` and tiles it along ``out``. Both start at zero, i.e. at the base model. The tensor is
PEFT's ``miss_block`` in both, so files are PEFT's MiSS files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import (
    ALL_LINEAR,
    AdapterConfig,
    ConfigError,
    _got,
    _positive_int,
    register_config,
)
from ._orthogonal import common_peft_options, divisors_near, peft_file_dict, probability
from .base import AdaptedLayer, WeightUpdate, base_kind


@register_config
@dataclass
class MissConfig(AdapterConfig):
    """Bone (``method="bone"``) and MiSS (``method="miss"``): ``r`` is the block size (Bone: r x r blocks; MiSS: the
    width of the input slices); MiSS's ``init_weights`` is True (zeros), False (random, for tests) or ``"mini"``
    (a ``(r, mini_r)`` block tiled along ``out``); ``miss_dropout`` drops MiSS's input (Bone has none)."""

    method: str = "bone"
    r: int = 64
    mini_r: int = 1
    miss_dropout: float = 0.0
    init_weights: bool | str = True

    METHODS: ClassVar[tuple[str, ...]] = ("bone", "miss")
    PEFT_TYPE: ClassVar[str | None] = "MISS"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        super().__post_init__()
        self.r = _positive_int("r", self.r)
        self.mini_r = _positive_int("mini_r", self.mini_r)
        self.miss_dropout = probability("miss_dropout", self.miss_dropout)
        allowed = [True, False] if self.method == "bone" else [True, False, "mini"]
        if not (isinstance(self.init_weights, bool) or self.init_weights == "mini" and self.method == "miss"):
            hint = " (Bone is PEFT's MiSS init_weights='bat': use method='bone')" if self.init_weights == "bat" else ""
            raise ConfigError(f"{self.method}'s init_weights must be one of {allowed}{hint}, "
                              f"{_got(self.init_weights)}.")
        if self.method == "bone" and self.miss_dropout:
            raise ConfigError(f"miss_dropout={self.miss_dropout} does nothing in Bone's block-affine update (PEFT "
                              "ignores it there too); drop it, or use method='miss'.")
        if self.mini_r != 1 and self.init_weights != "mini":
            raise ConfigError(f"mini_r={self.mini_r} only applies with method='miss', init_weights='mini'.")

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict:
        """PEFT's MiSS ``adapter_config.json``; Bone is its ``init_weights="bat"``."""
        return peft_file_dict("MISS", layers, module_paths, model_info, r=self.r, mini_r=self.mini_r,
                              miss_dropout=self.miss_dropout,
                              init_weights="bat" if self.method == "bone" else self.init_weights)

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> MissConfig:
        init = data.get("init_weights", True)
        return cls(**common_peft_options(data, "MISS"), method="bone" if init == "bat" else "miss",
                   r=data.get("r", 64), mini_r=data.get("mini_r", 1), miss_dropout=data.get("miss_dropout", 0.0),
                   init_weights=True if init == "bat" else init)


def _factory(base_layer: nn.Module) -> dict:
    weight = base_layer.weight
    return {"device": weight.device,
            "dtype": weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32}


class BoneUpdate(WeightUpdate):
    """Bone on ``nn.Linear`` or ``Conv1D``: ``miss_block`` holds the ``out / r`` matrices B_i."""

    def __init__(self, base_layer: nn.Module, config: MissConfig) -> None:
        super().__init__(config)
        _, out_features = base_kind(base_layer).dims(base_layer)
        r = config.r
        self.miss_block = nn.Parameter(torch.zeros(out_features // r, r, r, **_factory(base_layer)))
        if config.init_weights is False:
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out + x dW^T``: the update depends on every block of W, so it is built (as PEFT builds W + dW)."""
        return out + F.linear(x.to(self.miss_block.dtype), self.delta_weight(layer)).to(out.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """``dW_ij = W_ij B_i + B_i``."""
        b = self.miss_block
        w = layer.linear_weight().to(b.dtype)
        out_features, in_features = w.shape
        r = b.shape[-1]
        blocks = w.reshape(out_features // r, r, in_features // r, r).permute(2, 0, 1, 3)  # [j, i] = W_ij
        return (blocks @ b + b).permute(1, 2, 0, 3).reshape(out_features, in_features)


class MissUpdate(WeightUpdate):
    """MiSS on ``nn.Linear`` or ``Conv1D``: ``miss_block`` is ``(r, out)``, or ``(r, mini_r)`` with ``"mini"``."""

    def __init__(self, base_layer: nn.Module, config: MissConfig) -> None:
        super().__init__(config)
        self.in_features, self.out_features = base_kind(base_layer).dims(base_layer)
        out_features = self.out_features
        width = config.mini_r if config.init_weights == "mini" else out_features
        self.miss_block = nn.Parameter(torch.zeros(config.r, width, **_factory(base_layer)))
        if config.init_weights is False:
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
        self.miss_dropout = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()

    def block(self) -> Tensor:
        """M as ``(r, out)``."""
        b = self.miss_block
        return b.repeat(1, self.out_features // b.shape[1]) if b.shape[1] != self.out_features else b

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out + (sum_j x_j) M`` over the r-wide slices of the (zero-padded) input."""
        m = self.block()
        r = m.shape[0]
        h = F.pad(x, (0, -x.shape[-1] % r)) if x.shape[-1] % r else x
        h = self.miss_dropout(h).to(m.dtype)
        return out + (h.reshape(*h.shape[:-1], -1, r).sum(-2) @ m).to(out.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """M^T repeated along the input, cut to ``in_features``."""
        m = self.block()
        return m.T.repeat(1, -(-self.in_features // m.shape[0]))[:, :self.in_features]


def build_bone(base_layer: nn.Module, config: MissConfig, path: str) -> WeightUpdate:
    in_features, out_features = base_kind(base_layer).dims(base_layer)
    r = config.r
    if config.method == "bone" and (in_features % r or out_features % r):
        common = math.gcd(in_features, out_features)
        raise ConfigError(
            f"Bone cannot cut {path}'s weight ({out_features} x {in_features}, out x in) into {r} x {r} blocks: "
            f"both dimensions must be divisible by r. Use r in {divisors_near(common, r)} (divisors of both), "
            f"leave {path} out with exclude_modules, or use method='miss', which pads.")
    if config.method == "miss":
        if r > in_features:
            raise ConfigError(f"MiSS's r={r} exceeds {path}'s in_features={in_features}; lower r or leave {path} "
                              "out with exclude_modules.")
        if config.init_weights == "mini" and out_features % config.mini_r:
            raise ConfigError(f"MiSS mini: {path}'s out_features={out_features} is not divisible by mini_r="
                              f"{config.mini_r}; use mini_r in {divisors_near(out_features, config.mini_r)}.")
        return MissUpdate(base_layer, config)
    return BoneUpdate(base_layer, config)


def supports_bone(module: nn.Module) -> bool:
    kind = base_kind(module)
    return kind is not None and kind.family == "linear"
