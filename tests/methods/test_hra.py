"""HRA against PEFT 0.21 as the oracle, its merge algebra, the paper's regularizer in training, files and options."""

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
from lightning_lora.methods.hra import orthogonality_regularizer
from lightning_lora.surgery import adapters, inject

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]
TARGETS = ["q_proj", "down_proj"]


@pytest.mark.parametrize("options", [{"r": 4}, {"r": 3}, {"r": 4, "apply_GS": True}], ids=["r4", "r3", "gram-schmidt"])
def test_same_outputs_and_gradients_as_peft(options: dict[str, Any]) -> None:
    import peft

    assert_same_as_peft(*peft_pair("hra", {"target_modules": TARGETS, "init_weights": False, **options},
                                   peft.HRAConfig(target_modules=TARGETS, init_weights=False, **options)))


def test_files_load_in_peft_and_from_peft(tmp_path: Path) -> None:
    import peft

    _, ours, theirs = peft_pair("hra", {"target_modules": TARGETS, "r": 4},
                                   peft.HRAConfig(target_modules=TARGETS, r=4))
    assert_files_load_both_ways(tmp_path, ours, theirs)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(d_in=st.integers(4, 12), d_out=st.integers(1, 9), r=st.integers(1, 4), seed=st.integers(0, 2**16),
       gram_schmidt=st.booleans(), conv1d=st.booleans())
def test_merge_round_trip(d_in: int, d_out: int, r: int, seed: int, gram_schmidt: bool, conv1d: bool) -> None:
    assert_merge_round_trip("hra", d_in, d_out, seed, conv1d=conv1d, r=r, apply_GS=gram_schmidt)


def test_default_init_starts_at_the_base() -> None:
    assert_starts_at_the_base("hra", r=4)


def test_reflection_chain_equals_the_product_of_reflections() -> None:
    """The compact form ``I - U S^-1 U^T`` is H_1 H_2 ... H_r, each H_i = I - 2 u_i u_i^T / |u_i|^2."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    inject(model, AdapterConfig.create("hra", target_modules=["0"], r=3, init_weights=False))
    layer = model[0]
    u = layer.adapters["default"].hra_u.detach()
    product = torch.eye(6)
    for i in range(3):
        v = u[:, i:i + 1] / u[:, i].norm()
        product = product @ (torch.eye(6) - 2 * v @ v.T)
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_weight() + layer.weight, layer.weight @ product, rtol=1e-5, atol=1e-6)


def test_regularizer_is_the_papers_and_off_by_default() -> None:
    model = make_llama()
    inject(model, AdapterConfig.create("hra", target_modules=TARGETS, r=4, orth_reg_weight=0.5, init_weights=False))
    expected = 0.0
    for layer in adapters(model).values():
        u = layer.adapters["default"].hra_u
        u = u / u.norm(dim=0)
        expected = expected + 0.5 * torch.linalg.matrix_norm(torch.eye(4) - u.T @ u) ** 2
    torch.testing.assert_close(orthogonality_regularizer(adapters(model)), expected)
    plain = make_llama()
    inject(plain, AdapterConfig.create("hra", target_modules=TARGETS, r=4))
    assert orthogonality_regularizer(adapters(plain)) is None


def test_fit_lowers_the_loss_and_resumes(tmp_path: Path) -> None:
    assert_fit_and_resume(tmp_path, method="hra", r=8, orth_reg_weight=1e-3,
                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def test_regularizer_joins_the_gradient_in_training(tmp_path: Path) -> None:
    """With the regularizer on, the trained reflections end up closer to orthogonal than without it."""
    from tiny_modules import TinyLlamaModule, TokensDataModule, trainer

    import lightning_lora as ll

    gaps = []
    for weight in (0.0, 1.0):
        module = TinyLlamaModule(lr=5e-2)
        callback = ll.LoRACallback(method="hra", r=4, orth_reg_weight=weight, init_weights=False,
                                   target_modules=["q_proj"], export_dir=str(tmp_path / f"e{weight}"))
        trainer(tmp_path / str(weight), [callback], max_epochs=1).fit(module, TokensDataModule())
        gaps.append(sum(layer.adapters["default"].orthogonality_gap().item()
                        for layer in adapters(module.model).values()))
    assert gaps[1] < 0.5 * gaps[0], gaps


def test_too_many_reflections_are_refused_before_any_change() -> None:
    assert_refused_before_any_change(make_llama(), r"HRA's r=40 exceeds model\.layers\.0\.self_attn\.q_proj's "
                                                   r"in_features=32", "hra", target_modules=["q_proj"], r=40)


@pytest.mark.parametrize("options,match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"apply_GS": 1}, "apply_GS must be true or false"),
    ({"orth_reg_weight": -1.0}, "orth_reg_weight must be a number >= 0"),
])
def test_invalid_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdapterConfig.create("hra", **options)


def test_cli(tmp_path: Path) -> None:
    config = cli_config(tmp_path, "--lora.method=hra", "--lora.r=2", "--lora.apply_GS=true",
                        "--lora.orth_reg_weight=0.001", "--lora.target_modules=[q_proj]")
    assert config == AdapterConfig.create("hra", r=2, apply_GS=True, orth_reg_weight=0.001, target_modules=["q_proj"])


def test_over_a_quantized_base() -> None:
    assert_over_quantized_base("hra", r=4)
