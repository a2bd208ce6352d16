"""Inject / merge / unmerge / unload / disable: the merge algebra as properties, and all-or-nothing surgery."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import VOCAB, make_llama, make_plain
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_oracle import logits, randomize_adapters
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.methods.base import AdaptedLayer, MergeError
from lightning_lora.surgery import (
    adapter_parameters,
    adapter_state_dict,
    adapters,
    disable_adapters,
    inject,
    merge,
    parameter_counts,
    unload,
    unmerge,
)

KINDS = ("linear", "conv1d_hf", "conv1d", "conv2d", "embedding")


class Holder(nn.Module):
    """One layer under the name ``layer`` (targets need a non-empty path)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


@dataclass
class Case:
    """A random layer with a random adapter, and an input for it."""

    model: Holder
    original: nn.Module
    original_weight: Tensor
    x: Tensor
    method: str


def build_case(kind: str, method: str, d_in: int, d_out: int, r: int, alpha: float, rslora: bool, bias: bool,
               seed: int) -> Case:
    torch.manual_seed(seed)
    if kind == "linear":
        layer, x = nn.Linear(d_in, d_out, bias=bias), torch.randn(3, d_in)
    elif kind == "conv1d_hf":
        layer, x = Conv1D(d_out, d_in), torch.randn(2, 3, d_in)
    elif kind == "conv1d":
        layer, x = nn.Conv1d(d_in, d_out, 3, padding=1, bias=bias), torch.randn(2, d_in, 7)
    elif kind == "conv2d":
        layer, x = nn.Conv2d(d_in, d_out, (3, 2), stride=(1, 2), bias=bias), torch.randn(2, d_in, 5, 6)
    else:
        layer, x = nn.Embedding(d_in + 4, d_out), torch.randint(0, d_in + 4, (2, 5))
    with torch.no_grad():
        if kind == "conv1d_hf" and bias:
            layer.bias.normal_()
    model = Holder(layer)
    original_weight = layer.weight.detach().clone()
    inject(model, AdapterConfig.create(method, target_modules=["layer"], r=r, alpha=alpha, use_rslora=rslora,
                                       init_weights=False))
    randomize_adapters(model, seed=seed + 1, scale=0.5)
    return Case(model, layer, original_weight, x, method)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    method = draw(st.sampled_from(["lora", "dora"]))
    kind = draw(st.sampled_from(("linear", "conv1d_hf") if method == "dora" else KINDS))
    d_in, d_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    fan_in = {"embedding": d_in + 4, "conv1d": d_in * 3, "conv2d": d_in * 6}.get(kind, d_in)  # A's inputs
    limit = min(fan_in, d_out)
    r = draw(st.integers(1, limit))
    alpha = draw(st.sampled_from([0.5, 1.0, 3.0, 16.0]))
    return build_case(kind, method, d_in, d_out, r, alpha, draw(st.booleans()), draw(st.booleans()),
                      draw(st.integers(0, 10_000)))


def tol(*tensors: Tensor) -> float:
    """float32 tolerance scaled to the magnitudes involved."""
    return 1e-5 * max(1.0, *(t.abs().max().item() for t in tensors))


def close(a: Tensor, b: Tensor, atol: float) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None)


@PROPERTY
@given(cases())
def test_merged_forward_equals_unmerged_forward(case: Case) -> None:
    layer = case.model.layer
    with torch.no_grad():
        unmerged = case.model(case.x)
        merge(case.model)
        assert layer.merged
        merged = case.model(case.x)
    close(merged, unmerged, tol(unmerged, layer.weight))


@PROPERTY
@given(cases())
def test_unmerge_restores_the_weight(case: Case) -> None:
    layer = case.model.layer
    delta = layer.delta_weight().detach()
    merge(case.model)
    assert not torch.allclose(layer.weight, case.original_weight, atol=1e-7) or delta.abs().max() < 1e-6
    unmerge(case.model)
    assert not layer.merged
    close(layer.weight, case.original_weight, tol(case.original_weight, delta))


@PROPERTY
@given(cases())
def test_merge_twice_is_idempotent(case: Case) -> None:
    layer = case.model.layer
    merge(case.model)
    once = layer.weight.detach().clone()
    merge(case.model)
    assert torch.equal(layer.weight, once)
    unmerge(case.model)
    after_unmerge = layer.weight.detach().clone()
    unmerge(case.model)
    assert torch.equal(layer.weight, after_unmerge)


@PROPERTY
@given(cases(), st.booleans())
def test_unload_with_merge_gives_back_the_original_module_merged(case: Case, merge_first: bool) -> None:
    layer = case.model.layer
    expected_weight = layer.merged_weight().detach().clone()
    with torch.no_grad():
        expected_out = case.model(case.x)
    if merge_first:
        merge(case.model)
    assert unload(case.model, merge=True) is case.model
    assert case.model.layer is case.original and not isinstance(case.model.layer, AdaptedLayer)
    assert case.original.weight is layer.weight  # the same Parameter object, not a copy
    close(case.original.weight, expected_weight, tol(expected_weight))
    with torch.no_grad():
        close(case.model(case.x), expected_out, tol(expected_out, expected_weight))
    assert not adapters(case.model)


@PROPERTY
@given(cases(), st.booleans())
def test_unload_gives_back_the_original_module_unchanged(case: Case, merge_first: bool) -> None:
    if merge_first:
        merge(case.model)
    unload(case.model)
    assert case.model.layer is case.original
    if merge_first:
        close(case.original.weight, case.original_weight, tol(case.original_weight) * 10)
    else:
        assert torch.equal(case.original.weight, case.original_weight)
    assert set(case.model.state_dict()) == {"layer.weight"} | ({"layer.bias"} if case.original.bias is not None
                                                                else set())


@PROPERTY
@given(cases(), st.booleans())
def test_disable_adapters_runs_the_base_then_restores(case: Case, merge_first: bool) -> None:
    layer = case.model.layer
    with torch.no_grad():
        adapted = case.model(case.x)
        base_out = layer.base_forward(case.x)  # the weight is still the original one here
        if merge_first:
            merge(case.model)
        scale = tol(adapted, base_out, layer.weight)
        weight = layer.weight.detach().clone()
        with disable_adapters(case.model):  # a merged weight stays merged: the layer runs its kept exact base
            assert layer.merged == merge_first and not layer.enabled
            close(case.model(case.x), base_out, scale * 10)
        assert torch.equal(layer.weight, weight)
        assert layer.merged == merge_first and layer.enabled
        close(case.model(case.x), adapted, scale * 10)
    if not merge_first:
        assert torch.equal(layer.weight, case.original_weight)


# -- safe merge ------------------------------------------------------------------------------------------------------
def lora_llama(**options: Any) -> nn.Module:
    model = make_llama()
    inject(model, AdapterConfig.create(options.pop("method", "lora"), **{"target_modules": ["q_proj", "v_proj"],
                                                                        "r": 4, **options}))
    randomize_adapters(model, seed=5)
    return model


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, changed


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_safe_merge_refuses_non_finite_and_changes_nothing(method: str) -> None:
    model = lora_llama(method=method)
    last = list(adapters(model).values())[-1]  # the other layers would merge first if merging were not checked
    with torch.no_grad():
        last.adapters["default"].lora_B.weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(MergeError, match="inf/NaN"):
        merge(model)
    assert_same_state(model, before)
    assert not any(a.merged for a in adapters(model).values())
    with pytest.raises(MergeError):
        unload(model, merge=True)
    assert_same_state(model, before)
    assert len(adapters(model)) == 4


def test_unsafe_merge_merges_anyway() -> None:
    model = lora_llama()
    with torch.no_grad():
        list(adapters(model).values())[-1].adapters["default"].lora_B.weight[0, 0] = float("nan")
    merge(model, safe=False)
    assert all(a.merged for a in adapters(model).values())


def test_merged_model_matches_unmerged_model() -> None:
    for method in ("lora", "dora"):
        model = lora_llama(method=method, target_modules=["k_proj", "o_proj", "up_proj"])
        x = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = logits(model, x)
            merge(model)
            torch.testing.assert_close(logits(model, x), before, rtol=1e-5, atol=1e-5)
            unmerge(model)
            torch.testing.assert_close(logits(model, x), before, rtol=1e-5, atol=1e-5)


# -- all-or-nothing injection ----------------------------------------------------------------------------------------
def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(path, type(m)) for path, m in model.named_modules()]


def test_failed_injection_leaves_the_model_unchanged() -> None:
    """k_proj (32 -> 16) cannot take r=20; q_proj, which comes first, must not have been swapped either."""
    model = make_llama()
    model.model.layers[0].mlp.requires_grad_(False)  # a mix of flags, to see they are left alone
    before, types = snapshot(model), module_types(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=r"r=20 is larger than model\.layers\.0\.self_attn\.k_proj allows.*r <= 16"):
        inject(model, AdapterConfig.create("lora", target_modules=["q_proj", "k_proj"], r=20))
    assert_same_state(model, before)
    assert module_types(model) == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert inject(model, AdapterConfig.create("lora", target_modules=["q_proj", "k_proj"], r=20,
                                              rank_pattern={"k_proj": 16}))


@pytest.mark.parametrize("conv,kernel,limit", [(nn.Conv1d, 3, 6), (nn.Conv2d, (3, 2), 8), (nn.Conv2d, 1, 2)])
def test_conv_rank_limit_counts_the_receptive_field(conv: type, kernel: Any, limit: int) -> None:
    """A conv update's rank is bounded by min(out, in * kernel size), not by min(out, in) (PEFT allows it too)."""
    assert inject(Holder(conv(2, 8, kernel)), AdapterConfig.create("lora", target_modules=["layer"], r=limit))
    model = Holder(conv(2, 8, kernel))
    with pytest.raises(ConfigError, match=rf"r={limit + 1} is larger than layer allows.*r <= {limit}\)"):
        inject(model, AdapterConfig.create("lora", target_modules=["layer"], r=limit + 1))
    assert type(model.layer) is conv


@pytest.mark.parametrize("training", [False, True])
def test_adapters_take_the_mode_of_the_model(training: bool) -> None:
    """Injecting into a model in eval mode must not switch dropout on (new modules start in train mode)."""
    model = make_llama().train(training)
    inject(model, AdapterConfig.create("lora", target_modules=["q_proj"], r=2, dropout=0.5, init_weights=False))
    assert all(m.training == training for m in model.modules())
    x = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = logits(model, x), logits(model, x)
    assert torch.equal(first, second) != training


def test_injecting_twice_is_refused() -> None:
    model = lora_llama()
    before, types = snapshot(model), module_types(model)
    with pytest.raises(ConfigError, match="already has 'lora' adapters; call unload"):
        inject(model, AdapterConfig.create("lora", target_modules=["k_proj"]))
    assert_same_state(model, before)
    assert module_types(model) == types


@pytest.mark.parametrize("target,other", [("embed_tokens", "lm_head.weight"), ("lm_head", "model.embed_tokens.weight")])
def test_tied_weights_train_but_do_not_merge(target: str, other: str) -> None:
    """As in PEFT: an adapter on one of two tied modules trains (the weight stays shared and frozen); merging it
    would change the other module too, so merge, merging unload and the merged state dict refuse, changing nothing."""
    from lightning_lora.export import merged_state_dict

    model = make_llama(tie=True)
    inject(model, AdapterConfig.create("lora", target_modules=[target, "q_proj"], r=2, init_weights=False))
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight.requires_grad
    logits(model, torch.tensor([[3, 4, 5]])).square().mean().backward()
    assert all(p.grad is not None for p in adapter_parameters(model))
    before, types = snapshot(model), module_types(model)
    for action in (lambda: merge(model), lambda: unload(model, merge=True), lambda: merged_state_dict(model)):
        with pytest.raises(MergeError, match=rf"weight is tied to {other}.*save_adapter.*exclude_modules"):
            action()
        assert_same_state(model, before)
        assert module_types(model) == types and not any(a.merged for a in adapters(model).values())
    unload(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_only_adapter_parameters_require_grad_and_counts() -> None:
    model = make_llama()
    total_before = sum(p.numel() for p in model.parameters())
    inject(model, AdapterConfig.create("lora", target_modules=["q_proj", "k_proj", "embed_tokens"], r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    # per layer: q_proj 4 * (32 + 32), k_proj 4 * (32 + 16); embedding 4 * (64 + 32)
    expected = 2 * (4 * 64 + 4 * 48) + 4 * (VOCAB + 32)
    assert parameter_counts(model) == (expected, total_before + expected)


def test_parameter_counts_count_tied_weights_once() -> None:
    model = make_llama(tie=True)
    untied = make_llama(tie=False)
    trainable, total = parameter_counts(model)
    assert trainable == total
    assert total == parameter_counts(untied)[1] - model.lm_head.weight.numel()


def test_adapters_report_the_adapted_paths() -> None:
    model = make_plain()
    paths = inject(model, AdapterConfig.create("lora", target_modules=["embed", "conv", "head"], r=2))
    assert paths == ["embed", "conv", "head"] and list(adapters(model)) == paths
    keys = set(adapter_state_dict(model))
    assert keys == {f"{path}.adapters.default.{name}" for path, name in [
        ("embed", "lora_embedding_A"), ("embed", "lora_embedding_B"), ("conv", "lora_A.weight"), ("conv", "lora_B.weight"),
        ("head", "lora_A.weight"), ("head", "lora_B.weight")]}


def test_disable_adapters_restores_flags_after_an_error() -> None:
    model = lora_llama()
    merge(model)
    weights = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with disable_adapters(model):
            raise RuntimeError("boom")
    assert all(a.enabled and a.merged for a in adapters(model).values())
    after = model.state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6)


def test_unload_on_a_copy_keeps_the_copy_independent() -> None:
    model = lora_llama()
    clone = copy.deepcopy(model)
    unload(clone, merge=True)
    assert len(adapters(model)) == 4 and not adapters(clone)
