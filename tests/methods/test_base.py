"""AdaptedLayer: one forward for every base layer type and method, its base computation per layer type, and a
forward that torch.compile traces in one graph."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from conftest import make_llama, make_plain
from peft_oracle import logits, randomize_adapters
from torch import nn

from lightning_lora.config import AdapterConfig
from lightning_lora.io import file_tensors
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
    """The families of the brief, each registered under its name and each with a config class."""
    from lightning_lora.config import config_class_for

    assert set(METHODS) == {"lora", "dora", "adalora", "houlsby", "pfeiffer", "oft", "boft", "hra", "bone", "miss",
                            "loha", "lokr", "vera", "llama_adapter", "prefix", "prompt", "bitfit", "xlora"}
    for name, spec in METHODS.items():
        assert spec.name == name and name in config_class_for(name).METHODS
    assert method_spec("dora").mergeable and not method_spec("houlsby").mergeable
    with pytest.raises(Exception, match="Unknown method 'nope'"):
        method_spec("nope")


@pytest.mark.parametrize("method,make,targets", [
    ("lora", lambda: make_llama(layers=1), "all-linear"),
    ("dora", lambda: make_llama(layers=1), "all-linear"),
    ("lora", make_plain, ["embed", "conv", "block.0", "head"]),
], ids=["lora-llama", "dora-llama", "lora-embedding-conv-linear"])
def test_adapted_forward_compiles_without_graph_breaks(method: str, make: Callable[[], nn.Module],
                                                       targets: Any) -> None:
    """The hot path has no Python that dynamo cannot trace (no per-call dicts, no type switches)."""
    model = make()
    inject(model, AdapterConfig.create(method, target_modules=targets, r=2, dropout=0.1))
    assert any(isinstance(m, AdaptedLayer) for m in model.modules())
    model.train()
    tokens = torch.randint(3, 64, (2, 5))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda t: logits(model, t))(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_two_named_adapters_on_one_layer_merge_and_unmerge_independently() -> None:
    """The data model later issues build on: updates by name in one layer, each merged or not on its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    config = AdapterConfig.create("lora", target_modules=["0"], r=2, init_weights=False)
    inject(model, config)
    layer = model[0]
    layer.adapters["second"] = method_spec("lora").build(layer.original_module, config, "0")
    base_weight = layer.weight.detach().clone()
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = x @ (base_weight + layer.delta_weight("default") + layer.delta_weight("second")).T + layer.bias
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        layer.merge(["second"])
        assert layer.adapters["second"].merged and not layer.adapters["default"].merged
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge(["default"])
        torch.testing.assert_close(layer.weight, base_weight + layer.delta_weight("second"), rtol=1e-5, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, base_weight, rtol=0, atol=1e-6)
    names = {"0.lora_A.weight", "0.lora_B.weight"}
    assert set(file_tensors({"0": layer})) == set(file_tensors({"0": layer}, "second")) == names
    assert file_tensors({"0": layer}, "second")["0.lora_A.weight"] is layer.adapters["second"].lora_A.weight
