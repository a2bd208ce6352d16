"""Packed int4 base weights for training through them: two 4-bit codes a byte, a scale and an offset per group.

torchao's CUDA int4 layout (tile-packed for tinygemm) has a fast inference matmul but no backward, and nothing that
unpacks it short of a matmul with the identity, which makes training steps many times slower than bf16. This layout
is for the other job: the frozen base of QLoRA, dequantized for one bf16 matmul in forward and one in backward
(``quantize.QuantizedLinear``). Dequantization is a handful of elementwise tensor ops (unpack the nibbles, scale, add
the offset), the same on the CPU and on CUDA, which ``torch.compile`` fuses into one kernel that feeds the GEMM.

Per row and group of ``group_size`` weights (asymmetric min-max, as torchao's int4 weight-only):
``scale = (max - min) / 15``, ``code = round((w - min) / scale)`` in 0..15, ``w' = code * scale + min``. Storage: half a
byte per weight plus two values of the weight's dtype per group (4.25 bits a weight with bf16 and groups of 128).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchao.utils import TorchAOBaseTensor

aten = torch.ops.aten


class PackedInt4Tensor(TorchAOBaseTensor):
    """A frozen ``(out_features, in_features)`` weight as packed 4-bit codes (``qdata``: uint8 ``(out, in // 2)``, the
    even column in the low nibble), with ``scale`` and ``offset`` of shape ``(out, in // group_size)`` in ``dtype``."""

    tensor_data_names = ["qdata", "scale", "offset"]
    tensor_attribute_names = ["group_size", "shape", "dtype"]

    def __new__(cls, qdata: Tensor, scale: Tensor, offset: Tensor, group_size: int, shape: torch.Size,
                dtype: torch.dtype) -> PackedInt4Tensor:
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(self, qdata: Tensor, scale: Tensor, offset: Tensor, group_size: int, shape: torch.Size,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.qdata, self.scale, self.offset = qdata, scale, offset
        self.group_size = group_size

    @classmethod
    def from_float(cls, weight: Tensor, group_size: int) -> PackedInt4Tensor:
        """Quantize a 2-D float weight whose columns are a multiple of ``group_size`` (an even number)."""
        out_features, in_features = weight.shape
        groups = weight.detach().reshape(out_features, in_features // group_size, group_size).float()
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        codes = ((groups - low) / scale).round_().clamp_(0, 15).to(torch.uint8).reshape(out_features, in_features)
        qdata = codes[:, 0::2] | (codes[:, 1::2] << 4)
        return cls(qdata.contiguous(), scale.squeeze(-1).to(weight.dtype), low.squeeze(-1).to(weight.dtype),
                   group_size, weight.shape, weight.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight as a plain tensor in ``dtype`` (default: its own): pure tensor ops (four kernels eager: two to
        unpack, one to interleave, one multiply-add), fused into one by ``torch.compile``."""
        dtype = dtype or self.dtype
        out_features, in_features = self.shape
        codes = torch.stack((self.qdata & 15, self.qdata >> 4), dim=-1)  # uint8; addcmul promotes it
        codes = codes.reshape(out_features, in_features // self.group_size, self.group_size)
        weight = torch.addcmul(self.offset.to(dtype).unsqueeze(-1), codes, self.scale.to(dtype).unsqueeze(-1))
        return weight.reshape(out_features, in_features)

    def nbytes_stored(self) -> int:
        """Bytes this weight takes (codes, scales and offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.offset))


implements = PackedInt4Tensor.implements


@implements(aten._to_copy.default)
def _to_copy(func: Any, types: Any, args: Any, kwargs: Any) -> Tensor:
    """``.to(device)`` moves the packed data; ``.to(dtype)`` to another dtype dequantizes (as torchao's NF4 does)."""
    self = args[0]
    options = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype = options["device"], options.get("dtype") or self.dtype
    if dtype != self.dtype:
        return self.dequantize(dtype).to(device)
    return PackedInt4Tensor(self.qdata.to(device), self.scale.to(device), self.offset.to(device), self.group_size,
                            self.shape, self.dtype)


def quantize_int4(weight: Tensor, group_size: int) -> PackedInt4Tensor:
    """``weight`` (2-D) as a ``PackedInt4Tensor`` with groups of ``group_size`` along each row."""
    return PackedInt4Tensor.from_float(weight, group_size)
