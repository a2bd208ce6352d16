"""DoRA (Liu et al. 2024, arXiv 2402.09353): W = m * (W0 + s B A) / ||W0 + s B A||, norm taken per output unit.

As in the paper (section 4.3) and PEFT, the norm is a constant in backward. The row norms are computed from
``||W0||``, ``W0 A^T`` and ``B (A A^T)``, so no second full-size weight is built in forward:
``||W0_i + s (BA)_i||^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 B_i (A A^T) B_i^T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoRAConfig
from .base import AdaptedLayer, base_kind, linear_weight
from .lora import LoRAUpdate, check_rank, rank_and_alpha


class DoRAUpdate(LoRAUpdate):
    """DoRA on ``nn.Linear`` or ``Conv1D``: LoRA's A and B plus ``lora_magnitude_vector`` (PEFT's name for m)."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(base_layer, config, r, alpha)
        w = linear_weight(base_layer.weight, base_kind(base_layer))
        self.lora_magnitude_vector = nn.Parameter(self.column_norm(w).to(self.lora_A.weight.dtype))
        self.register_buffer("_norm_at_merge", None, persistent=False)

    @torch.no_grad()
    def column_norm(self, w: Tensor) -> Tensor:
        """||w + s B A|| per output unit (w in (out, in) layout), in float32, without building w + s B A."""
        a = self.lora_A.weight.to(w.dtype)
        b = self.lora_B.weight.float()
        w_norm_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
        w_at = (w @ a.T).float()  # (out, r)
        a_at = self.lora_A.weight.float() @ self.lora_A.weight.float().T  # (r, r)
        s = self.scaling
        norm_sq = w_norm_sq + 2 * s * (b * w_at).sum(1) + s * s * ((b @ a_at) * b).sum(1)
        return norm_sq.clamp_min(0).sqrt()

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


def build_dora(base_layer: nn.Module, config: LoRAConfig, path: str) -> DoRAUpdate:
    r, alpha = rank_and_alpha(config, path)
    check_rank(base_layer, r, path)
    return DoRAUpdate(base_layer, config, r, alpha)


def supports_dora(module: nn.Module) -> bool:
    kind = base_kind(module)
    return kind is not None and kind.family == "linear"
