"""DoRA (Liu et al. 2024, arXiv 2402.09353): W = m * (W0 + s B A) / ||W0 + s B A||, norm taken per output unit.

As in the paper (section 4.3) and PEFT, the norm is a constant in backward. The row norms are computed from
``||W0||``, ``W0 A^T`` and ``B (A A^T)``, so no second full-size weight is built in forward:
``||W0_i + s (BA)_i||^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 B_i (A A^T) B_i^T``.
On ``nn.Conv*d`` the unit is an output channel (the kernel flattened, m shaped ``(1, out, 1, ...)`` as PEFT stores it);
on ``nn.Embedding`` it is an embedding dimension, the norm taken over the vocabulary (PEFT's choice), and m scales the
whole lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoRAConfig
from .base import AdaptedLayer, base_kind, dense, linear_weight
from .lora import LoRAConvUpdate, LoRAEmbeddingUpdate, LoRAUpdate, check_rank, rank_and_alpha


@torch.no_grad()
def factored_norm(w: Tensor, a: Tensor, b: Tensor, s: float) -> Tensor:
    """||w + s b a|| per row (w (out, in), a (r, in), b (out, r)), in float32, without building w + s b a."""
    w_norm_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
    w_at = (w @ a.to(w.dtype).T).float()  # (out, r)
    a_at = a.float() @ a.float().T  # (r, r)
    b = b.float()
    norm_sq = w_norm_sq + 2 * s * (b * w_at).sum(1) + s * s * ((b @ a_at) * b).sum(1)
    return norm_sq.clamp_min(0).sqrt()


class DoRAUpdate(LoRAUpdate):
    """DoRA on ``nn.Linear`` or ``Conv1D``: LoRA's A and B plus ``lora_magnitude_vector`` (PEFT's name for m)."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(base_layer, config, r, alpha)
        w = linear_weight(base_layer.weight, base_kind(base_layer))
        self.lora_magnitude_vector = nn.Parameter(self.column_norm(w).to(self.lora_A.weight.dtype))
        self.register_buffer("_norm_at_merge", None, persistent=False)

    def column_norm(self, w: Tensor) -> Tensor:
        """||w + s B A|| per output unit (w in (out, in) layout), in float32, without building w + s B A."""
        return factored_norm(w, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out + (m / ||W0 + s B A|| - 1) W0 x + m / ||W0 + s B A|| s B A x``: needs the base output whole, so it does
        not use LoRA's in-place path."""
        dtype = out.dtype
        w = layer.linear_weight()
        scale = self.lora_magnitude_vector.float() / self.column_norm(w)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            x_in = x
            base_no_bias = out if layer.bias is None else out - layer.bias
        else:  # as in PEFT: the magnitude rescales the dropped-out input's base projection
            x_in = self.lora_dropout(x)
            base_no_bias = F.linear(x_in.to(dtype), w.to(dtype))
        after_a = F.linear(x_in.to(dtype), self.lora_A.weight.to(dtype)).to(dtype)
        lora_out = F.linear(after_a, self.lora_B.weight.to(dtype)).to(dtype) * self.scaling
        # scale - 1 is taken in float32 (rounding m / ||W|| to bfloat16 first would lose most of it), and the two small
        # terms are summed before the large base output: added one by one in bfloat16, a magnitude change below ~0.3%
        # would round away entirely.
        return out + ((scale - 1).to(dtype) * base_no_bias + scale.to(dtype) * lora_out)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        lora = self.lora_weight() * self.scaling
        w = layer.linear_weight().float()
        if self.merged:  # w holds m/n (W0 + s B A); recover W0 with the norm from merge time
            scale = (self.lora_magnitude_vector.float() / self._norm_at_merge).unsqueeze(1)
            return w - (w / scale - lora)
        scale = (self.lora_magnitude_vector.float() / self.column_norm(layer.linear_weight())).unsqueeze(1)
        return (scale - 1) * w + scale * lora

    def before_merge(self, layer: AdaptedLayer) -> None:
        self._norm_at_merge = self.column_norm(layer.linear_weight())

    def after_unmerge(self, layer: AdaptedLayer) -> None:
        self._norm_at_merge = None

    @torch.no_grad()
    def after_base_replaced(self, layer: AdaptedLayer) -> None:
        """While B is still zero (as initialized, so neither trained nor loaded), m starts again from the new base's
        norms: QDoRA then equals the quantized base exactly at step 0, not up to its quantization error."""
        if not self.lora_B.weight.any():
            self.lora_magnitude_vector.copy_(self.column_norm(layer.linear_weight()))


class _Rescaled:
    """DoRA over a layer whose update ``delta_weight`` (LoRA's s B A) is in the weight's own layout: m / ||W0 + s B A||
    per unit (``unit_norm``), broadcast as ``view`` along the weight, for merges (which need the norm from before the
    merge once the weight holds the merged value)."""

    lora_magnitude_vector: nn.Parameter

    def unit_norm(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def scale(self, layer: AdaptedLayer) -> Tensor:
        norm = self._norm_at_merge if self.merged else self.unit_norm(dense(layer.weight))
        return self.lora_magnitude_vector.float().reshape(-1) / norm

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        lora = super().delta_weight(layer).float()  # type: ignore[misc]
        w = dense(layer.weight).float()
        scale = self.scale(layer).view(self.view)
        if self.merged:  # w holds m/n (W0 + s B A)
            return w - (w / scale - lora)
        return (scale - 1) * w + scale * lora

    def before_merge(self, layer: AdaptedLayer) -> None:
        self._norm_at_merge = self.unit_norm(dense(layer.weight))

    def after_unmerge(self, layer: AdaptedLayer) -> None:
        self._norm_at_merge = None


class DoRAConvUpdate(_Rescaled, LoRAConvUpdate):
    """DoRA on ``nn.Conv1d/2d/3d``: m per output channel, ``(1, out, 1, ...)``."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(base_layer, config, r, alpha)
        self.view = (-1,) + (1,) * (1 + len(base_layer.kernel_size))  # m along dim 0 of the weight
        shape = (1, base_layer.out_channels) + (1,) * len(base_layer.kernel_size)
        norm = self.unit_norm(base_layer.weight)
        self.lora_magnitude_vector = nn.Parameter(norm.reshape(shape).to(self.lora_A.weight.dtype))
        self.register_buffer("_norm_at_merge", None, persistent=False)

    def unit_norm(self, weight: Tensor) -> Tensor:
        out, r = weight.shape[0], self.r
        return factored_norm(weight.reshape(out, -1), self.lora_A.weight.reshape(r, -1),
                             self.lora_B.weight.reshape(out, r), self.scaling)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out + (m/n - 1) (W0 * x) + m/n s B(A(x))`` per output channel (PEFT's order with dropout)."""
        dtype = out.dtype
        channels = (1, -1) + (1,) * (out.dim() - 2)
        scale = self.scale(layer).view(channels)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            x_in = x
            base_no_bias = out if layer.bias is None else out - layer.bias.view(channels)
        else:
            x_in = self.lora_dropout(x)
            base_no_bias = layer.original_module._conv_forward(x_in.to(dtype), dense(layer.weight).to(dtype), None)
        after_a = self.lora_A._conv_forward(x_in.to(dtype), self.lora_A.weight.to(dtype), None)
        lora_out = self.lora_B._conv_forward(after_a, self.lora_B.weight.to(dtype), None) * self.scaling
        return out + ((scale - 1).to(dtype) * base_no_bias + scale.to(dtype) * lora_out)


class DoRAEmbeddingUpdate(_Rescaled, LoRAEmbeddingUpdate):
    """DoRA on ``nn.Embedding``: m per embedding dimension, the norm over the vocabulary (as PEFT)."""

    view = (1, -1)

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(base_layer, config, r, alpha)
        norm = self.unit_norm(base_layer.weight)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_embedding_A.dtype))
        self.register_buffer("_norm_at_merge", None, persistent=False)

    def unit_norm(self, weight: Tensor) -> Tensor:
        return factored_norm(weight.T, self.lora_embedding_A, self.lora_embedding_B, self.scaling)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``m/n (W0[x] + s B A[x])``, written as ``out + (m/n - 1) out + m/n s B A[x]``."""
        dtype = out.dtype
        scale = self.scale(layer)
        with_lora = super().forward(layer, x, torch.zeros_like(out))  # s B A[x] alone
        return out + ((scale - 1).to(dtype) * out + scale.to(dtype) * with_lora)


UPDATES = {"linear": DoRAUpdate, "conv": DoRAConvUpdate, "embedding": DoRAEmbeddingUpdate}


def build_dora(base_layer: nn.Module, config: LoRAConfig, path: str) -> LoRAUpdate:
    r, alpha = rank_and_alpha(config, path)
    check_rank(base_layer, r, path)
    return UPDATES[base_kind(base_layer).family](base_layer, config, r, alpha)


def supports_dora(module: nn.Module) -> bool:
    return base_kind(module) is not None
