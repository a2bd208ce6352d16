"""LLaMA-Adapter: PEFT's ADAPTION_PROMPT as the oracle (outputs, files both ways, generation; Llama with GQA and
GPT-2), zero-init gating (exactly the base at step zero), placement, round trip, unload, options, a real Trainer fit
and the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import make_gpt2, make_llama, make_plain
from inserted_checks import (
    batch,
    check_bad_option,
    check_cli_fits_and_exports,
    check_fit_lowers_loss,
    check_generate_uses_the_cache_correctly,
    check_round_trip_and_unload,
    check_same_as_peft_files,
    outputs,
)
from tiny_modules import TinyLlamaModule

from lightning_lora.config import AdapterConfig
from lightning_lora.io import save_adapter
from lightning_lora.methods.llama_adapter import AdaptionPrompt
from lightning_lora.surgery import adapters, disable_adapters, inject, parameter_counts


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama-gqa", "gpt2"])
def test_same_as_peft_and_files_load_both_ways(tmp_path: Path, make) -> None:
    import peft

    options = {"adapter_len": 4, "adapter_layers": 1}
    check_same_as_peft_files(make, "llama_adapter", options, tmp_path,
                             peft.AdaptionPromptConfig(task_type="CAUSAL_LM", **options))


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_step_zero_is_exactly_the_base_model(make) -> None:
    base = make()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig.create("llama_adapter", adapter_len=4))
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, ids, mask)[0], outputs(base, ids, mask)[0], rtol=0, atol=0)
        for adapter in adapters(model).values():
            adapter.adaption_gate.fill_(0.5)
        adapted = outputs(model, ids, mask)[0]
        assert (adapted - outputs(base, ids, mask)[0]).abs().max() > 1e-3
        with disable_adapters(model):
            torch.testing.assert_close(outputs(model, ids, mask)[0], outputs(base, ids, mask)[0], rtol=0, atol=0)


def test_placement_and_parameter_count(tmp_path: Path) -> None:
    model = make_llama(layers=3)
    assert inject(model, AdapterConfig.create("llama_adapter", adapter_len=5, adapter_layers=2)) == [
        "model.layers.1.self_attn", "model.layers.2.self_attn"]
    assert all(isinstance(a, AdaptionPrompt) for a in adapters(model).values())
    assert parameter_counts(model)[0] == 2 * (5 * 32 + 1)  # per layer: adapter_len x hidden, and the gate
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config == {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
                      "target_modules": "self_attn", "adapter_len": 5, "adapter_layers": 2, "inference_mode": True}
    every = make_llama(layers=3)
    assert len(inject(every, AdapterConfig.create("llama_adapter"))) == 3  # adapter_layers unset: every layer


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_generate_with_and_without_cache(make) -> None:
    model = make()
    inject(model, AdapterConfig.create("llama_adapter", adapter_len=3), seed=0)
    with torch.no_grad():
        for adapter in adapters(model).values():
            adapter.adaption_gate.fill_(1.0)
    check_generate_uses_the_cache_correctly(model)


def test_round_trip_and_unload(tmp_path: Path) -> None:
    check_round_trip_and_unload(make_llama, "llama_adapter", {"adapter_len": 3}, tmp_path)


@pytest.mark.parametrize("make,options,match", [
    (make_llama, {"adapter_len": 0}, "adapter_len must be a positive integer"),
    (make_llama, {"adapter_layers": 3}, "adapter_layers=3 but LlamaForCausalLM has only 2 attention modules"),
    (make_llama, {"target_modules": ["q_proj", "k_proj"]}, "one attention module name"),
    (make_llama, {"target_modules": "mlp"}, r"model.layers.0.mlp \(LlamaMLP\) is not an attention module"),
    (make_llama, {"layers_to_transform": [1]}, "takes no layers_to_transform"),
    (make_plain, {}, "PlainNet has no attention module named 'self_attn' or 'attn'"),
])
def test_bad_options_fail_before_the_model_changes(make, options: dict, match: str) -> None:
    check_bad_option(make, "llama_adapter", options, match)


def test_fit_lowers_the_loss(tmp_path: Path) -> None:
    # the gate starts at zero, so a tiny model's loss moves slowly at LoRA's rate; 0.1 shows it in two epochs
    module = check_fit_lowers_loss(tmp_path, TinyLlamaModule(lr=0.1), method="llama_adapter", adapter_len=4)
    assert all(a.adaption_gate.abs().item() > 0 for a in adapters(module.model).values())


def test_cli_options(tmp_path: Path) -> None:
    config = check_cli_fits_and_exports(tmp_path, "--lora.method=llama_adapter", "--lora.adapter_len=3",
                                        "--lora.adapter_layers=1")
    assert config == AdapterConfig.create("llama_adapter", adapter_len=3, adapter_layers=1)


@pytest.mark.parametrize("method,options", [("llama_adapter", {"adapter_len": 3}), ("prompt", {"num_virtual_tokens": 2})])
def test_gradients_with_gradient_checkpointing(method: str, options: dict) -> None:
    """The hook runs again when the checkpointed layer is recomputed (LLaMA-Adapter); the soft prompt is an input
    that requires grad (prompt tuning): the adapter gradients are the same with checkpointing on."""
    grads = []
    for checkpointing in (False, True):
        model = make_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        inject(model, AdapterConfig.create(method, **options), seed=0)
        with torch.no_grad():
            for adapter in adapters(model).values():
                if isinstance(adapter, AdaptionPrompt):
                    adapter.adaption_gate.fill_(0.5)
        model.train()
        ids, mask = batch()
        outputs(model, ids, mask)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().max() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
