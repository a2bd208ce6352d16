"""Quantization options and how the quantization step composes with Lightning: NF4 block sizes and double
quantization, QuantizedPrecision and LoRACallback(quantize=...) under bf16-mixed and 16-mixed with either Lightning
package, and parameter counts in the model summary by logical size."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_llama
from test_quantize import FORMATS, NF4, TOKENS, adapted, rel
from tiny_modules import TinyLlamaModule

import lightning_lora as ll
from lightning_lora.config import ConfigError
from lightning_lora.plugins import QuantizedPrecision
from lightning_lora.quantize import Int4Config, NF4Config, as_quantize_config, dequantize, quantized_layers

NO_DQ = NF4Config(block_size=32, double_quantization=False)


def test_nf4_without_double_quantization_keeps_exact_scales_and_needs_only_block_size(tmp_path: Path) -> None:
    reference = adapted()
    # the tiny layers hold 1,024 weights: 32 blocks of 32, which the default scaler_block_size=256 does not divide
    with pytest.raises(ConfigError, match="scaler_block_size"):
        adapted(NF4Config(block_size=32))
    model = adapted(NO_DQ)
    for path, layer in quantized_layers(model).items():
        weight = reference.get_submodule(path).weight
        blocks = weight.detach().reshape(-1, 32)
        torch.testing.assert_close(layer.weight.quantized_scalers, blocks.abs().amax(dim=1), rtol=0, atol=0)
        # the same 4-bit codes (torchao picks them with the exact scales either way); only the scales differ
        double = adapted(NF4).get_submodule(path).weight
        assert torch.equal(layer.weight.quantized_data, double.quantized_data)
        assert rel(dequantize(layer.weight), weight) == pytest.approx(rel(dequantize(double), weight), rel=0.05)
    # it trains and merges like any other format, and the requantized export keeps the exact scales
    model(TOKENS).logits.sum().backward()
    assert all(p.grad is not None for p in ll.surgery.adapter_parameters(model))
    ll.export_merged(model, tmp_path / "merged", merge_target="requantized", report=None)
    loaded = ll.load_quantized(tmp_path / "merged")
    scalers = loaded.model.layers[0].self_attn.q_proj.weight.quantized_scalers
    assert scalers.dtype == torch.float32


def test_format_options_are_checked_with_the_fix() -> None:
    assert as_quantize_config({"format": "nf4", "double_quantization": False, "block_size": 128}) == NF4Config(
        block_size=128, double_quantization=False)
    with pytest.raises(ConfigError, match="block_size must be even"):
        NF4Config(block_size=33)
    with pytest.raises(ConfigError, match=r"NF4Config\(scaler_block_size=0\): give a positive integer"):
        NF4Config(scaler_block_size=0)
    with pytest.raises(ConfigError, match="give true or false"):
        as_quantize_config({"format": "nf4", "double_quantization": "no"})
    with pytest.raises(ConfigError, match="positive even integer"):
        Int4Config(group_size=7)
    with pytest.raises(ConfigError, match="'auto' \\(= 'packed'\\), 'intx' or 'tile_packed'"):
        Int4Config(packing="tiles")
    with pytest.raises(ConfigError, match="QuantizedPrecision\\(precision='8-mixed'\\): use one of"):
        QuantizedPrecision("nf4", precision="8-mixed")


def module_class(package: str) -> type:
    """A tiny-Llama LightningModule of ``package`` that records the logits' dtype of each step (bfloat16/float16 when
    autocast is on)."""
    L = importlib.import_module(package)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_llama().train()
            self.dtypes: set[torch.dtype] = set()
            self.losses: list[float] = []

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            out = self.model(input_ids=batch, labels=batch)
            self.dtypes.add(out.logits.dtype)
            self.losses.append(out.loss.item())
            return out.loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=2e-2)

    return Module


def fit(package: str, root: Path, callback_quantize=None, plugin=None, precision=None):
    """A real fit with ``package``'s Trainer and LightningModule."""
    L = importlib.import_module(package)
    module = module_class(package)()
    callback = ll.LoRACallback(r=4, quantize=callback_quantize, export_merged=False, export_dir=str(root / "export"))
    kwargs = {"precision": precision} if precision else {}
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                        callbacks=[callback], plugins=[plugin] if plugin else None, **kwargs)
    tokens = torch.randint(3, VOCAB, (8, 1), generator=torch.Generator().manual_seed(0)).expand(-1, 12)
    trainer.fit(module, torch.utils.data.DataLoader(list(tokens), batch_size=2))
    return module


@pytest.mark.parametrize(("package", "how", "precision"), [
    ("pytorch_lightning", "callback", "bf16-mixed"),
    ("pytorch_lightning", "plugin", "bf16-mixed"),
    ("pytorch_lightning", "plugin", "16-mixed"),  # the Trainer's flag turns 16-mixed into bf16 on the CPU; a plugin not
    ("lightning.pytorch", "callback", "bf16-mixed"),
    ("lightning.pytorch", "plugin", "16-mixed"),
    ("pytorch_lightning", "plugin", "bf16-true"),  # the true-half cast first, then the quantization
])
def test_quantization_composes_with_mixed_precision(tmp_path: Path, package: str, how: str, precision: str) -> None:
    pytest.importorskip(package)
    options = {"format": "nf4", "block_size": 32, "scaler_block_size": 8}
    if how == "callback":
        module = fit(package, tmp_path, callback_quantize=options, precision=precision)
    else:
        module = fit(package, tmp_path, plugin=QuantizedPrecision(options, precision=precision, device="cpu"))
    assert module.dtypes == {torch.bfloat16 if precision.startswith("bf16") else torch.float16}
    assert len(quantized_layers(module.model)) == 14
    assert all(torch.isfinite(torch.tensor(module.losses)))
    adapters = list(ll.surgery.adapter_parameters(module.model))
    assert all(p.dtype == torch.float32 for p in adapters)
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n), "the adapter trained"


@pytest.mark.parametrize("name", FORMATS)
def test_model_summary_counts_quantized_weights_by_logical_size(name: str) -> None:
    from pytorch_lightning.utilities.model_summary import ModelSummary

    plain, quantized = TinyLlamaModule(), TinyLlamaModule()
    for module in (plain, quantized):
        ll.inject(module.model, {"method": "lora", "r": 4}, seed=1)
    ll.quantize_base(quantized.model, FORMATS[name])
    expected, summary = ModelSummary(plain), ModelSummary(quantized)
    assert (summary.total_parameters, summary.trainable_parameters) == (
        expected.total_parameters, expected.trainable_parameters)
    assert ll.parameter_counts(quantized) == ll.parameter_counts(plain)
    assert summary.total_parameters == sum(p.numel() for p in make_llama().parameters()) + summary.trainable_parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double", [True, False])
def test_our_nf4_dequantization_equals_torchaos_bit_for_bit(dtype: torch.dtype, double: bool) -> None:
    from lightning_lora.quantize import _dequantize_nf4, _nf4_quantize

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    nf4 = _nf4_quantize(weight, NF4Config(block_size=64, scaler_block_size=16, double_quantization=double))
    ours, theirs = _dequantize_nf4(nf4), nf4.get_original_weight()
    assert ours.dtype == theirs.dtype == dtype and torch.equal(ours, theirs)


def test_packed_int4_is_refused_under_fsdp2_with_the_fix(tmp_path: Path) -> None:
    """FSDP2 shards parameters with aten.split, which the packed int4 layout lacks: refused in setup, model untouched."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    module = TinyLlamaModule()
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, default_root_dir=tmp_path)
    callback = ll.LoRACallback(r=4, target_modules=["q_proj"], export_merged=False, quantize="int4")
    with pytest.raises(ConfigError, match="packed int4 layout cannot be sharded yet. Use quantize='nf4'"):
        callback.setup(trainer, module, "fit")
    assert not ll.adapters(module.model)
