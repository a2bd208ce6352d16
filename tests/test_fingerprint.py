"""Base fingerprints: the same base in another floating dtype matches, another base or model does not, and the reason
says which; old 16-hex-digit fingerprints are still read."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from peft_oracle import randomize_adapters
from safetensors import safe_open
from torch import nn

from lightning_lora.config import AdapterConfig
from lightning_lora.fingerprint import base_fingerprint, compare_fingerprints
from lightning_lora.io import AdapterFileError, load_adapter, save_adapter
from lightning_lora.surgery import inject, merge


def hard_to_cast_model() -> nn.Module:
    """A bfloat16 Linear whose values a float16 round trip changes: double rounding and float16's subnormal range."""
    layer = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        values = torch.logspace(-9, 2, 64 * 64).reshape(64, 64) * torch.sign(torch.randn(64, 64))
        layer.weight.copy_(values)
    return nn.Sequential(layer).to(torch.bfloat16)


def fingerprint_with_all_samples(model: nn.Module) -> str:
    return base_fingerprint(model, samples=64 * 64)


@pytest.mark.parametrize("cast", [torch.float16, torch.float32, torch.bfloat16])
def test_a_cast_of_the_base_still_matches(cast: torch.dtype) -> None:
    model = hard_to_cast_model()
    round_trip = copy.deepcopy(model).to(cast).to(torch.bfloat16)
    if cast == torch.float16:  # a plain hash of the values could not match: some values really change
        assert not torch.equal(round_trip[0].weight, model[0].weight)
    saved = fingerprint_with_all_samples(model)
    assert compare_fingerprints(saved, fingerprint_with_all_samples(copy.deepcopy(model).to(cast))) is None
    assert compare_fingerprints(fingerprint_with_all_samples(copy.deepcopy(model).to(cast)), saved) is None


def test_llama_cast_to_each_dtype_matches_and_merging_does_not_change_it() -> None:
    saved = base_fingerprint(make_llama())
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert compare_fingerprints(saved, base_fingerprint(make_llama().to(dtype))) is None, dtype
    model = make_llama().to(torch.float16)
    fingerprint = base_fingerprint(model)
    inject(model, AdapterConfig.create("dora", target_modules="all-linear", r=2))
    randomize_adapters(model, seed=1)
    merge(model)
    assert base_fingerprint(model) == fingerprint


def test_the_reason_says_what_differs() -> None:
    saved = base_fingerprint(make_llama())
    assert "another model" in compare_fingerprints(saved, base_fingerprint(make_llama(layers=1)))
    same_dtype = compare_fingerprints(saved, base_fingerprint(make_llama(seed=1)))
    assert "same parameter names, shapes and dtype (float32)" in same_dtype and "another base model" in same_dtype
    cast = compare_fingerprints(saved, base_fingerprint(make_llama(seed=1).to(torch.float16)))
    assert "float32 base and this base is float16" in cast and "check_base=False" in cast
    changed = make_llama()
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # one tensor fine-tuned a little
    assert "1 of" in compare_fingerprints(saved, base_fingerprint(changed))


def test_fingerprints_of_the_old_format_are_compared_as_before() -> None:
    current = base_fingerprint(make_llama())
    old = json.loads(current)["legacy"]
    assert len(old) == 16 and compare_fingerprints(old, current) is None
    assert compare_fingerprints(old, base_fingerprint(make_llama().to(torch.bfloat16))) is None  # it rounded to bf16
    assert old in compare_fingerprints(old, base_fingerprint(make_llama(seed=1)))
    for unreadable in ('{"version": 3}', current[:-5]):
        assert "cannot read" in compare_fingerprints(unreadable, current)


def test_load_adapter_accepts_a_cast_base_and_names_the_dtypes_otherwise(tmp_path: Path) -> None:
    model = make_llama().to(torch.bfloat16)
    inject(model, AdapterConfig.create("lora", target_modules=["q_proj"], r=2))
    save_adapter(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["lightning_lora.base_fingerprint"])["version"] == 2
    assert load_adapter(make_llama().to(torch.float16), tmp_path / "a")
    with pytest.raises(AdapterFileError, match="bfloat16 base and this base is float16.*check_base=False"):
        load_adapter(make_llama(seed=1).to(torch.float16), tmp_path / "a")


def test_load_adapter_does_not_advance_the_global_rng(tmp_path: Path) -> None:
    model = make_llama()
    inject(model, AdapterConfig.create("lora", target_modules=["q_proj", "embed_tokens"], r=2))
    save_adapter(model, tmp_path / "a")
    fresh = make_llama()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before)
    other = make_llama()
    torch.manual_seed(123)
    inject(other, AdapterConfig.create("lora", target_modules=["q_proj"], r=2))  # an unseeded inject does draw
    assert not torch.equal(torch.get_rng_state(), before)
