"""LoHa against PEFT as the oracle (outputs, gradients, files both ways), its merge algebra, and a real Trainer."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import peft
import pytest
import torch
from conftest import make_gpt2, make_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_oracle import PEFT_WARNINGS, logits
from torch import Tensor, nn
from update_checks import (LLAMA_LINEAR, assert_same_as_peft, check_dropout_draws_peft_masks,
                           check_fit_lowers_loss_and_exports_for_peft, check_merge_round_trip,
                           check_our_file_loads_in_peft, check_peft_file_loads_in_ours,
                           check_refused_leaves_model_unchanged, check_resume_matches_uninterrupted_run, cli_config,
                           image_batch, make_convnet, peft_pair, token_batch)

import lightning_lora as ll
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.methods.loha import LoHaUpdate
from lightning_lora.surgery import inject

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]

CONV_TARGETS = ["stem", "mix", "seq", "head"]
# (id, model, input, our options = PEFT's LoHaConfig options)
CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], Tensor], dict[str, Any]]] = [
    ("llama-all-linear", make_llama, token_batch, {"target_modules": LLAMA_LINEAR, "r": 4, "alpha": 8.0}),
    ("rank-alpha-patterns", make_llama, token_batch,
     {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "alpha": 6.0,
      "rank_pattern": {"v_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 7}, "alpha_pattern": {"q_proj": 1.5}}),
    ("conv-flattened", make_convnet, image_batch, {"target_modules": CONV_TARGETS, "r": 3, "alpha": 5.0}),
    ("conv-effective", make_convnet, image_batch,
     {"target_modules": CONV_TARGETS, "r": 3, "alpha": 5.0, "use_effective_conv2d": True}),
]
IDS = [c[0] for c in CASES]
PARAMS = [c[1:] for c in CASES]


def peft_config(options: dict[str, Any], **extra: Any) -> peft.LoHaConfig:
    return peft.LoHaConfig(**{**options, "init_weights": False, **extra})


@pytest.mark.parametrize("make,inputs,options", PARAMS, ids=IDS)
def test_same_outputs_and_gradients_as_peft(make: Callable[[], nn.Module], inputs: Callable[[], Tensor],
                                            options: dict[str, Any]) -> None:
    base, ours, theirs = peft_pair(make, "loha", options, peft_config(options))
    # PEFT 0.21's hand-written backward of the core form (HadaWeightCP) gets w1_a's and w2_a's gradients wrong (the
    # autograd gradient of its own forward differs by ~1e2); ours is autograd's, so those two are not compared.
    wrong = ("hada_w1_a", "hada_w2_a") if options.get("use_effective_conv2d") else ()
    assert_same_as_peft(ours, theirs, base, inputs(), peft_grad_wrong=wrong)


def test_effective_conv_has_peft_core_tensors() -> None:
    model = make_convnet()
    inject(model, AdapterConfig.create("loha", target_modules=CONV_TARGETS, r=3, use_effective_conv2d=True))
    stem, mix = model.stem.adapters["default"], model.mix.adapters["default"]
    assert stem.hada_t1.shape == (3, 3, 3, 3) and stem.hada_w1_a.shape == (3, 8) and stem.hada_w1_b.shape == (3, 3)
    assert model.seq.adapters["default"].hada_t2.shape == (3, 3, 3, 1)
    assert not hasattr(mix, "hada_t1") and mix.hada_w1_b.shape == (3, 8)  # 1x1 kernels stay flattened, as in PEFT


@pytest.mark.parametrize("make,inputs,options", [PARAMS[0], PARAMS[3]], ids=[IDS[0], IDS[3]])
def test_files_load_both_ways_with_peft(tmp_path: Path, make: Callable[[], nn.Module], inputs: Callable[[], Tensor],
                                        options: dict[str, Any]) -> None:
    check_peft_file_loads_in_ours(tmp_path, make, peft_config(options), inputs())
    _, ours, _ = peft_pair(make, "loha", options, peft_config(options))
    check_our_file_loads_in_peft(tmp_path, ours, make, inputs())


def test_rank_and_module_dropout_draw_peft_masks() -> None:
    options = {"target_modules": ["q_proj", "down_proj"], "r": 4, "rank_dropout": 0.3, "module_dropout": 0.2}
    _, ours, theirs = peft_pair(make_llama, "loha", options, peft_config(options))
    check_dropout_draws_peft_masks(ours, theirs)


def test_default_init_starts_as_the_base_and_names_follow_peft() -> None:
    base = make_llama()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig.create("loha", target_modules=["q_proj"], r=4))
    update = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert isinstance(update, LoHaUpdate) and update.scaling == 8.0 / 4
    assert {n for n, _ in update.named_parameters()} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    assert update.hada_w1_a.shape == (32, 4) and update.hada_w1_b.shape == (4, 32)
    assert not update.hada_w2_b.any() and update.hada_w2_a.any()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, token_batch()), logits(base, token_batch()), rtol=0, atol=0)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(kind=st.sampled_from(["linear", "conv1d_hf", "conv1d", "conv2d"]), d_in=st.integers(1, 12),
       d_out=st.integers(1, 12), r=st.integers(1, 6), alpha=st.sampled_from([0.5, 4.0, 16.0]),
       effective=st.booleans(), seed=st.integers(0, 1000))
def test_merge_then_unmerge_restores_the_weight(kind: str, d_in: int, d_out: int, r: int, alpha: float,
                                                 effective: bool, seed: int) -> None:
    """Both linear paths (full delta, and the rank-r^2 face-splitting one when it is cheaper) and both conv forms."""
    check_merge_round_trip("loha", kind, d_in, d_out, seed, r=r, alpha=alpha, use_effective_conv2d=effective)


def test_fit_lowers_the_loss_and_exports_for_peft(tmp_path: Path) -> None:
    check_fit_lowers_loss_and_exports_for_peft(tmp_path, method="loha", r=4, alpha=8.0,
                                               target_modules=["q_proj", "v_proj"])


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    check_resume_matches_uninterrupted_run(tmp_path, method="loha", r=2, target_modules=["q_proj", "v_proj"],
                                           rank_dropout=0.2, module_dropout=0.1)


@pytest.mark.parametrize("options,message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": -1.0}, "alpha must be a positive"),
    ({"rank_dropout": 1.0}, "rank_dropout must be a probability"),
    ({"module_dropout": "0.1"}, "module_dropout must be a probability .*drop the quotes"),
    ({"use_effective_conv2d": 1}, "use_effective_conv2d must be true or false"),
    ({"init_weights": "gaussian"}, "init_weights must be true or false"),
    ({"decompose_both": True}, "Method 'loha' takes no option 'decompose_both'"),
])
def test_invalid_options_are_clear_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ll.LoRACallback(method="loha", **options)


def test_unsupported_target_leaves_the_model_unchanged() -> None:
    check_refused_leaves_model_unchanged(make_gpt2(), "loha", target_modules=["c_attn", "wte"])  # wte: an embedding


def test_command_line_options(tmp_path: Path) -> None:
    config = cli_config(tmp_path, "--lora.method=loha", "--lora.r=2", "--lora.rank_dropout=0.1",
                        "--lora.module_dropout=0.05", "--lora.use_effective_conv2d=true",
                        f"--lora.export_dir={tmp_path / 'export'}", "--lora.target_modules=[q_proj]")
    assert config == AdapterConfig.create("loha", r=2, rank_dropout=0.1, module_dropout=0.05,
                                          use_effective_conv2d=True, target_modules=["q_proj"])


def test_conv1d_export_says_peft_cannot_load_it_and_loads_here(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """PEFT's LoHa/LoKr adapt nn.Linear/Conv1d/Conv2d only, not GPT-2's transformers Conv1D."""
    model = make_gpt2()
    inject(model, AdapterConfig.create("loha", target_modules=["c_attn", "c_fc"], r=2, init_weights=False))
    with caplog.at_level("WARNING"):
        ll.save_adapter(model, tmp_path / "a")
    assert "PEFT's LoHa has no transformers Conv1D layers (transformer.h.0.attn.c_attn" in caplog.text
    again = make_gpt2()
    ll.load_adapter(again, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(logits(again, token_batch()), logits(model, token_batch()), rtol=0, atol=0)
