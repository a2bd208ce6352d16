"""Every weight-update method trains over a quantized base (issue 7: QDoRA, QLoHa, ... not only QLoRA): the adapted
model over NF4 computes what it computes over the dequantized weights, and gradients reach the adapter and the input
(so the adapters of earlier layers)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from test_quantize import FORMATS

import lightning_lora as ll
from lightning_lora.methods.base import AdaptedLayer
from lightning_lora.methods.registry import METHODS
from lightning_lora.quantize import dequantize, quantize_base

# options that fit the tiny Llama (hidden 32, intermediate 64); init_weights=False where the method has it, so the
# update is not zero at step 0 and the comparison below sees it
OPTIONS = {
    "lora": {"r": 4, "init_weights": False}, "dora": {"r": 4, "init_weights": False},
    "adalora": {"init_r": 4, "target_r": 2, "total_step": 10}, "loha": {"r": 4, "init_weights": False},
    "lokr": {"r": 4, "init_weights": False}, "vera": {"r": 4, "init_weights": False},
    "oft": {"oft_block_size": 8, "r": 0}, "boft": {"boft_block_size": 8}, "hra": {"r": 4}, "bone": {"r": 4},
    "miss": {"r": 4},
}
INSERTED = {"houlsby", "pfeiffer", "llama_adapter", "prefix", "prompt", "bitfit", "xlora"}  # no base weight to quantize


def test_the_list_covers_every_weight_update_method() -> None:
    assert set(METHODS) == set(OPTIONS) | INSERTED


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_method_trains_through_a_quantized_base(method: str, fmt: str) -> None:
    model = make_llama()
    ll.inject(model, ll.AdapterConfig.create(method, **OPTIONS[method]), seed=1)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    assert layers, f"{method} adapted nothing"
    quantize_base(model, FORMATS[fmt])
    ids = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0, "no gradient reached the input"
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    with torch.no_grad():  # the same model over the dequantized weights computes the same loss
        for layer in layers:
            layer.weight = torch.nn.Parameter(dequantize(layer.weight), requires_grad=False)
            layer.base_op = layer.kind.forward
        dense_loss = model(inputs_embeds=embeds, labels=ids).loss
    torch.testing.assert_close(loss.detach(), dense_loss, rtol=1e-5, atol=1e-5)
