"""OFT (Qiu et al. 2023, arXiv 2306.07280): W' = W R^T with R = diag(R_1, ..., R_n) block-diagonal orthogonal.

Each block is the Cayley map of a skew-symmetric Q_i (PEFT's truncated Neumann series by default, the exact
``(I - Q)(I + Q)^-1`` with ``use_cayley_neumann=False``), so Q = 0 starts at the base model. As in PEFT, the update
rotates the layer's input, ``y = W (R^T x) + b``, block by block: no ``(in, in)`` matrix and no rotated weight is
built in forward. COFT (constrained OFT) keeps each ``||Q_i||`` within ``eps / sqrt(n)`` by projecting the parameters
before use, as PEFT does. The tensor ``oft_R.weight`` holds the strict upper triangles of the Q_i (PEFT's layout).
On ``nn.Embedding``, as in PEFT, the looked-up vectors are rotated instead (``E' = E R``, ``oft_embedding_R.weight``).
"""

from __future__ import annotations

import dataclasses
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
    _is_real,
    _plain,
    register_config,
)
from ._orthogonal import (
    cayley,
    cayley_neumann,
    common_peft_options,
    divisors_near,
    drop_blocks,
    flag,
    non_negative_int,
    packed,
    peft_file_dict,
    probability,
    rotate_blocks,
    skew,
)
from .base import AdaptedLayer, WeightUpdate, base_kind

NEUMANN_FORMAT = "0.18.0"  # PEFT's Cayley-Neumann series changed in 0.18; files say they hold the newer one


@register_config
@dataclass
class OFTConfig(AdapterConfig):
    """OFT: give either ``r`` (blocks per layer) or ``oft_block_size`` (their size; 32 when neither is given), as in
    PEFT; the other follows from each layer's ``in_features``, which must divide evenly. ``module_dropout`` turns
    that fraction of the blocks into ``I`` at each training step; ``coft``/``eps`` constrain the rotation;
    ``block_share`` uses one block for the whole layer; ``init_weights=False`` starts from random Q (for tests)."""

    method: str = "oft"
    r: int = 0
    oft_block_size: int = 0
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init_weights: bool = True

    METHODS: ClassVar[tuple[str, ...]] = ("oft",)
    PEFT_TYPE: ClassVar[str | None] = "OFT"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        super().__post_init__()
        self.r = non_negative_int("r", self.r)
        self.oft_block_size = non_negative_int("oft_block_size", self.oft_block_size)
        if self.r and self.oft_block_size:
            raise ConfigError(f"Give either r={self.r} (blocks per layer) or oft_block_size={self.oft_block_size}, "
                              "not both: r x oft_block_size must equal each layer's in_features.")
        if not self.r and not self.oft_block_size:
            self.oft_block_size = 32
        self.module_dropout = probability("module_dropout", self.module_dropout)
        for option in ("coft", "block_share", "use_cayley_neumann", "init_weights"):
            flag(option, getattr(self, option))
        if not _is_real(self.eps) or not self.eps > 0:
            raise ConfigError(f"eps must be a positive number such as 6e-5 (COFT's radius), {_got(self.eps)}.")
        self.eps = _plain(self.eps)
        if not _is_int(self.num_cayley_neumann_terms) or self.num_cayley_neumann_terms < 1:
            raise ConfigError("num_cayley_neumann_terms must be an integer >= 1 such as 5, "
                              f"{_got(self.num_cayley_neumann_terms)}.")

    def blocks(self, in_features: int, path: str) -> tuple[int, int]:
        """(number of blocks, block size) for a layer with ``in_features`` inputs."""
        option, wanted = ("r", self.r) if self.r else ("oft_block_size", self.oft_block_size)
        if in_features % wanted:
            near = divisors_near(in_features, wanted)
            raise ConfigError(
                f"OFT cannot split {path} (in_features={in_features}) into {option}={wanted}: {in_features} is not "
                f"divisible by {wanted}. Use {option} in {near} (PEFT would silently pick the nearest), or leave "
                f"{path} out with exclude_modules.")
        count, size = (wanted, in_features // wanted) if self.r else (in_features // wanted, wanted)
        if size < 2:
            raise ConfigError(f"OFT with {option}={wanted} gives {path} 1 x 1 blocks, which have nothing to train (a "
                              "1 x 1 rotation is 1); use blocks of size 2 or more.")
        return count, size

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict:
        """PEFT's ``adapter_config.json`` for OFT."""
        fields = {k: getattr(self, k) for k in ("r", "oft_block_size", "module_dropout", "coft", "eps", "block_share",
                                                "use_cayley_neumann", "num_cayley_neumann_terms", "init_weights")}
        return peft_file_dict("OFT", layers, module_paths, model_info, peft_version=NEUMANN_FORMAT,
                              fan_in_fan_out=any(a.kind.fan_in_fan_out for a in layers.values()), **fields)

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> OFTConfig:
        if "oft_block_size" not in data:
            raise ConfigError("This OFT adapter predates PEFT 0.14 (no oft_block_size), whose OFT computed "
                              "differently; retrain it with a current PEFT or lightning_lora.")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in AdapterConfig.option_names()]
        return cls(**common_peft_options(data, "OFT"), **{k: data[k] for k in names if k in data and k != "method"})


class OFTRotation(nn.Module):
    """PEFT's ``oft_R``: the packed skew-symmetric generators of the blocks and their Cayley map."""

    def __init__(self, count: int, block_size: int, config: OFTConfig, **factory: Any) -> None:
        super().__init__()
        self.block_size, self.config = block_size, config
        self.weight = nn.Parameter(torch.zeros(count, block_size * (block_size - 1) // 2, **factory))
        if not config.init_weights:
            nn.init.normal_(self.weight, std=0.1)

    def forward(self) -> Tensor:
        """The orthogonal blocks ``(count, b, b)``."""
        if self.config.coft:  # as in PEFT: the parameters themselves are projected back onto the ball
            with torch.no_grad():
                self.weight.copy_(self.project(self.weight))
        q = skew(self.weight, self.block_size)
        if self.config.use_cayley_neumann:
            return cayley_neumann(q, self.config.num_cayley_neumann_terms)
        return cayley(q)

    def project(self, upper: Tensor) -> Tensor:
        """COFT: each Q_i scaled back to Frobenius norm ``eps / sqrt(count)`` when it is longer."""
        q = skew(upper, self.block_size)
        radius = self.config.eps / upper.shape[0] ** 0.5
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        return packed(torch.where(norm <= radius, q, radius * q / norm))


class OFTUpdate(WeightUpdate):
    """OFT on ``nn.Linear`` or ``Conv1D``: the input rotated by ``R`` before the base op."""

    transforms_input = True
    rotation_name = "oft_R"  # PEFT's name for the module that holds the generators

    def __init__(self, base_layer: nn.Module, config: OFTConfig, count: int, block_size: int) -> None:
        super().__init__(config)
        self.count, self.block_size = count, block_size
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.add_module(self.rotation_name, OFTRotation(1 if config.block_share else count, block_size, config,
                                                        device=weight.device, dtype=dtype))

    def blocks(self, dropout: bool = False) -> Tensor:
        """R's ``count`` blocks; with ``dropout`` (the training forward) ``module_dropout`` makes some of them ``I``."""
        blocks = self._modules[self.rotation_name]()
        if dropout and self.config.module_dropout > 0 and not self.config.block_share:
            blocks = drop_blocks(blocks, self.config.module_dropout)
        return blocks.expand(self.count, -1, -1) if self.config.block_share else blocks

    def transform_input(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        """``x R``, block by block, in the adapter's dtype (as PEFT; then back to the activations' dtype)."""
        blocks = self.blocks(dropout=self.training)
        return rotate_blocks(x.to(blocks.dtype), blocks).to(x.dtype)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        return out  # all of OFT is in transform_input

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """``W R^T - W``: every row of ``W`` rotated by ``R^T``."""
        blocks = self.blocks()
        w = layer.linear_weight().to(blocks.dtype)
        return rotate_blocks(w, blocks.transpose(-2, -1)) - w


class OFTEmbeddingUpdate(OFTUpdate):
    """OFT on ``nn.Embedding``, as PEFT: the looked-up vectors rotated, ``E' = E R`` (``oft_embedding_R``)."""

    transforms_input = False
    rotation_name = "oft_embedding_R"

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out R``."""
        blocks = self.blocks(dropout=self.training)
        return rotate_blocks(out.to(blocks.dtype), blocks).to(out.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """``E R - E`` (the embedding's own ``(num, dim)`` layout)."""
        blocks = self.blocks()
        e = layer.linear_weight().to(blocks.dtype)
        return rotate_blocks(e, blocks) - e


def build_oft(base_layer: nn.Module, config: OFTConfig, path: str) -> OFTUpdate:
    kind = base_kind(base_layer)
    in_features, embedding_dim = kind.dims(base_layer)
    if kind.family == "embedding":  # the rotated dimension is the vectors'
        return OFTEmbeddingUpdate(base_layer, config, *config.blocks(embedding_dim, path))
    return OFTUpdate(base_layer, config, *config.blocks(in_features, path))


def supports_oft(module: nn.Module) -> bool:
    kind = base_kind(module)
    return kind is not None and kind.family in ("linear", "embedding")
