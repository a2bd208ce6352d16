"""Bone (PEFT's MiSS "bat") and MiSS against PEFT 0.21 as the oracle, the merge algebra, training, files, and the
block-size errors that come before any module changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from orthogonal_checks import (
    assert_files_load_both_ways,
    assert_fit_and_resume,
    assert_merge_round_trip,
    assert_over_quantized_base,
    assert_refused_before_any_change,
    assert_same_as_peft,
    assert_starts_at_the_base,
    cli_config,
    peft_pair,
)
from peft_oracle import PEFT_WARNINGS

from lightning_lora.config import AdapterConfig, ConfigError

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]
TARGETS = ["q_proj", "down_proj"]

# (method, our options, PEFT's MissConfig options)
CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("bone", {"r": 4}, {"r": 4, "init_weights": "bat"}),
    ("miss", {"r": 4}, {"r": 4}),
    ("miss", {"r": 5}, {"r": 5}),  # in_features 32 and 64 are not multiples of 5: the input is padded
    ("miss", {"r": 4, "init_weights": "mini", "mini_r": 8}, {"r": 4, "init_weights": "mini", "mini_r": 8}),
]


@pytest.mark.parametrize("method,ours,theirs", CASES, ids=["bone", "miss", "miss-padded", "miss-mini"])
def test_same_outputs_and_gradients_as_peft(method: str, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    import peft

    assert_same_as_peft(*peft_pair(method, {"target_modules": TARGETS, **ours},
                                   peft.MissConfig(target_modules=TARGETS, **theirs)))


@pytest.mark.parametrize("method,ours,theirs", CASES[:2], ids=["bone", "miss"])
def test_files_load_in_peft_and_from_peft(tmp_path: Path, method: str, ours: dict[str, Any],
                                          theirs: dict[str, Any]) -> None:
    import peft

    _, mine, peft_model = peft_pair(method, {"target_modules": TARGETS, **ours},
                                       peft.MissConfig(target_modules=TARGETS, **theirs))
    assert_files_load_both_ways(tmp_path, mine, peft_model)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(r=st.integers(1, 4), blocks_in=st.integers(1, 3), blocks_out=st.integers(1, 3), seed=st.integers(0, 2**16),
       conv1d=st.booleans())
def test_bone_merge_round_trip(r: int, blocks_in: int, blocks_out: int, seed: int, conv1d: bool) -> None:
    assert_merge_round_trip("bone", r * blocks_in, r * blocks_out, seed, conv1d=conv1d, r=r)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(d_in=st.integers(4, 11), d_out=st.integers(1, 9), r=st.integers(1, 4), seed=st.integers(0, 2**16),
       conv1d=st.booleans())
def test_miss_merge_round_trip(d_in: int, d_out: int, r: int, seed: int, conv1d: bool) -> None:
    assert_merge_round_trip("miss", d_in, d_out, seed, conv1d=conv1d, r=r)


@pytest.mark.parametrize("method", ["bone", "miss"])
def test_default_init_starts_at_the_base(method: str) -> None:
    assert_starts_at_the_base(method, r=8)


def test_bone_is_the_block_affine_update() -> None:
    """W'_ij = W_ij + W_ij B_i + B_i on every r x r block."""
    from lightning_lora.surgery import inject

    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    inject(model, AdapterConfig.create("bone", target_modules=["0"], r=2, init_weights=False))
    layer = model[0]
    b = layer.adapters["default"].miss_block.detach()
    w = layer.weight.detach()
    with torch.no_grad():
        merged = layer.weight + layer.delta_weight()
    for i in range(2):
        for j in range(3):
            block = w[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            torch.testing.assert_close(merged[2 * i:2 * i + 2, 2 * j:2 * j + 2], block + block @ b[i] + b[i])


@pytest.mark.parametrize("method,options", [("bone", {"r": 8}), ("miss", {"r": 8, "miss_dropout": 0.1})])
def test_fit_lowers_the_loss_and_resumes(tmp_path: Path, method: str, options: dict[str, Any]) -> None:
    assert_fit_and_resume(tmp_path, method=method, target_modules=["q_proj", "v_proj", "up_proj"], **options)


def test_indivisible_weight_is_refused_before_any_change() -> None:
    """v_proj is 16 x 32 (out x in): r=6 divides neither; the error names the layer, its shape and the fix."""
    assert_refused_before_any_change(
        make_llama(), r"Bone cannot cut model\.layers\.0\.self_attn\.v_proj's weight \(16 x 32, out x in\) into 6 x 6 "
                      r"blocks: both dimensions must be divisible by r\. Use r in \[2, 4, 8\] .*method='miss'",
        "bone", target_modules=["v_proj"], r=6)


@pytest.mark.parametrize("method,options,match", [
    ("bone", {"r": 0}, "r must be a positive integer"),
    ("bone", {"init_weights": "mini"}, r"bone's init_weights must be one of \[True, False\]"),
    ("miss", {"init_weights": "bat"}, "Bone is PEFT's MiSS init_weights='bat': use method='bone'"),
    ("miss", {"init_weights": 1}, "init_weights must be one of"),
    ("bone", {"miss_dropout": 0.1}, "miss_dropout=0.1 does nothing in Bone's block-affine update"),
    ("miss", {"mini_r": 4}, "mini_r=4 only applies with method='miss', init_weights='mini'"),
])
def test_invalid_options(method: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdapterConfig.create(method, **options)


def test_cli(tmp_path: Path) -> None:
    config = cli_config(tmp_path, "--lora.method=bone", "--lora.r=4", "--lora.target_modules=[q_proj]")
    assert config == AdapterConfig.create("bone", r=4, target_modules=["q_proj"])


@pytest.mark.parametrize("method", ["bone", "miss"])
def test_over_a_quantized_base(method: str) -> None:
    assert_over_quantized_base(method, r=8)
