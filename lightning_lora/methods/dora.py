"""DoRA (Liu et al. 2024, arXiv 2402.09353): W = m * (W0 + s B A) / ||W0 + s B A||, norm taken per output unit.

As in the paper (section 4.3) and PEFT, the norm is a constant in backward. The row norms are computed from
``||W0||``, ``W0 A^T`` and ``B (A A^T)``, so no second full-size weight is built in forward:
``||W0_i + s (BA)_i||^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 B_i (A A^T) B_i^T``.
On ``nn.Conv*d`` the unit is an output channel (the kernel flattened, m shaped ``(1, out, 1, ...)`` as PEFT stores it);
on ``nn.Embedding`` it is an embedding dimension, the norm taken over the vocabulary (PEFT's choice), and m scales the
whole lookup.
"""

from __future__ import annotations

import re
from typing import Optional

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


# Paths whose DoRA recomputes the base output in backward (``DoRAUpdate.recompute_base``): the query and key
# projections, whose outputs nothing else keeps for backward (a rotary embedding or a query scaling makes new tensors of
# them before the attention op keeps its inputs; rotary's own backward keeps only cos and sin).
RECOMPUTE_BASE = re.compile(r"(^|\.)(q_proj|k_proj)$")


class _DoRAOutput(torch.autograd.Function):
    """DoRA's linear output ``out + s_l L + (s - 1) C``, ``C = base + s_l L`` (``L = B A x``, ``s_l`` LoRA's scaling,
    ``s = m / n`` per output unit with the norm ``n`` a constant), with its gradients written out. ``m``'s gradient,
    ``sum_tokens(g * C) / n``, is all that needs a ``(tokens, out)`` tensor in backward; ``keep`` says where it comes
    from (autograd's own formula would keep two such tensors, the base output and the LoRA output):

    - ``"combined"``: ``C`` itself, kept from forward;
    - ``"output"`` (``base`` is ``out - bias`` and no other update of the layer writes into the result in place): the
      result ``r`` itself, ``r = bias + s C`` making ``m``'s gradient ``sum_tokens(g * (r - bias)) / m``; the layer's
      next operation usually keeps ``r`` anyway (Llama's SiLU and gate product keep the gate and up projections'
      outputs, attention its value input), so those layers keep nothing extra. An output unit whose magnitude is
      exactly 0 then gets no magnitude gradient;
    - ``"recompute"``: nothing of that size: ``sum_tokens(g * C)`` per unit is ``rowsum(W * (g^T x))`` plus
      ``s_l rowsum(B * (g^T (x A^T)))``, from the input ``x_in`` and ``x A^T``, which LoRA's own matmuls keep anyway:
      one more GEMM of the base layer's size in backward, and a weight-sized temporary there (written this way, not
      as ``x W^T`` again, which the compiler's common-subexpression pass would merge with forward's base output and
      keep after all). For layers whose output nothing else keeps (``RECOMPUTE_BASE``). ``weight`` is the layer's
      weight as stored (dequantized in backward, so a quantized base keeps no dense copy), ``transposed`` for
      ``Conv1D``.

    ``s - 1`` is taken in float32 and the two small terms are summed before the large base output (rounding
    ``m / n`` to bfloat16 first, or adding the terms one by one, would lose a magnitude change below ~0.3%).
    """

    @staticmethod
    def forward(ctx, out: Tensor, base: Optional[Tensor], bias: Optional[Tensor], lora: Tensor, magnitude: Tensor,
                norm: Tensor, lora_scaling: float, keep: str, x_in: Optional[Tensor] = None,
                weight: Optional[Tensor] = None, after_a: Optional[Tensor] = None, b_weight: Optional[Tensor] = None,
                transposed: bool = False) -> Tensor:
        dtype = out.dtype
        scale = magnitude.float() / norm
        scaled_lora = lora * lora_scaling
        combined = (out if bias is None else out - bias) if base is None else base
        combined = combined + scaled_lora
        result = out + (scaled_lora + (scale - 1).to(dtype) * combined)
        ctx.keep, ctx.base_given, ctx.lora_scaling, ctx.transposed = keep, base is not None, lora_scaling, transposed
        ctx.magnitude_dtype = magnitude.dtype
        if keep == "output":
            ctx.save_for_backward(result, bias, magnitude, scale)
        elif keep == "combined":
            ctx.save_for_backward(combined, bias, norm, scale)
        else:
            ctx.save_for_backward(None, bias, norm, scale, x_in, weight, after_a, b_weight)
        return result

    @staticmethod
    def backward(ctx, grad: Tensor):
        kept, bias, divisor, scale = ctx.saved_tensors[:4]
        dtype = grad.dtype
        shift = (scale - 1).to(dtype)
        needs = ctx.needs_input_grad
        grad_out = grad_base = grad_bias = grad_lora = grad_m = None
        if ctx.base_given:
            grad_out = grad
            grad_base = grad * shift if needs[1] else None
        else:  # out enters directly and through base = out - bias: g * s, with s - 1 at its own precision
            grad_out = torch.addcmul(grad, grad, shift) if needs[0] else None
            if needs[2]:
                grad_bias = -(grad.sum(0, dtype=torch.float32) * (scale - 1)).to(bias.dtype)
        if needs[3]:
            grad_lora = grad * (scale * ctx.lora_scaling).to(dtype)
        if needs[4]:
            if ctx.keep == "recompute":  # sum_t g C = rowsum(W * (g^T x)) + s_l rowsum(B * (g^T x A^T))
                x_in, weight, after_a, b_weight = ctx.saved_tensors[4:]
                w = dense(weight)
                w = w.T if ctx.transposed else w
                dot = (w.float() * (grad.T @ x_in.to(dtype)).float()).sum(1)
                dot = dot + ctx.lora_scaling * (b_weight.float() * (grad.T @ after_a).float()).sum(1)
            else:
                dot = (grad * kept).sum(0, dtype=torch.float32)
            if ctx.keep == "output":
                if bias is not None:
                    dot = dot - bias.float() * grad.sum(0, dtype=torch.float32)
                grad_m = torch.where(divisor != 0, dot / divisor.float(), torch.zeros_like(dot))
            else:
                grad_m = dot / divisor
            grad_m = grad_m.to(ctx.magnitude_dtype)
        return grad_out, grad_base, grad_bias, grad_lora, grad_m, None, None, None, None, None, None, None, None


class DoRAUpdate(LoRAUpdate):
    """DoRA on ``nn.Linear`` or ``Conv1D``: LoRA's A and B plus ``lora_magnitude_vector`` (PEFT's name for m).
    ``recompute_base`` (set by ``build_dora`` from ``RECOMPUTE_BASE``): backward recomputes the base output instead of
    keeping a ``(tokens, out)`` tensor from forward (see ``_DoRAOutput``)."""

    recompute_base = False

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
        norm = self.column_norm(w)
        base = None  # the base output without bias: out - bias
        if not (isinstance(self.lora_dropout, nn.Identity) or not self.training):
            # as in PEFT: the magnitude rescales the dropped-out input's base projection
            x = self.lora_dropout(x)
            base = F.linear(x.to(dtype), w.to(dtype))
        x_in = x.to(dtype)
        after_a = F.linear(x_in, self.lora_A.weight.to(dtype)).to(dtype)
        b_weight = self.lora_B.weight.to(dtype)
        lora = F.linear(after_a, b_weight).to(dtype)
        if self.recompute_base:
            return _DoRAOutput.apply(out, base, layer.bias, lora, self.lora_magnitude_vector, norm, self.scaling,
                                     "recompute", x_in, layer.weight, after_a, b_weight, layer.kind.fan_in_fan_out)
        keep = "output" if base is None and len(layer.adapters) == 1 else "combined"  # nothing else writes in place
        return _DoRAOutput.apply(out, base, layer.bias, lora, self.lora_magnitude_vector, norm, self.scaling, keep)

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
            # quantize_base(device=...) may have put the new base on the accelerator ahead of the adapter
            w, a, b = layer.linear_weight(), self.lora_A.weight, self.lora_B.weight
            self.lora_magnitude_vector.copy_(factored_norm(w, a.to(w.device), b.to(w.device), self.scaling))


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
    update = UPDATES[base_kind(base_layer).family](base_layer, config, r, alpha)
    if isinstance(update, DoRAUpdate) and RECOMPUTE_BASE.search(path):
        update.recompute_base = True
    return update


def supports_dora(module: nn.Module) -> bool:
    return base_kind(module) is not None
