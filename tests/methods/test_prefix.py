"""Prefix tuning: PEFT's PREFIX_TUNING as the oracle (outputs, files both ways, generation; GQA and GPT-2), the
projection MLP, the cache it fills, round trip, unload, options, a real Trainer fit and the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import make_gpt2, make_llama
from inserted_checks import (
    batch,
    check_bad_option,
    check_cli_fits_and_exports,
    check_fit_lowers_loss,
    check_generate_uses_the_cache_correctly,
    check_round_trip_and_unload,
    check_same_as_peft_files,
    outputs,
    randomize,
)
from transformers import DynamicCache

from lightning_lora.config import AdapterConfig
from lightning_lora.io import load_adapter, save_adapter
from lightning_lora.surgery import adapters, inject, parameter_counts

CASES = [(make_llama, {"num_virtual_tokens": 3}), (make_gpt2, {"num_virtual_tokens": 3}),
         (make_llama, {"num_virtual_tokens": 2, "prefix_projection": True, "encoder_hidden_size": 16})]


@pytest.mark.parametrize("make,options", CASES, ids=["llama-gqa", "gpt2", "llama-projection"])
def test_same_as_peft_and_files_load_both_ways(tmp_path: Path, make, options: dict) -> None:
    import peft

    check_same_as_peft_files(make, "prefix", options, tmp_path, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                         **options))


def test_same_as_peft_with_the_mlp_in_training() -> None:
    """With prefix_projection, PEFT's trainable model (embedding + transform) computes what ours does."""
    import peft

    options = {"num_virtual_tokens": 2, "prefix_projection": True, "encoder_hidden_size": 16}
    base = make_llama()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("prefix", **options), seed=0)
    randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", **options))
    theirs.prompt_encoder["default"].load_state_dict(ours.prefix_encoder.state_dict())
    ids, mask = batch()
    torch.testing.assert_close(outputs(ours.eval(), ids, mask)[0], outputs(theirs.eval(), ids, mask)[0],
                               rtol=1e-5, atol=1e-5)
    kv = 16  # 2 key/value heads of 8
    assert parameter_counts(ours)[0] == 2 * kv + (kv * 16 + 16) + (16 * 2 * 2 * kv + 2 * 2 * kv)


def test_prefix_is_the_first_cache_entries_of_every_layer() -> None:
    model = make_llama()
    inject(model, AdapterConfig.create("prefix", num_virtual_tokens=3), seed=0)
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert out.logits.shape == (2, 9, 64)  # the prefix adds no positions to the output
    pairs = model.prefix_encoder.key_values(2, torch.float32)
    assert len(pairs) == 2 and pairs[0][0].shape == (2, 2, 3, 8)  # (batch, kv heads, tokens, head dim)
    for layer, (key, value) in enumerate(pairs):
        torch.testing.assert_close(out.past_key_values.layers[layer].keys[:, :, :3], key, rtol=0, atol=0)
        torch.testing.assert_close(out.past_key_values.layers[layer].values[:, :, :3], value, rtol=0, atol=0)
    given = DynamicCache(config=model.config)  # a cache the caller passes is filled, not replaced
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=given)
    assert given.get_seq_length() == 3 + 9


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_generate_with_and_without_cache(make) -> None:
    model = make()
    inject(model, AdapterConfig.create("prefix", num_virtual_tokens=3), seed=0)
    randomize(model)
    check_generate_uses_the_cache_correctly(model)


def test_projected_adapter_saves_the_prefix_and_reloads_without_the_mlp(tmp_path: Path) -> None:
    model = make_gpt2()
    inject(model, AdapterConfig.create("prefix", num_virtual_tokens=2, prefix_projection=True), seed=0)
    randomize(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] and config["inference_mode"]
    fresh = make_gpt2()
    load_adapter(fresh, tmp_path / "a")
    assert fresh.prefix_encoder.transform is None
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(fresh, ids, mask)[0], outputs(model, ids, mask)[0], rtol=1e-6, atol=1e-6)


def test_round_trip_and_unload(tmp_path: Path) -> None:
    check_round_trip_and_unload(make_llama, "prefix", {"num_virtual_tokens": 3}, tmp_path)


@pytest.mark.parametrize("options,match", [
    ({"num_virtual_tokens": -1}, "num_virtual_tokens must be a positive integer"),
    ({"prefix_projection": "yes"}, "prefix_projection must be true or false"),
    ({"encoder_hidden_size": 0}, "encoder_hidden_size must be a positive integer"),
    ({"layers_to_transform": [0]}, "prefix takes no layers_to_transform"),
])
def test_bad_options_fail_before_the_model_changes(options: dict, match: str) -> None:
    check_bad_option(make_llama, "prefix", options, match)


def test_plain_module_is_refused() -> None:
    from conftest import make_plain

    check_bad_option(make_plain, "prefix", {}, "PlainNet is not a transformers decoder model")


def test_fit_lowers_the_loss(tmp_path: Path) -> None:
    module = check_fit_lowers_loss(tmp_path, method="prefix", num_virtual_tokens=4)
    assert list(adapters(module.model)) == [""]


def test_cli_options(tmp_path: Path) -> None:
    config = check_cli_fits_and_exports(tmp_path, "--lora.method=prefix", "--lora.num_virtual_tokens=2",
                                        "--lora.prefix_projection=true", "--lora.encoder_hidden_size=8")
    assert config == AdapterConfig.create("prefix", num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8)


def test_gradient_checkpointing_is_refused_not_ignored() -> None:
    """transformers drops the cache inside checkpointed layers, which would silently drop the prefix."""
    model = make_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_bad_option(lambda: model, "prefix", {}, "drops inside checkpointed layers")
    model.gradient_checkpointing_disable()
    inject(model, AdapterConfig.create("prefix", num_virtual_tokens=2))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = batch()
    with pytest.raises(RuntimeError, match="turn gradient checkpointing off"):
        outputs(model, ids, mask)


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """The model-level adapter (path "") goes through the callback's trimmed checkpoints and resumes exactly."""
    from update_checks import check_resume_matches_uninterrupted_run

    check_resume_matches_uninterrupted_run(tmp_path, method="prefix", num_virtual_tokens=2)
