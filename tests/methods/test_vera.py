"""VeRA against PEFT as the oracle (the shared projections bit for bit, outputs, gradients, files both ways with and
without stored projections), the shared buffers' identity, its merge algebra, and a real Trainer."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import peft
import pytest
import torch
from conftest import make_gpt2, make_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_oracle import PEFT_WARNINGS, logits
from safetensors import safe_open
from torch import nn
from update_checks import (LLAMA_LINEAR, assert_same_as_peft, check_fit_lowers_loss_and_exports_for_peft,
                           check_merge_round_trip, check_our_file_loads_in_peft, check_peft_file_loads_in_ours,
                           check_refused_leaves_model_unchanged, check_resume_matches_uninterrupted_run, cli_config,
                           peft_pair, token_batch)

import lightning_lora as ll
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.methods.vera import VeRAUpdate
from lightning_lora.surgery import adapter_state_dict, adapters, inject

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS] + [
    pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A:UserWarning")]

# (id, model, our options); PEFT gets the same with vera_dropout for dropout
CASES: list[tuple[str, Callable[[], nn.Module], dict[str, Any]]] = [
    ("llama-all-linear", make_llama, {"target_modules": LLAMA_LINEAR, "r": 16}),  # 16..64 wide: sliced projections
    ("gpt2-conv1d", make_gpt2, {"target_modules": ["c_attn", "c_fc", "mlp.c_proj"], "r": 8, "projection_prng_key": 5}),
]
IDS = [c[0] for c in CASES]
PARAMS = [c[1:] for c in CASES]


def peft_config(options: dict[str, Any], **extra: Any) -> peft.VeraConfig:
    renamed = {"dropout": "vera_dropout"}
    return peft.VeraConfig(**{renamed.get(k, k): v for k, v in {**options, "init_weights": False, **extra}.items()})


def projections(model: nn.Module) -> list[Any]:
    return [layer.adapters["default"].projections for layer in adapters(model).values()]


@pytest.mark.parametrize("make,options", PARAMS, ids=IDS)
def test_same_projections_outputs_and_gradients_as_peft(make: Callable[[], nn.Module], options: dict[str, Any]) -> None:
    base, ours, theirs = peft_pair(make, "vera", options, peft_config(options))
    shared = projections(ours)[0]
    assert all(p is shared for p in projections(ours)), "one projection module for every layer"
    torch.testing.assert_close(shared.vera_A, theirs.base_model.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(shared.vera_B, theirs.base_model.vera_B["default"], rtol=0, atol=0)
    assert_same_as_peft(ours, theirs, base, token_batch())


def test_dropout_in_train_mode_matches_peft() -> None:
    options = {"target_modules": ["q_proj", "down_proj"], "r": 8, "dropout": 0.4}
    _, ours, theirs = peft_pair(make_llama, "vera", options, peft_config(options))
    ours.train(), theirs.train()
    with torch.no_grad():
        torch.manual_seed(3)
        got = logits(ours, token_batch())
        torch.manual_seed(3)
        torch.testing.assert_close(got, logits(theirs, token_batch()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_load_both_ways_with_peft(tmp_path: Path, save_projection: bool) -> None:
    options = {"target_modules": LLAMA_LINEAR, "r": 16, "save_projection": save_projection}
    check_peft_file_loads_in_ours(tmp_path, make_llama, peft_config(options), token_batch())
    _, ours, _ = peft_pair(make_llama, "vera", options, peft_config(options))
    check_our_file_loads_in_peft(tmp_path, ours, make_llama, token_batch())
    for name in ("peft", "ours"):  # the same layout: the projections once, beside PEFT's model tree, or not at all
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as f:
            shared = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith("base_model.model.")}
        assert shared == ({"base_model.vera_A": (16, 64), "base_model.vera_B": (64, 16)} if save_projection else {})
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is save_projection


def test_stored_projections_are_the_ones_loaded(tmp_path: Path) -> None:
    """A file's vera_A/vera_B win over the key (PEFT on another platform may draw other values)."""
    options = {"target_modules": ["q_proj", "v_proj"], "r": 8}
    _, ours, _ = peft_pair(make_llama, "vera", options, peft_config(options))
    with torch.no_grad():
        projections(ours)[0].vera_A.mul_(-2.0)
        expected = logits(ours, token_batch())
    ll.save_adapter(ours, tmp_path / "a")
    loaded = make_llama()
    ll.load_adapter(loaded, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(make_llama(), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, token_batch()), expected, rtol=0, atol=0)
        torch.testing.assert_close(logits(theirs, token_batch()), expected, rtol=1e-5, atol=1e-5)


def test_projections_stay_shared_frozen_and_out_of_checkpoints() -> None:
    model = make_llama()
    inject(model, AdapterConfig.create("vera", target_modules=["q_proj", "up_proj"], r=8))
    model.to(torch.float64)  # nn.Module._apply gives every module its own converted buffer unless they share the module
    copied = copy.deepcopy(model)
    for m in (model, copied):
        shared = projections(m)
        assert all(p is shared[0] for p in shared) and shared[0].vera_A.dtype == torch.float64
    assert projections(copied)[0] is not projections(model)[0]
    assert all(not p.requires_grad for p in projections(model)[0].buffers())
    assert not [k for k in adapter_state_dict(model) if "vera_A" in k or "vera_B" in k]
    update = model.model.layers[0].mlp.up_proj.adapters["default"]
    assert isinstance(update, VeRAUpdate) and {n for n, _ in update.named_parameters()} == {"vera_lambda_b", "vera_lambda_d"}
    assert not update.vera_lambda_b.any() and torch.all(update.vera_lambda_d == torch.tensor(0.1).double())
    assert update.sliced()[0].shape == (8, 32) and update.sliced()[1].shape == (64, 8)
    drawn = projections(model)[0].vera_A.clone()
    model.to(torch.bfloat16)  # a half model (precision="bf16-true") moves the projections but does not round them
    assert projections(model)[0].vera_A.dtype == torch.float64 and torch.equal(projections(model)[0].vera_A, drawn)
    with torch.no_grad():
        assert model(token_batch()).logits.dtype == torch.bfloat16
    assert projections(model)[0].vera_A.shape == (8, 32) and projections(model)[0].vera_B.shape == (64, 8)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(kind=st.sampled_from(["linear", "conv1d_hf"]), d_in=st.integers(1, 12), d_out=st.integers(1, 12),
       r=st.integers(1, 20), seed=st.integers(0, 1000))
def test_merge_then_unmerge_restores_the_weight(kind: str, d_in: int, d_out: int, r: int, seed: int) -> None:
    check_merge_round_trip("vera", kind, d_in, d_out, seed, r=r, projection_prng_key=seed)


def test_fit_lowers_the_loss_and_exports_for_peft(tmp_path: Path) -> None:
    check_fit_lowers_loss_and_exports_for_peft(tmp_path, method="vera", r=16,
                                               target_modules=["q_proj", "v_proj", "down_proj"])


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """The projections are not in the checkpoint: the resumed run draws them again from the key."""
    check_resume_matches_uninterrupted_run(tmp_path, method="vera", r=8, target_modules=["q_proj", "v_proj"],
                                           dropout=0.1, projection_prng_key=3)


@pytest.mark.parametrize("options,message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"d_initial": 0.0}, "d_initial must be a positive"),
    ({"projection_prng_key": -1}, "projection_prng_key must be a non-negative integer"),
    ({"save_projection": "false"}, "save_projection must be true or false"),
    ({"dropout": 1.5}, "dropout must be a probability"),
    ({"alpha": 8.0}, "Method 'vera' takes no option 'alpha'"),
])
def test_invalid_options_are_clear_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ll.LoRACallback(method="vera", **options)


def test_unsupported_target_leaves_the_model_unchanged() -> None:
    check_refused_leaves_model_unchanged(make_llama(), "vera", target_modules=["q_proj", "embed_tokens"], r=4)


def test_command_line_options(tmp_path: Path) -> None:
    config = cli_config(tmp_path, "--lora.method=vera", "--lora.r=4", "--lora.d_initial=0.05",
                        "--lora.projection_prng_key=7", "--lora.save_projection=false",
                        f"--lora.export_dir={tmp_path / 'export'}", "--lora.target_modules=[q_proj]")
    assert config == AdapterConfig.create("vera", r=4, d_initial=0.05, projection_prng_key=7, save_projection=False,
                                          target_modules=["q_proj"])


def test_two_named_adapters_keep_their_own_projections(tmp_path: Path) -> None:
    """Each adapter has its own pair (its own key and rank); both round-trip through one export directory."""
    from lightning_lora.surgery import set_active_adapters

    model = make_llama()
    inject(model, AdapterConfig.create("vera", target_modules=["q_proj"], r=4, init_weights=False))
    inject(model, AdapterConfig.create("vera", target_modules=["q_proj", "up_proj"], r=8, init_weights=False,
                                       projection_prng_key=3), name="b")
    set_active_adapters(model, ["default", "b"])
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.adapters["default"].projections.vera_A.shape == (4, 32)
    assert q_proj.adapters["b"].projections.vera_A.shape == (8, 32)
    ll.save_adapter(model, tmp_path / "both")
    loaded = make_llama()
    ll.load_adapter(loaded, tmp_path / "both")
    set_active_adapters(loaded, ["default", "b"])
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, token_batch()), logits(model, token_batch()), rtol=0, atol=0)
