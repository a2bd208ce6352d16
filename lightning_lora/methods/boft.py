"""BOFT (Liu et al. 2023, arXiv 2311.06243): W' = s * (W M^T), M = B_m ... B_1 B_0 a butterfly product of OFT-style
block-diagonal orthogonal factors, s a trained scale per output unit.

Factor i is ``B_i = P_i diag(R_i1, ..., R_in) P_i^T`` with P_i the butterfly permutation of PEFT's
``block_butterfly_perm`` and each ``R = (I - S)(I + S)^-1``, ``S = (A - A^T) / 2`` the Cayley map of a full trained
block A (PEFT's ``boft_R``, shape ``(factors, blocks, b, b)``; ``boft_s`` is ``(out, 1)``). As in PEFT the update
rotates the input and scales the output, ``y = s * (W (M^T x)) + b``; the permutations are index gathers, not PEFT's
dense ``(in, in)`` matrices, and neither M nor a rotated weight is built in forward.
"""

from __future__ import annotations

import dataclasses
import math
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
    _is_int,
    _plain,
    register_config,
)
from ._orthogonal import (
    cayley,
    common_peft_options,
    divisors_near,
    drop_blocks,
    flag,
    non_negative_int,
    peft_file_dict,
    probability,
    rotate_blocks,
)
from .base import AdaptedLayer, WeightUpdate, base_kind


@register_config
@dataclass
class BOFTConfig(AdapterConfig):
    """BOFT: give either ``boft_block_size`` (4 when neither is given) or ``boft_block_num``, as in PEFT;
    ``boft_n_butterfly_factor`` factors (1 is OFT with a scale), ``boft_dropout`` turns that fraction of one random
    factor's blocks into ``I`` at each training step."""

    method: str = "boft"
    boft_block_size: int = 0
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True

    METHODS: ClassVar[tuple[str, ...]] = ("boft",)
    PEFT_TYPE: ClassVar[str | None] = "BOFT"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        super().__post_init__()
        self.boft_block_size = non_negative_int("boft_block_size", self.boft_block_size)
        self.boft_block_num = non_negative_int("boft_block_num", self.boft_block_num)
        if self.boft_block_size and self.boft_block_num:
            raise ConfigError(f"Give either boft_block_size={self.boft_block_size} or boft_block_num="
                              f"{self.boft_block_num}, not both: their product must equal each layer's in_features.")
        if not self.boft_block_size and not self.boft_block_num:
            self.boft_block_size = 4
        if not _is_int(self.boft_n_butterfly_factor) or self.boft_n_butterfly_factor < 1:
            raise ConfigError("boft_n_butterfly_factor must be an integer >= 1 (1: plain OFT blocks), "
                              f"{_got(self.boft_n_butterfly_factor)}.")
        self.boft_n_butterfly_factor = _plain(self.boft_n_butterfly_factor)
        self.boft_dropout = probability("boft_dropout", self.boft_dropout)
        flag("init_weights", self.init_weights)

    def blocks(self, in_features: int, path: str) -> tuple[int, int]:
        """(blocks per factor, block size) for a layer with ``in_features`` inputs, with PEFT's rules."""
        extra = self.boft_n_butterfly_factor - 1  # PEFT's m: factors beyond the first
        option, wanted = ("boft_block_num", self.boft_block_num) if self.boft_block_num else \
            ("boft_block_size", self.boft_block_size)
        unit = wanted * 2 ** extra if option == "boft_block_size" else 2 ** extra
        problem = None
        if in_features % wanted:
            problem = f"{in_features} is not divisible by {wanted}"
        elif option == "boft_block_size" and in_features % unit:
            problem = f"{extra + 1} butterfly factors need in_features divisible by {wanted} x 2^{extra} = {unit}"
        elif option == "boft_block_num" and (wanted % unit or extra > int(math.log2(wanted))):
            problem = f"{extra + 1} butterfly factors need boft_block_num divisible by 2^{extra} = {unit}"
        num, size = (wanted, in_features // wanted) if option == "boft_block_num" else (in_features // wanted, wanted)
        if problem is None and extra and (num % 2 or size % 2):
            problem = f"butterfly factors need an even block count and size (got {num} blocks of {size})"
        if problem:
            raise ConfigError(
                f"BOFT cannot split {path} (in_features={in_features}) with {option}={wanted}: {problem}. Choose "
                f"{option} in {divisors_near(in_features, wanted)} (or fewer boft_n_butterfly_factor), or leave "
                f"{path} out with exclude_modules.")
        return num, size

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict:
        """PEFT's ``adapter_config.json`` for BOFT."""
        fields = {k: getattr(self, k) for k in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor",
                                                "boft_dropout", "init_weights")}
        return peft_file_dict("BOFT", layers, module_paths, model_info,
                              fan_in_fan_out=any(a.kind.fan_in_fan_out for a in layers.values()), **fields)

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> BOFTConfig:
        names = [f.name for f in dataclasses.fields(cls) if f.name not in AdapterConfig.option_names()]
        return cls(**common_peft_options(data, "BOFT"), **{k: data[k] for k in names if k in data and k != "method"})


def butterfly_permutation(n: int, blocks: int, half: int, factors: int) -> Tensor:
    """PEFT's ``block_butterfly_perm``: within each run of ``n / blocks`` indices, the chunks of ``half`` indices are
    reordered evens first, then odds. ``factors == 0`` (a single factor) is the identity."""
    if factors == 0:
        return torch.arange(n)
    run = n // blocks
    chunk_order = [*range(0, run // half, 2), *range(1, run // half, 2)]
    order = torch.cat([torch.arange(c * half, (c + 1) * half) for c in chunk_order])
    return torch.cat([start + order for start in range(0, n, run)])


class BOFTUpdate(WeightUpdate):
    """BOFT on ``nn.Linear`` or ``Conv1D``: the input rotated by M, the base output (without bias) scaled by s."""

    transforms_input = True

    def __init__(self, base_layer: nn.Module, config: BOFTConfig, num: int, size: int) -> None:
        super().__init__(config)
        in_features, out_features = base_kind(base_layer).dims(base_layer)
        weight = base_layer.weight
        factory = {"device": weight.device,
                   "dtype": weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32}
        factors = config.boft_n_butterfly_factor
        self.boft_R = nn.Parameter(torch.zeros(factors, num, size, size, **factory))
        self.boft_s = nn.Parameter(torch.ones(out_features, 1, **factory))
        if not config.init_weights:
            nn.init.normal_(self.boft_R, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        perms = torch.stack([butterfly_permutation(in_features, num // 2 ** i, size // 2, factors - 1)
                             for i in range(factors)])
        self.register_buffer("perm", perms.to(weight.device), persistent=False)
        self.register_buffer("inverse_perm", torch.argsort(perms, dim=1).to(weight.device), persistent=False)

    def rotations(self, dropout: bool = False) -> Tensor:
        """The orthogonal blocks ``(factors, blocks, b, b)``; with ``dropout`` (the forward in training),
        ``boft_dropout`` sets some of one factor's blocks to ``I`` (drawn as PEFT draws them)."""
        a = self.boft_R.flatten(0, 1)
        blocks = cayley(0.5 * (a - a.transpose(-2, -1))).view_as(self.boft_R)
        if dropout and self.config.boft_dropout > 0:
            chosen = int(torch.randint(0, blocks.shape[0], (1,)).item())
            dropped = drop_blocks(blocks[chosen], self.config.boft_dropout)
            blocks = torch.cat([blocks[:chosen], dropped[None], blocks[chosen + 1:]])
        return blocks

    def factor(self, h: Tensor, blocks: Tensor, i: int) -> Tensor:
        """``h B_i = ((h P_i) diag(blocks)) P_i^T``, the permutations as gathers (P_0 is the identity: none)."""
        if i == 0:
            return rotate_blocks(h, blocks)
        return rotate_blocks(h[..., self.inverse_perm[i]], blocks)[..., self.perm[i]]

    def transform_input(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        """``x M = x B_m ... B_0``."""
        blocks = self.rotations(dropout=self.training)
        h = x.to(blocks.dtype)
        for i in reversed(range(blocks.shape[0])):
            h = self.factor(h, blocks[i], i)
        return h.to(x.dtype)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``s * (out - b) + b``."""
        scale = self.boft_s.view(-1).to(out.dtype)
        return out * scale if layer.bias is None else torch.addcmul(layer.bias * (1 - scale), out, scale)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """``s * (W M^T) - W``: every row of W through ``B_0^T``, then ``B_1^T``, ... ``B_m^T``."""
        blocks = self.rotations()
        w = layer.linear_weight().to(blocks.dtype)
        h = w
        for i in range(blocks.shape[0]):
            h = self.factor(h, blocks[i].transpose(-2, -1), i)
        return h * self.boft_s - w


def build_boft(base_layer: nn.Module, config: BOFTConfig, path: str) -> BOFTUpdate:
    in_features, _ = base_kind(base_layer).dims(base_layer)
    num, size = config.blocks(in_features, path)
    return BOFTUpdate(base_layer, config, num, size)


def supports_boft(module: nn.Module) -> bool:
    kind = base_kind(module)
    return kind is not None and kind.family == "linear"
