"""AdaptedLayer: one forward for every base layer type and method, its base computation per layer type, and a
forward that torch.compile traces in one graph."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from peft_oracle import randomize_adapters
from torch import nn

from lightning_lora.config import AdapterConfig
from lightning_lora.methods.base import BASE_KINDS, AdaptedLayer, base_kind
from lightning_lora.methods.registry import METHODS, method_spec
from lightning_lora.surgery import inject, merge, unmerge


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_conv_lora_honors_padding_mode(conv: type, padding_mode: str) -> None:
    """lora_A pads as the base convolution does, so the adapted output equals the merged convolution's."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 5, 3, padding=1, padding_mode=padding_mode))
    x = torch.randn((2, 3, 8) if conv is nn.Conv1d else (2, 3, 6, 7))
    inject(model, AdapterConfig.create("lora", target_modules=["0"], r=2, init_weights=False))
    randomize_adapters(model, seed=1)
    with torch.no_grad():
        adapted = model(x)
        merge(model)
        torch.testing.assert_close(adapted, model(x), rtol=1e-5, atol=1e-5)
        unmerge(model)
        assert (adapted - model[0].base_forward(x)).abs().max() > 1e-3


def test_base_layer_subclasses_use_their_parents_entry() -> None:
    """The table is looked up along the class hierarchy once, at wrap time (e.g. MultiheadAttention's Linear)."""
    out_proj = nn.MultiheadAttention(8, 2).out_proj
    assert type(out_proj) is not nn.Linear and base_kind(out_proj) is BASE_KINDS[nn.Linear]
    assert base_kind(nn.LayerNorm(4)) is None


def test_registry_names_every_method() -> None:
    assert set(METHODS) == {"lora", "dora", "houlsby", "pfeiffer"}
    assert method_spec("dora").mergeable and not method_spec("houlsby").mergeable
    with pytest.raises(Exception, match="Unknown method 'nope'"):
        method_spec("nope")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapted_forward_compiles_without_graph_breaks(method: str) -> None:
    """The hot path has no Python that dynamo cannot trace (no per-call dicts, no type switches)."""
    model = make_llama(layers=1)
    inject(model, AdapterConfig.create(method, target_modules="all-linear", r=2, dropout=0.1))
    inject_free = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    assert inject_free
    model.train()
    tokens = torch.randint(3, 64, (2, 5))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda t: model(t).logits)(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
