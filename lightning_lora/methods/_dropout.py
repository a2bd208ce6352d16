"""``F.linear(F.dropout(x, p), weight)`` that keeps for backward only ``x`` (which the base layer keeps anyway) and
the dropout mask packed to bits, not a dropped copy of ``x`` per adapted layer.

LoRA's gradient of A needs the input A saw. Without dropout that is the layer's input, which the base matmul saves
anyway and q/k/v (or gate/up) share; with dropout (Hu et al. 2021, arXiv 2106.09685; PEFT's ``lora_dropout``) every
adapted layer would keep its own dropped copy (2 bytes per element in bf16) and its mask (1 byte), 3 bytes per input
element where no dropout keeps none. ``DropoutLinear`` keeps 1/8 byte (the mask as bits) and rebuilds the dropped
input in backward. The mask is the one ``nn.Dropout`` draws (``torch.native_dropout``, which ``F.dropout`` runs on
accelerators and matches on the CPU), so a seeded run drops the same elements as the plain path, and the gradients
given that mask are the plain path's bit for bit in eager mode.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

# Multiplying 8 bytes that are each 0 or 1 (one int64, byte i = element i) by this gathers byte i's bit at bit 49 + i
# of the product, with no carries (every partial product is a distinct power of two; those past bit 63 wrap away).
_GATHER = sum(1 << (7 * i) for i in range(8))


def pack_bits(mask: Tensor) -> Tensor:
    """A bool ``(rows, n)`` mask as ``(rows, ceil(n / 8))`` uint8, bit ``i`` of byte ``j`` holding column ``8 j + i``:
    one multiply per 8 elements (a loop over bits costs ten times more in eager mode)."""
    rows, n = mask.shape
    compiling = torch.compiler.is_compiling()  # Inductor lowers no dtype view of a bool tensor on CUDA
    bytes_ = mask.to(torch.uint8) if compiling else mask.contiguous().view(torch.uint8)
    if n % 8:
        bytes_ = F.pad(bytes_, (0, 8 - n % 8))
    if compiling:  # the same bytes, as shifts and a sum Inductor fuses into the mask's kernel
        shifts = torch.arange(8, device=mask.device, dtype=torch.int32)
        return (bytes_.view(rows, -1, 8).to(torch.int32) << shifts).sum(-1).to(torch.uint8)
    return ((bytes_.view(torch.int64) * _GATHER) >> 49).to(torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """The bool ``(rows, n)`` mask ``pack_bits`` packed."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.view(packed.shape[0], -1)[:, :n]
    return bits.to(torch.bool) if torch.compiler.is_compiling() else bits.view(torch.bool)


def apply_mask(x: Tensor, mask: Tensor, p: float) -> Tensor:
    """``x`` dropped by ``mask`` and scaled by ``1 / (1 - p)``, rounded as ``torch.native_dropout`` rounds it on
    ``x``'s device (the CPU kernel scales in ``x``'s dtype, accelerators in float32), so the rebuilt input equals the
    forward's and the input gradient equals dropout's."""
    if x.device.type == "cpu":
        return x * mask.to(x.dtype).div_(1.0 - p)
    return torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p))


class DropoutLinear(torch.autograd.Function):
    """``F.linear(dropout(x, p), weight)`` on 2-D ``x``, saving ``x``, ``weight`` and the mask as bits."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, p: float) -> Tensor:
        dropped, mask = torch.native_dropout(x, p, True)
        ctx.p, ctx.n = p, x.shape[-1]
        ctx.save_for_backward(x, weight, pack_bits(mask))
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:
        x, weight, packed = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.n)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # as native_dropout_backward of F.linear's input gradient
            grad_x = apply_mask(grad.mm(weight), mask, ctx.p)
        if ctx.needs_input_grad[1]:  # as F.linear's weight gradient, from the rebuilt dropped input
            grad_weight = grad.t().mm(apply_mask(x, mask, ctx.p).to(grad.dtype))  # autocast: as F.linear cast it
        return grad_x, grad_weight, None


def dropout_linear(x: Tensor, weight: Tensor, p: float) -> Tensor:
    """``F.linear(F.dropout(x, p, training=True), weight)`` for 2-D ``x``, keeping 1/8 byte per element of ``x`` for
    backward instead of a dropped copy and a mask (``DropoutLinear``); the plain ops where nothing is saved (no
    autograd) or nothing is dropped."""
    if p == 0 or not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return F.linear(F.dropout(x, p, training=True), weight)
    return DropoutLinear.apply(x, weight, p)


def plain_dropout(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Dropout`` in training that ``dropout_linear`` can stand in for: exactly that class
    (a subclass or a replacement is called as it is) with no hook, its own or global, that calling it would run."""
    return (type(module) is nn.Dropout and module.training
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks)
            and not (_module._global_forward_pre_hooks or _module._global_forward_hooks
                     or _module._global_backward_pre_hooks or _module._global_backward_hooks))
