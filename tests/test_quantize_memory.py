"""Memory of the quantization step: dense weights are freed layer by layer as they are quantized (the full-precision
base never has to exist twice, nor on the device at once), quantize happens before Lightning moves the model, and
modules="all-linear" quantizes the frozen linear layers without an adapter too (QLoRA's whole base)."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from test_quantize import TOKENS, CountingTokens, rel
from tiny_modules import TinyLlamaModule, trainer

import lightning_lora as ll
from lightning_lora import quantize
from lightning_lora.quantize import FrozenQuantizedLinear, NF4Config, quantize_base, quantized_layers

ALL = NF4Config(block_size=32, scaler_block_size=8, modules="all-linear")
QV = {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": False}


def test_dense_weights_are_freed_one_layer_at_a_time(monkeypatch) -> None:
    """At each layer's quantization, the dense weights still alive are exactly those not yet quantized (and the one
    being quantized): nothing keeps a converted layer's full-precision weight (freed by reference counting, at once)."""
    model = make_llama()
    ll.inject(model, QV, seed=1)
    dense = {name: weakref.ref(p) for name, p in model.named_parameters()
             if name.endswith("proj.weight") and "adapters" not in name}
    assert len(dense) == 14
    handler = quantize.HANDLERS[NF4Config]
    alive_at_each_call: list[int] = []

    def counting(weight: torch.Tensor, config: NF4Config) -> torch.Tensor:
        alive_at_each_call.append(sum(ref() is not None for ref in dense.values()))
        return handler.quantize(weight, config)

    monkeypatch.setitem(quantize.HANDLERS, NF4Config, quantize.FormatHandler(counting, handler.check))
    converted = quantize_base(model, ALL)
    assert len(converted) == 14
    assert alive_at_each_call == list(range(14, 0, -1)), alive_at_each_call  # one fewer after each layer
    assert not any(ref() is not None for ref in dense.values())


def test_all_linear_quantizes_the_frozen_layers_without_an_adapter_and_keeps_the_output_layer() -> None:
    reference, model = make_llama(), make_llama()
    for m in (reference, model):
        ll.inject(m, QV, seed=1)
    fingerprint = ll.base_fingerprint(model)
    assert len(quantize_base(model, ALL)) == 14
    frozen = [p for p, m in model.named_modules() if isinstance(m, FrozenQuantizedLinear)]
    assert len(quantized_layers(model)) == 4 and len(frozen) == 10 and all("q_proj" not in p for p in frozen)
    assert type(model.lm_head) is torch.nn.Linear and not quantize.is_quantized(model.lm_head.weight)
    assert ll.base_fingerprint(model) == fingerprint
    assert ll.parameter_counts(model) == ll.parameter_counts(reference)
    assert model.state_dict().keys() == reference.state_dict().keys()
    expected, out = reference(TOKENS).logits, model(TOKENS).logits
    assert 0 < rel(out, expected) < 0.25
    out.sum().backward()  # the first layer's adapters get gradients through the frozen quantized layers above
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ll.surgery.adapter_parameters(model))


def test_all_linear_through_fit_checkpoint_resume_and_merged_export(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint
    from transformers import LlamaForCausalLM

    options = {"format": "nf4", "block_size": 32, "scaler_block_size": 8, "modules": "all-linear"}
    module = TinyLlamaModule(lr=2e-2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = ll.LoRACallback(r=4, target_modules=["q_proj", "v_proj"], quantize=options,
                               export_dir=str(tmp_path / "export"))
    trainer(tmp_path, [callback, checkpoint], max_epochs=1, limit_train_batches=3).fit(module, CountingTokens())
    assert sum(isinstance(m, FrozenQuantizedLinear) for m in module.model.modules()) == 10
    saved = torch.load(checkpoint.last_model_path, weights_only=True)["state_dict"]
    assert saved and all(".adapters.default." in k for k in saved), "no base tensor, quantized or not"
    module.model.eval()
    expected = module.model(TOKENS).logits
    merged = LlamaForCausalLM.from_pretrained(callback.merged_dir).eval()
    torch.testing.assert_close(merged(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)
    plain = make_llama()
    ll.load_adapter(plain, callback.adapter_dir)  # the fingerprint is the full-precision base's

    resumed = TinyLlamaModule(lr=2e-2)
    trainer(tmp_path, [ll.LoRACallback(r=4, target_modules=["q_proj", "v_proj"], quantize=options,
                                       export_merged=False)],
            max_epochs=2, limit_train_batches=3, enable_checkpointing=False).fit(
        resumed, CountingTokens(), ckpt_path=checkpoint.last_model_path)
    assert sum(isinstance(m, FrozenQuantizedLinear) for m in resumed.model.modules()) == 10
    assert len(resumed.losses) == 3


def test_the_callback_quantizes_before_lightning_moves_the_model(tmp_path: Path, monkeypatch) -> None:
    """strategy.setup runs convert_module, then model_to_device: the callback's quantization must come between, so the
    move carries quantized weights (on a GPU: the dense base never reaches it whole)."""
    from pytorch_lightning.strategies import SingleDeviceStrategy

    seen: list[int] = []
    move = SingleDeviceStrategy.model_to_device

    def recording(self) -> None:
        seen.append(sum(quantize.is_quantized(p) for p in self.model.parameters()))
        move(self)

    monkeypatch.setattr(SingleDeviceStrategy, "model_to_device", recording)
    module = TinyLlamaModule()
    trainer(tmp_path, [ll.LoRACallback(r=4, quantize=ALL, export_merged=False)], max_epochs=1,
            limit_train_batches=1).fit(module, CountingTokens())
    assert seen == [14], seen


def test_modules_option_is_checked() -> None:
    with pytest.raises(ll.ConfigError, match="use 'adapted'.*or 'all-linear'"):
        NF4Config(modules="everything")
    model = make_llama()
    ll.inject(model, {**QV, "target_modules": ["q_proj", "o_proj"]}, seed=1)  # 1,024 weights: 16 blocks of 64
    with pytest.raises(ll.ConfigError, match=r"self_attn.k_proj \(16, 32\): its 8 block scales.*Use modules='adapted'"):
        quantize_base(model, NF4Config(block_size=64, scaler_block_size=16, modules="all-linear"))
    assert not quantized_layers(model) and not any(isinstance(m, FrozenQuantizedLinear) for m in model.modules())
