"""BitFit: only biases train (linear, Conv1D, convolution and LayerNorm biases), the adapted model equals the base with
its biases replaced, merge/unmerge round trips exactly, the export is just the biases, unload restores the originals,
options, a real Trainer fit (with the merged export) and the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_gpt2, make_llama, make_plain
from inserted_checks import batch, check_bad_option, check_fit_lowers_loss, check_round_trip_and_unload, outputs
from safetensors.torch import load_file
from tiny_modules import TinyLlamaModule
from torch import nn

from lightning_lora.config import AdapterConfig
from lightning_lora.export import merged_state_dict
from lightning_lora.io import save_adapter
from lightning_lora.surgery import adapters, disable_adapters, inject, merge, parameter_counts, unload, unmerge


def trained(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give every BitFit bias random values; returns them by the base bias's state dict key."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for path, adapter in adapters(model).items():
            adapter.bias.add_(torch.randn(adapter.bias.shape, generator=gen))
            values[f"{path}.bias"] = adapter.bias.detach().clone()
    return values


def with_biases(base: nn.Module, biases: dict[str, torch.Tensor]) -> nn.Module:
    reference = copy.deepcopy(base)
    reference.load_state_dict(biases, strict=False)
    return reference


def test_only_biases_train_and_the_model_is_the_base_with_new_biases() -> None:
    base = make_gpt2()
    model = copy.deepcopy(base)
    targets = inject(model, AdapterConfig.create("bitfit"))
    biases = {n: p for n, p in base.named_parameters() if n.endswith(".bias")}
    assert sorted(f"{t}.bias" for t in targets) == sorted(biases)  # LayerNorm and Conv1D biases alike
    assert parameter_counts(model)[0] == sum(p.numel() for p in biases.values())
    assert all(p.requires_grad == n.endswith(".bitfit.bias") for n, p in model.named_parameters())
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, ids, mask)[0], outputs(base, ids, mask)[0], rtol=0, atol=0)
        reference = with_biases(base, trained(model))
        torch.testing.assert_close(outputs(model, ids, mask)[0], outputs(reference, ids, mask)[0],
                                   rtol=1e-5, atol=1e-5)


def test_convolution_biases_are_per_channel() -> None:
    base = make_plain()
    model = copy.deepcopy(base)
    assert inject(model, AdapterConfig.create("bitfit")) == ["conv", "block.0", "block.2", "head"]
    reference = with_biases(base, trained(model))
    x = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_merge_round_trips_and_unload_restores_the_originals_exactly() -> None:
    base = make_gpt2()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig.create("bitfit"))
    biases = trained(model)
    ids, mask = batch()
    with torch.no_grad():
        adapted = outputs(model, ids, mask)[0]
        merged_export = merged_state_dict(model)
        merge(model)
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in biases.items())  # the base now holds the trained biases
        assert all(torch.equal(merged_export[k], state[k]) for k in base.state_dict())
        torch.testing.assert_close(outputs(model, ids, mask)[0], adapted, rtol=0, atol=0)
        with disable_adapters(model):
            torch.testing.assert_close(outputs(model, ids, mask)[0], outputs(base, ids, mask)[0],
                                       rtol=1e-5, atol=1e-5)
        unmerge(model)
        torch.testing.assert_close(outputs(model, ids, mask)[0], adapted, rtol=0, atol=0)
        merge(model)
    unload(model)  # merged, then unloaded without merge: the original biases, bit for bit
    expected = base.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())

    kept = copy.deepcopy(base)
    inject(kept, AdapterConfig.create("bitfit"))
    biases = trained(kept)
    unload(kept, merge=True)
    assert not adapters(kept) and all(torch.equal(kept.state_dict()[k], v) for k, v in biases.items())


def test_export_is_just_the_biases(tmp_path: Path) -> None:
    model = make_gpt2()
    inject(model, AdapterConfig.create("bitfit", target_modules=["c_attn", "ln_f"]))
    biases = trained(model)
    save_adapter(model, tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {k.removeprefix("base_model.model."): v for k, v in saved.items()}.keys() == biases.keys()
    assert all(torch.equal(saved[f"base_model.model.{k}"], v) for k, v in biases.items())


def test_round_trip_and_unload(tmp_path: Path) -> None:
    check_round_trip_and_unload(make_gpt2, "bitfit", {}, tmp_path)


@pytest.mark.parametrize("make,options,match", [
    (make_llama, {}, "LlamaForCausalLM has no bias terms"),
    (make_gpt2, {"target_modules": ["wte"]}, r"cannot adapt: transformer.wte \(Embedding\)"),
    (make_gpt2, {"target_modules": "nothing.*"}, "nothing"),
])
def test_bad_options_fail_before_the_model_changes(make, options: dict, match: str) -> None:
    check_bad_option(make, "bitfit", options, match)


class TinyGPT2Module(TinyLlamaModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(lr)
        self.model = make_gpt2().train()


def test_fit_lowers_the_loss_and_exports_the_merged_model(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    module = check_fit_lowers_loss(tmp_path, TinyGPT2Module(), method="bitfit")
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "export" / "merged").eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(merged, ids, mask)[0], outputs(module.model.eval(), ids, mask)[0],
                                   rtol=1e-5, atol=1e-5)


def test_cli_options(tmp_path: Path) -> None:
    from test_cli import lora_callbacks, run_cli

    cli = run_cli([f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", "--lora.method=bitfit",
                   "--model=test_bitfit.TinyGPT2Module", f"--lora.export_dir={tmp_path / 'export'}"])
    (callback,) = lora_callbacks(cli)
    assert callback.config == AdapterConfig.create("bitfit")
    assert (tmp_path / "export" / "merged").is_dir()


def test_an_adapter_saved_while_merged_loads_on_a_fresh_base(tmp_path: Path) -> None:
    """Merging does not change the base fingerprint (the base state is the original biases), so the file of a merged
    model loads on the base it was trained on."""
    from lightning_lora.fingerprint import base_fingerprint
    from lightning_lora.io import load_adapter

    model = make_gpt2()
    inject(model, AdapterConfig.create("bitfit"))
    trained(model)
    before = base_fingerprint(model)
    merge(model)
    assert base_fingerprint(model) == before
    save_adapter(model, tmp_path / "a")
    fresh = make_gpt2()
    load_adapter(fresh, tmp_path / "a")
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(fresh, ids, mask)[0], outputs(model, ids, mask)[0], rtol=0, atol=0)
