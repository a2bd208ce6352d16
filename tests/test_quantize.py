"""QLoRA on torchao (lightning_lora/quantize.py and the callback's quantize option), on the CPU: NF4, int8 and the
int4 intx layout; outputs within the quantization error, gradients through the quantized base, merge targets and
their measured errors, a real Trainer.fit, adapter-only checkpoints and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_gpt2, make_llama
from pytorch_lightning.callbacks import ModelCheckpoint
from tiny_modules import TinyLlamaModule, TokensDataModule, trainer

import lightning_lora as ll
from lightning_lora.config import ConfigError
from lightning_lora.methods.base import MergeError
from lightning_lora.quantize import (
    FrozenQuantizedLinear,
    Int4Config,
    Int8Config,
    NF4Config,
    QuantizedLinear,
    as_quantize_config,
    dequantize,
    is_quantized,
    merge_quantized,
    quantize_base,
    quantized_layers,
)

# The tiny Llama's layers hold 1,024 to 2,048 weights: NF4's default scaler blocks of 256 need 16,384.
NF4 = NF4Config(block_size=32, scaler_block_size=8)
FORMATS = {"nf4": NF4, "int8": Int8Config(), "int4": Int4Config(group_size=16)}
# Relative error of the weights each format is expected to reach on Gaussian weights (measured: nf4 0.09, int8 0.005,
# int4 with groups of 16 0.07), with some room.
WEIGHT_ERROR = {"nf4": 0.12, "int8": 0.01, "int4": 0.1}
LORA = {"method": "lora", "r": 4, "init_weights": False}  # B random too: the adapter changes the output from the start
TOKENS = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def adapted(quantize=None, method: str = "lora") -> torch.nn.Module:
    model = make_llama()
    ll.inject(model, {**LORA, "method": method}, seed=1)
    if quantize is not None:
        quantize_base(model, quantize)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", FORMATS)
def test_quantized_base_is_close_and_gradients_reach_every_adapter(name: str) -> None:
    reference, model = adapted(), adapted(FORMATS[name])
    layers = quantized_layers(model)
    assert len(layers) == 14 and all(is_quantized(layer.weight) for layer in layers.values())
    for path, layer in layers.items():
        exact = reference.get_submodule(path).weight
        assert 0 < rel(dequantize(layer.weight).float(), exact) < WEIGHT_ERROR[name], path
    # adapters stay float32 and trainable; the base is frozen; parameter counts use the logical size
    assert all(p.dtype == torch.float32 and p.requires_grad for p in ll.surgery.adapter_parameters(model))
    assert ll.parameter_counts(model) == ll.parameter_counts(reference)

    expected, out = reference(TOKENS).logits, model(TOKENS).logits
    assert 0 < rel(out, expected) < 2 * WEIGHT_ERROR[name]
    out.sum().backward()
    reference(TOKENS).logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == reference_grads.keys() and len(grads) == 28
    for key, grad in grads.items():  # the first layer's adapters get theirs through every quantized layer above
        assert grad is not None and rel(grad, reference_grads[key]) < 4 * WEIGHT_ERROR[name], key


def test_quantized_linear_backward_is_the_transposed_product() -> None:
    quantized = adapted(Int8Config()).model.layers[0].self_attn.q_proj.weight
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: QuantizedLinear.apply(t, quantized), (x,))
    torch.testing.assert_close(QuantizedLinear.apply(x.float(), quantized), x.float() @ dequantize(quantized).T)


@pytest.mark.parametrize("name", ["nf4", "int4"])  # int4: our packed layout, dequantized by plain tensor ops
def test_bfloat16_base_and_compile_without_graph_breaks(name: str) -> None:
    model = make_llama().to(torch.bfloat16)
    ll.inject(model, LORA, seed=1)
    quantize_base(model, FORMATS[name])
    layer = model.model.layers[0]
    x = torch.randn(2, 12, 32, dtype=torch.bfloat16)
    embeddings = model.model.rotary_emb(x, torch.arange(12)[None])
    eager = layer(x, position_embeddings=embeddings)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    out = compiled(x, position_embeddings=embeddings)
    eager, out = (t[0] if isinstance(t, tuple) else t for t in (eager, out))
    assert out.dtype == torch.bfloat16 and torch.equal(out, eager)
    out.float().sum().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in layer.parameters() if p.requires_grad)


def test_qdora_trains_and_merges_over_an_nf4_base() -> None:
    model = adapted(NF4, method="dora")
    model(TOKENS).logits.sum().backward()
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 14 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes)
    with torch.no_grad():
        for p in magnitudes:
            p.mul_(1.05)  # a trained magnitude
    expected = model(TOKENS).logits.detach()
    report = merge_quantized(model, "dequantized", probe=TOKENS, report=None)
    assert report.logits_max_diff < 1e-4 and not ll.adapters(model)
    torch.testing.assert_close(model(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)


def test_an_untrained_qdora_equals_its_quantized_base_and_a_trained_one_is_kept() -> None:
    """DoRA's m starts as ||W||: over a quantized base it must be ||dequant(Wq)||, or step 0 is off by the quantization
    error. An update whose B is not zero (trained or loaded) keeps its m."""
    model = make_llama()
    ll.inject(model, {"method": "dora", "r": 4}, seed=1)
    quantize_base(model, NF4)
    with ll.disable_adapters(model):
        base = model(TOKENS).logits
    torch.testing.assert_close(model(TOKENS).logits, base, rtol=1e-5, atol=1e-5)
    for layer in quantized_layers(model).values():
        norms = torch.linalg.vector_norm(dequantize(layer.weight).float(), dim=1)
        torch.testing.assert_close(layer.adapters["default"].lora_magnitude_vector, norms, rtol=1e-6, atol=0)

    model = make_llama()
    ll.inject(model, {"method": "dora", "r": 4}, seed=1)
    loaded = model.model.layers[0].self_attn.q_proj.adapters["default"]
    with torch.no_grad():
        loaded.lora_B.weight.fill_(0.01)
        loaded.lora_magnitude_vector.mul_(1.05)
    kept = loaded.lora_magnitude_vector.detach().clone()
    quantize_base(model, NF4)
    assert torch.equal(loaded.lora_magnitude_vector, kept)


def test_quantize_is_idempotent_checks_everything_first_and_keeps_the_fingerprint() -> None:
    model = adapted()
    fingerprint = ll.base_fingerprint(model)
    assert len(quantize_base(model, NF4)) == 14
    weights = [layer.weight for layer in quantized_layers(model).values()]
    assert quantize_base(model, NF4) == []
    assert [layer.weight for layer in quantized_layers(model).values()] == weights
    assert ll.base_fingerprint(model) == fingerprint  # the full-precision base's: adapters load onto it
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_base(model, Int8Config())

    fresh = adapted()
    with pytest.raises(ConfigError, match=r"scaler_block_size=16 divides them"):
        quantize_base(fresh, NF4Config(block_size=64, scaler_block_size=256))
    fresh.model.layers[1].mlp.down_proj.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match=r"down_proj.weight is trainable"):
        quantize_base(fresh, NF4)
    assert not quantized_layers(fresh), "a refused quantization must leave every layer as it was"
    gpt2 = make_gpt2()
    ll.inject(gpt2, {"method": "lora", "r": 2, "target_modules": ["c_attn"]})
    with pytest.raises(ConfigError, match=r"transformer.h.0.attn.c_attn is a Conv1D; only nn.Linear bases"):
        quantize_base(gpt2, Int8Config())
    with pytest.raises(ConfigError, match="Unknown quantization format 'nf5'"):
        as_quantize_config("nf5")
    with pytest.raises(ConfigError, match=r"no option \['group_size'\]"):
        as_quantize_config({"format": "nf4", "group_size": 3})
    assert as_quantize_config({"format": "int4", "group_size": 64}) == Int4Config(group_size=64)


def test_merge_in_place_is_refused_with_the_way_out() -> None:
    model = adapted(NF4)
    with pytest.raises(MergeError, match="merge_quantized"):
        ll.merge(model)
    assert quantized_layers(model), "unchanged"


def test_export_merged_from_a_quantized_base_logs_merge_quantizeds_report(tmp_path: Path, caplog) -> None:
    expected = merge_quantized(adapted(NF4), "dequantized", report=None)
    model, reports = adapted(NF4), []
    with caplog.at_level("INFO", logger="lightning_lora"):
        ll.export_merged(model, tmp_path / "merged", report=reports.append)
    assert reports == [expected] and expected.layers == 14
    assert str(expected) in caplog.text and str(tmp_path / "merged") in caplog.text
    assert len(quantized_layers(model)) == 14, "the model is unchanged"


@pytest.mark.parametrize(("name", "lost"), [("nf4", (0.5, 10.0)), ("int4", (0.5, 10.0)), ("int8", (0.01, 0.5))])
def test_requantizing_a_trained_sized_update_to_4_bits_loses_most_of_it(name: str, lost: tuple) -> None:
    model = adapted(FORMATS[name])
    with torch.no_grad():  # scale each update to 2% of its weight's norm, about what a LoRA fine-tune reaches
        for layer in quantized_layers(model).values():
            b = layer.adapters["default"].lora_B.weight
            b.mul_(0.02 * dequantize(layer.weight).norm() / layer.delta_weight().norm())
    report = merge_quantized(model, "requantized", report=None)
    assert lost[0] < report.update_rel_error < lost[1], report  # measured: nf4 1.08, int4 1.02, int8 0.28
    assert ("rounded away" in str(report)) == (name != "int8")


def test_merge_original_needs_every_weight_and_leaves_the_model_unchanged_otherwise() -> None:
    model = adapted(NF4)
    partial = {k: v for k, v in make_llama().state_dict().items() if "layers.1.mlp" not in k}
    with pytest.raises(MergeError, match=r"model.layers.1.mlp.down_proj.weight is missing"):
        merge_quantized(model, "original", original=partial)
    assert len(quantized_layers(model)) == 14
    with pytest.raises(MergeError, match="needs original="):
        merge_quantized(model, "original")
    with pytest.raises(MergeError, match="use one of"):
        merge_quantized(model, "fused")



class CountingTokens(TokensDataModule):
    """Sequences that repeat one token: the next token is learnable in a few steps, unlike random tokens."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        tokens = torch.randint(3, 64, (self.count, 1), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(list(tokens.expand(-1, self.length)), batch_size=self.batch_size)


def qlora(**kwargs) -> ll.LoRACallback:
    return ll.LoRACallback(r=4, quantize={"format": "nf4", "block_size": 32, "scaler_block_size": 8}, **kwargs)


def test_fit_with_an_nf4_base_lowers_the_loss_and_checkpoints_only_the_adapter(tmp_path: Path) -> None:
    module = TinyLlamaModule(lr=2e-2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = qlora(export_dir=str(tmp_path / "export"))
    trainer(tmp_path, [callback, checkpoint], max_epochs=3).fit(module, CountingTokens())
    assert len(quantized_layers(module.model)) == 14
    first, last = sum(module.losses[:8]) / 8, sum(module.losses[16:]) / 8  # the same 8 batches, epochs 1 and 3
    assert len(module.losses) == 24 and last < first - 0.05, (first, last)  # measured 4.17 -> 4.02

    saved = torch.load(checkpoint.last_model_path, weights_only=True)["state_dict"]
    assert saved and all(".adapters.default." in k for k in saved), sorted(saved)[:3]
    # the adapter written at fit end loads onto the full-precision base (same fingerprint)
    plain = make_llama()
    ll.load_adapter(plain, callback.adapter_dir)
    module.model.eval()
    expected = module.model(TOKENS).logits
    assert rel(plain(TOKENS).logits, expected) < 0.2  # the quantized base against the full-precision one
    # the merged export is the dequantized target: what the trained model computed
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(callback.merged_dir).eval()
    torch.testing.assert_close(merged(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)
    report = callback.merge_report  # measured, as merge_quantized's
    assert report.target == "dequantized" and report.layers == 14 and report.weight_max_error == 0
    assert report.update_rel_error < 1e-6

    resumed = TinyLlamaModule(lr=2e-2)
    trainer(tmp_path, [qlora()], max_epochs=4, enable_checkpointing=False).fit(
        resumed, CountingTokens(), ckpt_path=checkpoint.last_model_path)
    restored = {k: v for k, v in ll.adapter_state_dict(resumed.model).items()}
    assert len(quantized_layers(resumed.model)) == 14 and len(resumed.losses) == 8
    assert restored.keys() == {k.removeprefix("model.") for k in saved}
    assert resumed.losses[0] < first, "the resumed run starts from the trained adapter"


def test_true_half_precision_keeps_the_base_quantized(tmp_path: Path) -> None:
    module = TinyLlamaModule()
    trainer(tmp_path, [qlora()], max_epochs=1, precision="bf16-true").fit(module, TokensDataModule())
    layers = quantized_layers(module.model)
    assert len(layers) == 14 and all(layer.weight.dtype == torch.bfloat16 for layer in layers.values())
    assert all(p.dtype == torch.float32 for p in ll.surgery.adapter_parameters(module.model))


def test_ddp_with_an_nf4_base_trains_as_one_process(tmp_path: Path) -> None:
    """Two gloo processes over an NF4 base (every frozen linear layer quantized, the 4 adapted ones and the 10 without an
    adapter): DDP's wrap-time broadcast skips the quantized weights, and the adapter equals one process's trained on
    the same global batch (run in this process)."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from tiny_modules import TinyLlamaModule as Module

    options = {"format": "nf4", "block_size": 32, "scaler_block_size": 8, "modules": "all-linear"}
    script = Path(__file__).with_name("ddp_train.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), "--devices", "2", "--batch-size", "4", "--out",
                             str(tmp_path / "two"), "--quantize", json.dumps(options)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")

    pl.seed_everything(0)
    callback = ll.LoRACallback(r=4, target_modules=["q_proj", "v_proj"], export_dir=str(tmp_path / "one"),
                               export_merged=False, quantize=options)
    module = Module(lr=1e-2)
    trainer(tmp_path, [callback], deterministic=False).fit(module, TokensDataModule(count=32, batch_size=8))
    assert len(quantized_layers(module.model)) == 4
    assert sum(isinstance(m, FrozenQuantizedLinear) for m in module.model.modules()) == 10
    single = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert single.keys() == ddp.keys() and len(single) == 8
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in single.items() if "lora_B" in k)


class QuietLlama(TinyLlamaModule):
    """No ``self.log`` in the step: Dynamo cannot trace Lightning's logging (with or without quantization)."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss


def test_fit_of_a_compiled_module_over_an_nf4_base_has_no_graph_break(tmp_path: Path) -> None:
    """``trainer.fit(torch.compile(module))``: one graph, and the teardown's ``.cpu()`` works although Dynamo holds weak
    references to the quantized weights (``nn.Module._apply`` would try to swap them in place)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = QuietLlama()
    trainer(tmp_path, [qlora(export_merged=False)], max_epochs=1, limit_train_batches=2).fit(
        torch.compile(module, backend="aot_eager"), CountingTokens())
    assert len(quantized_layers(module.model)) == 14
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1


def test_moving_keeps_the_base_quantized_and_a_cast_dequantizes_it() -> None:
    model = adapted(NF4)
    expected = model(TOKENS).logits
    weakref_held = [__import__("weakref").ref(layer.weight) for layer in quantized_layers(model).values()]
    model.cpu()  # Dynamo's guards hold such weak references; nn.Module._apply could not swap these tensors
    assert len(quantized_layers(model)) == 14 and weakref_held
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.original_module.weight is layer.weight
    torch.testing.assert_close(model(TOKENS).logits, expected)
    model.double()
    assert not quantized_layers(model) and layer.weight.dtype == torch.float64
    torch.testing.assert_close(model(TOKENS).logits.float(), expected, rtol=1e-4, atol=1e-4)


def test_precision_plugin_quantizes_in_convert_module(tmp_path: Path) -> None:
    from lightning_lora.plugins import QuantizedPrecision

    plugin = QuantizedPrecision({"format": "int8"})
    module = TinyLlamaModule(lr=2e-2)
    trainer(tmp_path, [ll.LoRACallback(r=4, export_merged=False)], max_epochs=2, plugins=[plugin]).fit(
        module, CountingTokens())
    layers = quantized_layers(module.model)
    assert len(layers) == 14 and all(layer.quantization == Int8Config() for layer in layers.values())
    assert sum(module.losses[8:]) < sum(module.losses[:8])
    assert all(name.startswith("model.model.layers.") for name in module._ddp_params_and_buffers_to_ignore)

    with pytest.raises(ConfigError, match="found no adapted nn.Linear"):  # no adapter injected
        trainer(tmp_path, [], max_epochs=1, plugins=[QuantizedPrecision("int8")]).fit(
            TinyLlamaModule(), CountingTokens())
    with pytest.raises(ConfigError, match="Unknown quantization format"):
        QuantizedPrecision("int3")


def test_cli_lora_quantize_option(tmp_path: Path) -> None:
    from lightning_lora.cli import build_cli

    cli = build_cli(["fit", "--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", "--trainer.logger=false",
                     "--trainer.enable_checkpointing=false", "--lora.r=2", "--lora.export_merged=false",
                     '--lora.quantize={"format": "int4", "group_size": 16}'])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]
    assert callback.quantize == Int4Config(group_size=16)
    assert len(quantized_layers(cli.model.model)) == 14
