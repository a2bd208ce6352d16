"""Named adapters on one model: add, list, activate, disable, delete, save and load in PEFT's layout, and exact
switching (the base comes back bit for bit after any sequence of merges, unmerges and switches)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft_oracle import PEFT_WARNINGS, logits
from torch import nn

from lightning_lora import (
    AdapterConfig,
    ConfigError,
    active_adapters,
    adapter_names,
    adapters,
    delete_adapter,
    disable_adapters,
    inject,
    load_adapter,
    merge,
    save_adapter,
    set_active_adapters,
    unmerge,
)
from lightning_lora.methods.base import AdaptedLayer
from lightning_lora.methods.registry import METHODS

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]

A = dict(method="lora", r=2, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False)
B = dict(method="dora", r=4, alpha=8, target_modules=["v_proj", "o_proj"], init_weights=False)


def two_adapters(seed: int = 0) -> nn.Module:
    model = make_llama(seed)
    inject(model, A, seed=1, name="a")
    inject(model, B, seed=2, name="b")
    return model


def single(options: dict, seed: int) -> nn.Module:
    model = make_llama(0)
    inject(model, options, seed=seed)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_named_adapters_switch_like_separate_models(tokens: torch.Tensor) -> None:
    model, base = two_adapters(), make_llama(0)
    only_a, only_b = single(A, 1), single(B, 2)
    assert adapter_names(model) == ["a", "b"] and active_adapters(model) == ["a"]  # a later adapter starts inactive
    v_proj = model.model.layers[0].self_attn.v_proj
    assert list(v_proj.adapters) == ["a", "b"] and v_proj.adapters["b"].r == 4 and v_proj.adapters["a"].r == 2
    assert list(model.model.layers[0].self_attn.o_proj.adapters) == ["b"]  # a layer only some adapters target
    with torch.no_grad():
        torch.testing.assert_close(logits(model, tokens), logits(only_a, tokens), rtol=0, atol=0)
        set_active_adapters(model, "b")
        torch.testing.assert_close(logits(model, tokens), logits(only_b, tokens), rtol=0, atol=0)
        with disable_adapters(model):
            torch.testing.assert_close(logits(model, tokens), logits(base, tokens), rtol=0, atol=0)
        set_active_adapters(model, ["a", "b"])  # both: each layer applies the ones it has
        both = logits(model, tokens)
        assert (both - logits(only_a, tokens)).abs().max() > 1e-3 and (both - logits(only_b, tokens)).abs().max() > 1e-3
        merge(model)  # the active set
        torch.testing.assert_close(logits(model, tokens), both, rtol=1e-5, atol=1e-5)
        set_active_adapters(model, "a")  # a merged model switches its merged weights exactly
        torch.testing.assert_close(logits(model, tokens), logits(only_a, tokens), rtol=1e-5, atol=1e-5)
        unmerge(model)
        delete_adapter(model, "a")
    assert adapter_names(model) == ["b"] and active_adapters(model) == []
    assert not isinstance(model.model.layers[0].self_attn.q_proj, AdaptedLayer)  # only "a" adapted it: given back
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    set_active_adapters(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(logits(model, tokens), logits(only_b, tokens), rtol=0, atol=0)


def test_bad_names_are_refused_and_change_nothing() -> None:
    model = two_adapters()
    before, layers = snapshot(model), {p: list(a.adapters) for p, a in adapters(model).items()}
    with pytest.raises(ConfigError, match=r"no adapter named 'c'.*'a', 'b'"):
        set_active_adapters(model, ["a", "c"])
    with pytest.raises(ConfigError, match="no adapter named 'x'"):
        delete_adapter(model, "x")
    with pytest.raises(ConfigError, match="no adapter named 'x'"):
        merge(model, names=["x"])
    with pytest.raises(ConfigError, match="already has 'lora' adapters.*another name"):
        inject(model, A, name="a")
    with pytest.raises(ConfigError, match="without '.'"):
        inject(model, A, name="a.b")
    merge(model)
    with pytest.raises(ConfigError, match="unmerge"):
        inject(model, A, name="c")
    unmerge(model)
    assert active_adapters(model) == ["a"]
    assert {p: list(a.adapters) for p, a in adapters(model).items()} == layers
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_save_writes_peft_layout_and_load_restores_every_adapter(tmp_path, tokens: torch.Tensor) -> None:
    model = make_llama(0)
    inject(model, A, seed=1)  # "default": the top level of the directory
    inject(model, B, seed=2, name="b")
    save_adapter(model, tmp_path / "out")
    top = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "b"} <= set(top)
    assert sorted(p.name for p in (tmp_path / "out" / "b").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config_b = json.loads((tmp_path / "out" / "b" / "adapter_config.json").read_text())
    assert config_b["use_dora"] and config_b["r"] == 4 and sorted(config_b["target_modules"]) == sorted(
        f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("o_proj", "v_proj"))

    loaded = make_llama(0)
    load_adapter(loaded, tmp_path / "out")
    assert adapter_names(loaded) == ["default", "b"] and active_adapters(loaded) == ["default"]
    ours, theirs = snapshot(model), snapshot(loaded)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # PEFT reads the layout: the top level as "default", the sub-folder by its name
    import peft

    peft_model = peft.PeftModel.from_pretrained(make_llama(0), str(tmp_path / "out")).eval()
    peft_model.load_adapter(str(tmp_path / "out" / "b"), adapter_name="b")
    with torch.no_grad():
        for name in ("default", "b"):
            peft_model.set_adapter(name)
            set_active_adapters(loaded, name)
            torch.testing.assert_close(logits(loaded, tokens), logits(peft_model, tokens), rtol=1e-5, atol=1e-5)

    # and a directory PEFT wrote with several adapters loads whole
    peft_model.save_pretrained(str(tmp_path / "peft"))
    from_peft = make_llama(0)
    load_adapter(from_peft, tmp_path / "peft")
    assert adapter_names(from_peft) == ["default", "b"]
    with torch.no_grad():
        set_active_adapters(from_peft, "b")
        torch.testing.assert_close(logits(from_peft, tokens), logits(peft_model, tokens), rtol=1e-5, atol=1e-5)

    one = make_llama(0)
    load_adapter(one, tmp_path / "out" / "b", name="task")  # one adapter under a name of our choosing
    assert adapter_names(one) == ["task"]


def test_load_of_several_adapters_is_all_or_nothing(tmp_path) -> None:
    model = make_llama(0)
    inject(model, A, seed=1)
    inject(model, B, seed=2, name="b")
    save_adapter(model, tmp_path / "out")
    other = make_llama(0, layers=1)  # fits no adapter there: "b" fails after "default" was prepared
    before = snapshot(other)
    with pytest.raises(Exception, match="does not fit|matched no module|another shape|different base"):
        load_adapter(other, tmp_path / "out")
    assert not adapters(other) and all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    target = make_llama(0)
    inject(target, A, seed=3, name="b")
    with pytest.raises(ConfigError, match="already has 'lora' adapters named 'b'"):
        load_adapter(target, tmp_path / "out")
    assert adapter_names(target) == ["b"]


# -- exact switching ---------------------------------------------------------------------------------------------
def mergeable_methods() -> list[str]:
    """Every weight-update method in the registry (those whose layers become ``AdaptedLayer``s)."""
    found = []
    for name, spec in METHODS.items():
        model = tiny(torch.float32)
        try:
            inject(model, method_config(name))
        except ConfigError:  # an inserted method that cannot target plain Linear layers
            continue
        if spec.mergeable and all(isinstance(a, AdaptedLayer) for a in adapters(model).values()):
            found.append(name)
    return found


def method_config(method: str) -> AdapterConfig:
    """A small config of ``method`` on both layers of ``tiny()``; options only where the method has them."""
    options = AdapterConfig.create(method, target_modules=["0", "2"]).option_names()
    extra = {k: v for k, v in dict(r=2, init_weights=False).items() if k in options}
    return AdapterConfig.create(method, target_modules=["0", "2"], **extra)


def tiny(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).to(dtype)


def randomize(model: nn.Module, seed: int) -> None:
    """Every adapter tensor moved off its initial value, so each adapter changes the weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters(model).values():
            for tensor in layer.adapters.parameters():
                tensor.add_(torch.randn(tensor.shape, generator=gen).to(tensor.dtype) * 0.1)


OPS = ["merge", "merge_a", "merge_b", "unmerge", "unmerge_a", "activate_a", "activate_b", "activate_both", "disable"]


@pytest.mark.parametrize("method", mergeable_methods())
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       ops=st.lists(st.sampled_from(OPS), min_size=20, max_size=30))
def test_any_sequence_of_merges_and_switches_restores_the_base_bit_for_bit(method: str, dtype: torch.dtype,
                                                                           ops: list[str]) -> None:
    model = tiny(dtype)
    originals = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    inject(model, method_config(method), seed=1, name="a")
    inject(model, AdapterConfig.create("lora", target_modules=["2"], r=3, init_weights=False), seed=2, name="b")
    randomize(model, 0)
    x = torch.randn(4, 16).to(dtype)
    with torch.no_grad():
        base_out = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).to(dtype)
        base_out.load_state_dict({"0.weight": originals[0], "0.bias": model[0].bias, "2.weight": originals[1],
                                  "2.bias": model[2].bias})
        expected_base = base_out(x)
        for op in ops:
            if op.startswith("merge"):
                merge(model, names=None if op == "merge" else [op[-1]])
            elif op.startswith("unmerge"):
                unmerge(model, names=None if op == "unmerge" else [op[-1]])
            elif op.startswith("activate"):
                set_active_adapters(model, ["a", "b"] if op.endswith("both") else op[-1])
            else:
                weights = [model[0].weight.clone(), model[2].weight.clone()]
                with disable_adapters(model):
                    assert torch.equal(model(x), expected_base)  # the kept base, not an unmerged approximation
                assert torch.equal(model[0].weight, weights[0]) and torch.equal(model[2].weight, weights[1])
            for layer in (model[0], model[2]):
                merged = [n for n, u in layer.adapters.items() if u.merged]
                assert (layer.exact_base is not None) == bool(merged)
                assert torch.equal(layer.unmerged_weight(), originals[0 if layer is model[0] else 1])
        unmerge(model)
    assert torch.equal(model[0].weight, originals[0]) and torch.equal(model[2].weight, originals[1])
    assert model[0].exact_base is None and model[2].exact_base is None  # nothing kept once nothing is merged


def test_merge_result_depends_only_on_the_merged_set() -> None:
    """Merging a then b, or b then a, or both at once, or after switching back and forth: the same weight."""
    model = tiny(torch.bfloat16)
    inject(model, method_config("lora"), seed=1, name="a")
    inject(model, method_config("dora"), seed=2, name="b")
    randomize(model, 1)
    results = []
    for order in (["a", "b"], ["b", "a"], [["a", "b"]]):
        for names in order:
            merge(model, names=names)
        results.append(model[2].weight.detach().clone())
        unmerge(model, names=["a"])
        set_active_adapters(model, "a")
        set_active_adapters(model, ["a", "b"])
        unmerge(model)
    assert all(torch.equal(results[0], r) for r in results[1:])
    bf16 = copy.deepcopy(model)
    merge(bf16, names=["a", "b"])
    assert torch.equal(bf16[2].weight, results[0])
