"""DoRA's linear forward keeps one (tokens, out) tensor for backward, not two (``dora._DoRAOutput``), and computes
what the plain autograd formula computes: outputs and gradients, with and without bias and dropout (PEFT's outputs and
gradients: tests/methods/test_dora.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.dora import DoRAUpdate
from peft_oracle import randomize_adapters, square_loss


def autograd_reference(update: DoRAUpdate, layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The formula as autograd differentiates it (the implementation before ``_DoRAOutput``)."""
    dtype = out.dtype
    w = layer.linear_weight()
    scale = update.lora_magnitude_vector.float() / update.column_norm(w)
    if isinstance(update.lora_dropout, nn.Identity) or not update.training:
        x_in, base = x, (out if layer.bias is None else out - layer.bias)
    else:
        x_in = update.lora_dropout(x)
        base = nn.functional.linear(x_in.to(dtype), w.to(dtype))
    after_a = nn.functional.linear(x_in.to(dtype), update.lora_A.weight.to(dtype))
    lora = nn.functional.linear(after_a, update.lora_B.weight.to(dtype)) * update.scaling
    return out + ((scale - 1).to(dtype) * base + scale.to(dtype) * lora)


def dora_layer(bias: bool, dropout: float, adapters: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10, bias=bias))
    ll.inject(model, ll.AdapterConfig.create("dora", r=3, dropout=dropout, target_modules=["0"]))
    randomize_adapters(model, seed=1)
    layer = model[0]
    with torch.no_grad():
        layer.adapters["default"].lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(10))
        if bias:
            layer.bias.requires_grad_(True)
    if adapters == 2:  # a second (zero) LoRA adapter on the layer: the result must not be kept (keep_output off)
        from lightning_lora.methods.lora import LoRAUpdate
        layer.adapters["other"] = LoRAUpdate(layer.original_module, layer.adapters["default"].config, 2, 4.0)
    return layer.train()


@pytest.mark.parametrize(("bias", "dropout", "adapters"), [(False, 0.0, 1), (True, 0.0, 1), (True, 0.3, 1),
                                                           (True, 0.0, 2)])
def test_outputs_and_gradients_equal_the_autograd_formula(bias: bool, dropout: float, adapters: int) -> None:
    layer = dora_layer(bias, dropout, adapters)
    update = layer.adapters["default"]
    x = torch.randn(2, 7, 12, requires_grad=True)
    params = [x, update.lora_A.weight, update.lora_B.weight, update.lora_magnitude_vector] + ([layer.bias] if bias else [])
    results = []
    for forward in ("ours", "reference"):
        torch.manual_seed(5)  # the same dropout mask
        if forward == "ours":
            y = layer(x)
        else:
            x2 = x.reshape(-1, 12)
            y = autograd_reference(update, layer, x2, nn.functional.linear(x2, layer.weight, layer.bias))
            for other in list(layer.adapters.values())[1:]:
                y = other(layer, x2, y)
            y = y.view(2, 7, 10)
        grads = torch.autograd.grad(square_loss(y), params)
        results.append((y, grads))
    (y, grads), (y_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def saved_bytes(fn) -> tuple[int, list[torch.Tensor]]:
    """Bytes of distinct storages autograd keeps for backward while ``fn`` runs, and the kept tensors."""
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(storages.values()), kept, out


def test_backward_keeps_one_output_sized_tensor_or_the_output_itself() -> None:
    """LoRA keeps nothing of the output's size; DoRA keeps exactly one such tensor, and with a single adapter and no
    dropout it is the layer's own output (which the next operation usually keeps anyway)."""
    tokens, d_in, d_out = 64, 32, 48
    x = torch.randn(tokens, d_in, requires_grad=True)
    sizes = {}
    for method in ("lora", "dora"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
        ll.inject(model, ll.AdapterConfig.create(method, r=4, target_modules=["0"]))
        total, kept, out = saved_bytes(lambda model=model: model(x))
        output_sized = [t for t in kept if t.numel() == tokens * d_out]
        sizes[method] = (total, output_sized, out)
    lora_total, lora_big, _ = sizes["lora"]
    dora_total, dora_big, dora_out = sizes["dora"]
    assert lora_big == []
    assert len({t.untyped_storage().data_ptr() for t in dora_big}) == 1
    assert dora_big[0].untyped_storage().data_ptr() == dora_out.untyped_storage().data_ptr()
    assert dora_total - lora_total <= tokens * d_out * 4 + 4 * d_out * 4  # the output and per-unit vectors

