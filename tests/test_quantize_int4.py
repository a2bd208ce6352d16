"""Our packed int4 layout (lightning_lora/int4.py), the default for quantize="int4": half a byte a weight, the same
math as a plain per-group min-max reference, and a backward through QuantizedLinear (one graph under torch.compile:
tests/test_quantize.py::test_bfloat16_base_and_compile_without_graph_breaks)."""

from __future__ import annotations

import torch
from conftest import make_llama

import lightning_lora as ll
from lightning_lora.int4 import PackedInt4Tensor, quantize_int4
from lightning_lora.quantize import (
    Int4Config,
    QuantizedLinear,
    _register_dequantizers,
    dequantize,
    quantize_base,
    quantized_layers,
)


def reference_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Asymmetric min-max int4 per group of a row, written the slow obvious way."""
    out = torch.empty_like(weight, dtype=torch.float32)
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], group_size):
            group = weight[row, start:start + group_size].float()
            low, high = group.min(), group.max()
            scale = max((high - low) / 15, torch.finfo(torch.float32).tiny)
            out[row, start:start + group_size] = ((group - low) / scale).round().clamp(0, 15) * scale + low
    return out


def test_packed_int4_equals_the_reference_in_half_a_byte_a_weight() -> None:
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    packed = quantize_int4(weight, 16)
    assert isinstance(packed, PackedInt4Tensor) and packed.shape == weight.shape and packed.dtype == torch.float32
    assert packed.qdata.dtype == torch.uint8 and packed.qdata.shape == (24, 32)  # two codes a byte
    assert packed.nbytes_stored() == 24 * 32 + 2 * 4 * 24 * 4  # codes + float32 scale and offset per group of 16
    torch.testing.assert_close(packed.dequantize(), reference_int4(weight, 16), rtol=0, atol=1e-6)
    assert 0.05 < ((packed.dequantize() - weight).norm() / weight.norm()).item() < 0.1

    half = quantize_int4(weight.bfloat16(), 16)
    assert half.scale.dtype == torch.bfloat16 and half.dequantize().dtype == torch.bfloat16
    assert half.to(torch.float32).dtype == torch.float32 and type(half.to(torch.float32)) is torch.Tensor
    moved = packed.to("cpu")
    assert type(moved) is PackedInt4Tensor and torch.equal(moved.dequantize(), packed.dequantize())
    constant = quantize_int4(torch.full((2, 16), 0.5), 16)  # a group whose max equals its min
    assert torch.equal(constant.dequantize(), torch.full((2, 16), 0.5))


def test_training_through_packed_int4_backward_is_the_transposed_product() -> None:
    _register_dequantizers()  # what quantize_base does before anything dequantizes
    weight = quantize_int4(torch.randn(16, 32, dtype=torch.float64), 8)
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: QuantizedLinear.apply(t, weight), (x,))
    grad = torch.randn(5, 16, dtype=torch.float64)
    QuantizedLinear.apply(x, weight).backward(grad)
    torch.testing.assert_close(x.grad, grad @ dequantize(weight))

    model = make_llama()
    ll.inject(model, {"method": "lora", "r": 4}, seed=1)
    assert Int4Config(group_size=16).packing == "auto"
    quantize_base(model, Int4Config(group_size=16))
    assert all(type(layer.weight) is PackedInt4Tensor for layer in quantized_layers(model).values())
