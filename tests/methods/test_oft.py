"""OFT against PEFT 0.21 as the oracle, its merge algebra, training, files and option checks."""

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
from lightning_lora.methods._orthogonal import cayley, cayley_neumann, skew
from lightning_lora.surgery import inject

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]
TARGETS = ["q_proj", "down_proj"]

# our options -> PEFT's (PEFT wants the unused one of r / oft_block_size as 0)
CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"oft_block_size": 8}, {"oft_block_size": 8}),
    ({"r": 2, "use_cayley_neumann": False}, {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False}),
    ({"oft_block_size": 4, "block_share": True}, {"oft_block_size": 4, "block_share": True}),
    ({"oft_block_size": 8, "coft": True, "eps": 1.0}, {"oft_block_size": 8, "coft": True, "eps": 1.0}),
    ({"oft_block_size": 8, "num_cayley_neumann_terms": 3}, {"oft_block_size": 8, "num_cayley_neumann_terms": 3}),
]


@pytest.mark.parametrize("ours,theirs", CASES, ids=["block8", "r2-exact-cayley", "block-share", "coft", "neumann3"])
def test_same_outputs_and_gradients_as_peft(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    import peft

    assert_same_as_peft(*peft_pair("oft", {"target_modules": TARGETS, **ours},
                                   peft.OFTConfig(target_modules=TARGETS, **theirs)))


def test_embedding_rotates_the_vectors_as_peft(tmp_path: Path) -> None:
    """On nn.Embedding (PEFT's oft_embedding_R): same outputs, gradients and files; E' = E R merges exactly."""
    import peft

    targets = ["embed_tokens", "q_proj"]
    pair = peft_pair("oft", {"target_modules": targets, "oft_block_size": 8},
                     peft.OFTConfig(target_modules=targets, oft_block_size=8))
    assert_same_as_peft(*pair)
    _, ours, theirs = pair
    assert_files_load_both_ways(tmp_path, ours, theirs)
    embed = ours.model.embed_tokens
    ids = torch.arange(64)
    with torch.no_grad():
        unmerged = embed(ids)
        rotated = embed.weight @ torch.block_diag(*embed.adapters["default"].blocks())
        torch.testing.assert_close(unmerged, rotated, rtol=1e-5, atol=1e-6)
        original = embed.weight.clone()
        embed.merge()
        torch.testing.assert_close(embed(ids), unmerged, rtol=0, atol=1e-6)
        embed.unmerge()
        assert torch.equal(embed.weight, original)


def test_files_load_in_peft_and_from_peft(tmp_path: Path) -> None:
    import peft

    _, ours, theirs = peft_pair("oft", {"target_modules": TARGETS, "r": 4, "use_cayley_neumann": False},
                                   peft.OFTConfig(target_modules=TARGETS, r=4, oft_block_size=0,
                                                  use_cayley_neumann=False))
    assert_files_load_both_ways(tmp_path, ours, theirs)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(blocks=st.sampled_from([1, 2, 4]), size=st.sampled_from([2, 3, 4]), d_out=st.integers(1, 9),
       seed=st.integers(0, 2**16), exact=st.booleans(), conv1d=st.booleans())
def test_merge_round_trip(blocks: int, size: int, d_out: int, seed: int, exact: bool, conv1d: bool) -> None:
    assert_merge_round_trip("oft", blocks * size, d_out, seed, conv1d=conv1d, oft_block_size=size,
                            use_cayley_neumann=not exact)


def test_default_init_starts_at_the_base() -> None:
    assert_starts_at_the_base("oft", oft_block_size=8)


def test_rotation_is_orthogonal_and_rotates_the_input() -> None:
    q = skew(torch.randn(3, 6) * 0.05, 4)
    r = cayley(q)
    torch.testing.assert_close(r @ r.transpose(-2, -1), torch.eye(4).expand(3, 4, 4), rtol=0, atol=1e-5)
    series = cayley_neumann(q, 5)  # PEFT's truncation of (I + Q)(I - Q)^-1
    assert (series - torch.linalg.solve(torch.eye(4) - q, torch.eye(4) + q, left=False)).abs().max() < 1e-2
    model = torch.nn.Sequential(torch.nn.Linear(8, 3))
    inject(model, AdapterConfig.create("oft", target_modules=["0"], oft_block_size=4, init_weights=False))
    layer, x = model[0], torch.randn(5, 8)
    update = layer.adapters["default"]
    with torch.no_grad():
        expected = (x @ torch.block_diag(*update.blocks())) @ layer.weight.T + layer.bias
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_module_dropout_sets_blocks_to_the_identity_in_training() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    inject(model, AdapterConfig.create("oft", target_modules=["0"], oft_block_size=2, module_dropout=0.5,
                                       init_weights=False))
    update = model[0].adapters["default"]
    x = torch.eye(8)
    model.train()
    torch.manual_seed(0)
    rotated = update.transform_input(model[0], x)  # rows: the rotation itself
    kept = [torch.equal(rotated[2 * i:2 * i + 2, 2 * i:2 * i + 2], torch.eye(2)) for i in range(4)]
    assert sum(kept) == 2
    model.eval()
    assert not torch.equal(update.transform_input(model[0], x), rotated)


def test_fit_lowers_the_loss_and_resumes(tmp_path: Path) -> None:
    assert_fit_and_resume(tmp_path, method="oft", oft_block_size=4, target_modules=["q_proj", "v_proj", "up_proj"])


@pytest.mark.parametrize("options,match", [
    ({"oft_block_size": 5}, (r"OFT cannot split model\.layers\.0\.self_attn\.q_proj \(in_features=32\) into "
                             r"oft_block_size=5: 32 is not divisible by 5\. Use oft_block_size in \[2, 4, 8\]")),
    ({"r": 3}, r"into r=3: 32 is not divisible by 3"),
    ({"r": 32}, r"OFT with r=32 gives model\.layers\.0\.self_attn\.q_proj 1 x 1 blocks"),
])
def test_indivisible_layers_are_refused_before_any_change(options: dict[str, Any], match: str) -> None:
    assert_refused_before_any_change(make_llama(), match, "oft", target_modules=["q_proj"], **options)


@pytest.mark.parametrize("options,match", [
    ({"r": 2, "oft_block_size": 16}, "Give either r=2 .* or oft_block_size=16, not both"),
    ({"module_dropout": 1.0}, "module_dropout must be a probability"),
    ({"coft": "yes"}, "coft must be true or false"),
    ({"eps": 0}, "eps must be a positive number"),
    ({"num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms must be an integer >= 1"),
    ({"oft_block_size": -4}, "oft_block_size must be a non-negative integer"),
])
def test_invalid_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdapterConfig.create("oft", **options)


def test_cli(tmp_path: Path) -> None:
    config = cli_config(tmp_path, "--lora.method=oft", "--lora.oft_block_size=4", "--lora.coft=true",
                        "--lora.target_modules=[q_proj]")
    assert config == AdapterConfig.create("oft", oft_block_size=4, coft=True, target_modules=["q_proj"])


def test_over_a_quantized_base() -> None:
    assert_over_quantized_base("oft", oft_block_size=8)


def test_several_active_adapters_on_one_layer_merge_to_the_same_outputs() -> None:
    """OFT, HRA and LoRA active together: input transforms combine as x + sum(T_i(x) - x), the input side of the
    merged weight W + sum dW_i, so merging leaves the outputs as they were."""
    from lightning_lora.surgery import merge, set_active_adapters, unmerge

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5))
    inject(model, AdapterConfig.create("oft", target_modules=["0"], oft_block_size=4, init_weights=False), seed=1)
    inject(model, AdapterConfig.create("hra", target_modules=["0"], r=2, init_weights=False), seed=2, name="b")
    inject(model, AdapterConfig.create("lora", target_modules=["0"], r=2, init_weights=False), seed=3, name="c")
    set_active_adapters(model, ["default", "b", "c"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        unmerged = model(x)
        merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
        unmerge(model)
        set_active_adapters(model, ["default"])
        assert (model(x) - unmerged).abs().max() > 1e-3  # each adapter mattered


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cayley_of_half_precision_blocks_is_solved_in_float32(dtype: torch.dtype) -> None:
    """DeepSpeed's bf16 mode casts the adapter itself to bf16, and CUDA's LU has no half-precision kernel (seen on an
    H200 under ZeRO-3 bf16-mixed: "lu_factor_cublas" not implemented for 'BFloat16'): the map is solved in float32."""
    a = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    q = 0.5 * (a - a.transpose(-2, -1))
    got = cayley(q.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got, cayley(q.to(dtype).float()).to(dtype), rtol=0, atol=0)
