"""HRA (Yuan et al. 2024, arXiv 2405.17484): W' = W H_1 H_2 ... H_r, a chain of Householder reflections
H_i = I - 2 u_i u_i^T / ||u_i||^2 (PEFT's ``hra_u``: the u_i as columns of an ``(in, r)`` matrix).

With unit columns U, the chain is ``I - U S^-1 U^T`` for ``S = I/2 + striu(U^T U)`` (the compact WY form), so the
unmerged forward rotates the input with two thin matrix products, ``x H^T = x - (x U) S^-T U^T``, where PEFT builds
``W H`` in every forward. ``apply_GS`` orthonormalizes U first (PEFT's Gram-Schmidt, here a QR), making
``H = I - 2 U U^T``. Pairs of equal reflections cancel, so PEFT's initialization (each random column twice, r even)
starts at the base model. The paper's regularizer ``orth_reg_weight * sum_layers ||I - U^T U||_F^2`` (unit columns)
keeps the reflections near-orthogonal; PEFT has none, so it is off by default.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import (
    ALL_LINEAR,
    AdapterConfig,
    ConfigError,
    _got,
    _is_real,
    _plain,
    _positive_int,
    register_config,
)
from ._orthogonal import common_peft_options, flag, peft_file_dict
from .base import AdaptedLayer, WeightUpdate, base_kind


@register_config
@dataclass
class HRAConfig(AdapterConfig):
    """HRA: ``r`` reflections per layer (even, so that the default initialization starts at the base model),
    ``apply_GS`` to orthonormalize them, ``orth_reg_weight`` the weight of the paper's regularizer (0: off, as in
    PEFT), ``init_weights=False`` for independent random reflections (for tests)."""

    method: str = "hra"
    r: int = 8
    apply_GS: bool = False
    orth_reg_weight: float = 0.0
    init_weights: bool = True

    METHODS: ClassVar[tuple[str, ...]] = ("hra",)
    PEFT_TYPE: ClassVar[str | None] = "HRA"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        super().__post_init__()
        self.r = _positive_int("r", self.r)
        flag("apply_GS", self.apply_GS)
        flag("init_weights", self.init_weights)
        if not _is_real(self.orth_reg_weight) or not 0 <= self.orth_reg_weight < math.inf:
            raise ConfigError(f"orth_reg_weight must be a number >= 0 such as 1e-4 (0: off), "
                              f"{_got(self.orth_reg_weight)}.")
        self.orth_reg_weight = _plain(self.orth_reg_weight)

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict:
        """PEFT's ``adapter_config.json`` for HRA (PEFT has no regularizer field: it only matters in training)."""
        return peft_file_dict("HRA", layers, module_paths, model_info, r=self.r, apply_GS=self.apply_GS,
                              init_weights=self.init_weights)

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> HRAConfig:
        return cls(**common_peft_options(data, "HRA"), r=data.get("r", 8), apply_GS=data.get("apply_GS", False),
                   init_weights=data.get("init_weights", True))


class HRAUpdate(WeightUpdate):
    """HRA on ``nn.Linear`` or ``Conv1D``: the input reflected by ``H^T`` before the base op."""

    transforms_input = True

    def __init__(self, base_layer: nn.Module, config: HRAConfig) -> None:
        super().__init__(config)
        in_features, _ = base_kind(base_layer).dims(base_layer)
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        r = config.r
        if config.init_weights and r % 2 == 0:  # PEFT's symmetric start: each column twice, H = I
            half = torch.empty(in_features, r // 2, device=weight.device, dtype=dtype)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = half.repeat_interleave(2, dim=1)
        else:
            if config.init_weights:
                warnings.warn(f"HRA with odd r={r} cannot start at the base model (reflections cancel in pairs); "
                              "choose an even r.", stacklevel=2)
            u = torch.empty(in_features, r, device=weight.device, dtype=dtype)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(u)

    def chain(self) -> tuple[Tensor, Tensor]:
        """``(U, K)`` with ``H_1 ... H_r = I - U K U^T``: unit columns and ``K = S^-1``, or with ``apply_GS``
        orthonormal columns and ``K = 2 I``. Computed in float32 for a half-precision U (DeepSpeed's bf16 mode casts
        the adapter itself; QR and triangular solves have no half-precision kernels) and returned in U's dtype."""
        dtype = self.hra_u.dtype
        u = self.hra_u.float() if dtype in (torch.float16, torch.bfloat16) else self.hra_u
        if self.config.apply_GS:
            q = torch.linalg.qr(u).Q
            return q.to(dtype), 2 * torch.eye(u.shape[1], device=u.device, dtype=dtype)
        u = u / u.norm(dim=0)
        s = torch.triu(u.T @ u, diagonal=1) + 0.5 * torch.eye(u.shape[1], device=u.device, dtype=u.dtype)
        eye = torch.eye(u.shape[1], device=u.device, dtype=u.dtype)
        return u.to(dtype), torch.linalg.solve_triangular(s, eye, upper=True).to(dtype)

    def transform_input(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        """``x H^T = x - (x U) K^T U^T``, in the adapter's dtype."""
        u, k = self.chain()
        h = x.to(u.dtype)
        return (h - (h @ u) @ (k.T @ u.T)).to(x.dtype)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        return out  # all of HRA is in transform_input

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """``W H - W = -(W U) K U^T``."""
        u, k = self.chain()
        w = layer.linear_weight().to(u.dtype)
        return -((w @ u) @ k) @ u.T

    def orthogonality_gap(self) -> Tensor:
        """``||I - U^T U||_F^2`` of the unit columns (the paper's regularizer for one layer)."""
        u = self.hra_u / self.hra_u.norm(dim=0)
        return (torch.eye(u.shape[1], device=u.device, dtype=u.dtype) - u.T @ u).square().sum()


def orthogonality_regularizer(layers: Mapping[str, nn.Module]) -> Tensor | None:
    """``orth_reg_weight * sum ||I - U^T U||_F^2`` over the model's trained HRA layers; None when there are none
    (or the weight is 0)."""
    updates = [u for layer in layers.values() for u in getattr(layer, "adapters", {}).values()
               if isinstance(u, HRAUpdate) and u.hra_u.requires_grad and u.config.orth_reg_weight > 0]
    if not updates:
        return None
    return sum(u.config.orth_reg_weight * u.orthogonality_gap() for u in updates)


def build_hra(base_layer: nn.Module, config: HRAConfig, path: str) -> HRAUpdate:
    in_features, _ = base_kind(base_layer).dims(base_layer)
    if config.r > in_features:
        raise ConfigError(f"HRA's r={config.r} exceeds {path}'s in_features={in_features} (at most that many "
                          "independent reflections); lower r or leave it out with exclude_modules.")
    return HRAUpdate(base_layer, config)


def supports_hra(module: nn.Module) -> bool:
    kind = base_kind(module)
    return kind is not None and kind.family == "linear"
