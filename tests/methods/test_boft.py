"""BOFT against PEFT 0.21 as the oracle (its butterfly factors through a stand-in for its CUDA kernel), its merge
algebra, training, files and option checks."""

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
    peft_boft_butterflies,
    peft_pair,
)
from peft_oracle import PEFT_WARNINGS

from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.methods.boft import butterfly_permutation
from lightning_lora.surgery import inject

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]
TARGETS = ["q_proj", "down_proj"]

CASES: list[dict[str, Any]] = [
    {"boft_block_size": 4},
    {"boft_block_size": 4, "boft_n_butterfly_factor": 2},
    {"boft_block_num": 4, "boft_n_butterfly_factor": 3},
    {"boft_block_size": 2, "boft_n_butterfly_factor": 4},
]


@pytest.mark.parametrize("options", CASES, ids=["oft-like", "size4-2-factors", "num4-3-factors", "size2-4-factors"])
def test_same_outputs_and_gradients_as_peft(options: dict[str, Any]) -> None:
    import peft

    theirs = {"boft_block_size": 0, **options} if "boft_block_num" in options else options
    with peft_boft_butterflies():
        assert_same_as_peft(*peft_pair("boft", {"target_modules": TARGETS, **options},
                                       peft.BOFTConfig(target_modules=TARGETS, **theirs)))


def test_files_load_in_peft_and_from_peft(tmp_path: Path) -> None:
    import peft

    with peft_boft_butterflies():
        _, ours, theirs = peft_pair("boft", {"target_modules": TARGETS, "boft_block_size": 4,
                                                "boft_n_butterfly_factor": 2},
                                       peft.BOFTConfig(target_modules=TARGETS, boft_block_size=4,
                                                       boft_n_butterfly_factor=2))
        assert_files_load_both_ways(tmp_path, ours, theirs)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(size=st.sampled_from([2, 4]), factors=st.integers(1, 3), d_out=st.integers(1, 9), seed=st.integers(0, 2**16),
       conv1d=st.booleans())
def test_merge_round_trip(size: int, factors: int, d_out: int, seed: int, conv1d: bool) -> None:
    assert_merge_round_trip("boft", size * 2 ** factors, d_out, seed, conv1d=conv1d, boft_block_size=size,
                            boft_n_butterfly_factor=factors)


def test_default_init_starts_at_the_base() -> None:
    assert_starts_at_the_base("boft", boft_block_size=4, boft_n_butterfly_factor=2)


def test_butterfly_permutation_is_peft_s() -> None:
    from peft.tuners.boft.layer import BOFTLayer

    for n, blocks, half, factors in [(16, 4, 2, 1), (16, 2, 2, 2), (32, 4, 1, 3), (24, 3, 2, 1)]:
        expected = BOFTLayer.block_butterfly_perm(None, n, blocks, half, factors)
        assert torch.equal(butterfly_permutation(n, blocks, half, factors), expected)
    assert torch.equal(butterfly_permutation(16, 4, 2, 2), torch.arange(16))  # the first factor's P_0 is I


def test_dropout_sets_some_blocks_of_one_factor_to_the_identity() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    inject(model, AdapterConfig.create("boft", target_modules=["0"], boft_block_size=2, boft_dropout=0.5,
                                       boft_n_butterfly_factor=2, init_weights=False))
    update = model[0].adapters["default"]
    blocks = update.rotations(dropout=True)
    identity = (blocks == torch.eye(2)).flatten(2).all(-1)  # (factors, blocks)
    assert identity.sum() == 2 and identity.any(-1).sum() == 1
    assert not (update.rotations() == torch.eye(2)).flatten(2).all(-1).any()
    model.train()  # in training the forward drops blocks; the merged weight never does (nor draws random numbers)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        delta = model[0].delta_weight()
    assert torch.equal(torch.random.get_rng_state(), state)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model[0].delta_weight(), delta, rtol=0, atol=0)


def test_fit_lowers_the_loss_and_resumes(tmp_path: Path) -> None:
    assert_fit_and_resume(tmp_path, method="boft", boft_block_size=4, boft_n_butterfly_factor=2,
                          target_modules=["q_proj", "v_proj", "up_proj"])


@pytest.mark.parametrize("options,match", [
    ({"boft_block_size": 5}, (r"BOFT cannot split model\.layers\.0\.self_attn\.q_proj \(in_features=32\) with "
                              r"boft_block_size=5: 32 is not divisible by 5")),
    ({"boft_block_size": 8, "boft_n_butterfly_factor": 4}, r"4 butterfly factors need in_features divisible by 8"),
    ({"boft_block_num": 3}, r"32 is not divisible by 3"),
])
def test_indivisible_layers_are_refused_before_any_change(options: dict[str, Any], match: str) -> None:
    assert_refused_before_any_change(make_llama(), match, "boft", target_modules=["q_proj"], **options)


@pytest.mark.parametrize("options,match", [
    ({"boft_block_size": 4, "boft_block_num": 8}, "Give either boft_block_size=4 or boft_block_num=8, not both"),
    ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor must be an integer >= 1"),
    ({"boft_dropout": -0.1}, "boft_dropout must be a probability"),
])
def test_invalid_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdapterConfig.create("boft", **options)


def test_cli(tmp_path: Path) -> None:
    config = cli_config(tmp_path, "--lora.method=boft", "--lora.boft_block_size=4",
                        "--lora.boft_n_butterfly_factor=2", "--lora.target_modules=[q_proj]")
    assert config == AdapterConfig.create("boft", boft_block_size=4, boft_n_butterfly_factor=2,
                                          target_modules=["q_proj"])


def test_over_a_quantized_base() -> None:
    assert_over_quantized_base("boft", boft_block_size=4, boft_n_butterfly_factor=2)
