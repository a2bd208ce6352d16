"""Merge targets from a quantized base (lightning_lora/quantize_merge.py, export.py, quantize_io.py): dequantized,
requantized and original, out of place and in place, through export_merged and the callback's fit-end export, each
with its measured MergeReport; the requantized export is smaller and loads back with load_quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_llama
from test_quantize import FORMATS, NF4, TOKENS, WEIGHT_ERROR, CountingTokens, adapted
from tiny_modules import TinyLlamaModule, trainer

import lightning_lora as ll
from lightning_lora.config import ConfigError
from lightning_lora.methods.base import MergeError
from lightning_lora.quantize import FrozenQuantizedLinear, dequantize, is_quantized, quantized_layers
from lightning_lora.quantize_merge import merge_quantized, merged_quantized_state_dict

TARGETS = ("dequantized", "requantized", "original")


def file_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", FORMATS)
def test_out_of_place_merge_equals_in_place_and_leaves_the_model_unchanged(name: str, target: str) -> None:
    original = make_llama().state_dict()
    model = adapted(FORMATS[name])
    trained = model(TOKENS).logits.detach()
    lines: list[str] = []
    state, report = merged_quantized_state_dict(model, target, original=original, probe=TOKENS, report=lines.append)
    assert lines == [str(report)] and f"target {target!r}" in lines[0] and report.layers == 14
    assert len(quantized_layers(model)) == 14 and len(ll.adapters(model)) == 14, "the model is unchanged"
    torch.testing.assert_close(model(TOKENS).logits, trained, rtol=0, atol=0)

    key = "model.layers.0.self_attn.q_proj.weight"
    assert is_quantized(state[key]) == (target == "requantized")
    in_place = merge_quantized(model, target, original=original, probe=TOKENS, report=None)
    assert not ll.adapters(model)
    assert (in_place.weight_max_error, in_place.update_rel_error) == (report.weight_max_error, report.update_rel_error)
    assert in_place.logits_max_diff == pytest.approx(report.logits_max_diff, rel=1e-3, abs=1e-6)
    merged = model.state_dict()
    assert merged.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(dequantize(merged[k]), dequantize(v), rtol=0, atol=0, msg=k)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FrozenQuantizedLinear if target == "requantized" else torch.nn.Linear)

    if target == "dequantized":  # what the trained model computed
        assert report.weight_max_error == 0 and report.update_rel_error < 1e-6 and report.logits_max_diff < 1e-4
    elif target == "original":  # the update on the full-precision base: the unquantized model merged
        assert report.weight_max_error == 0
        for path, layer in ll.adapters(adapted()).items():
            torch.testing.assert_close(model.get_submodule(path).weight, layer.merged_weight())
    else:
        assert 0 < report.weight_rel_error < WEIGHT_ERROR[name] and report.update_rel_error > 0
        assert report.logits_max_diff > 0


def test_original_weights_from_a_safetensors_file_or_directory(tmp_path: Path) -> None:
    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    expected, _ = merged_quantized_state_dict(adapted(NF4), "original", original=base, report=None)
    for where in (tmp_path / "base", tmp_path / "base" / "model.safetensors", str(tmp_path / "base")):
        state, report = merged_quantized_state_dict(adapted(NF4), "original", original=where, report=None)
        assert report.weight_max_error == 0
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(MergeError, match="does not exist"):
        merged_quantized_state_dict(adapted(NF4), "original", original=tmp_path / "nowhere", report=None)
    with pytest.raises(MergeError, match="holds no .safetensors"):
        merged_quantized_state_dict(adapted(NF4), "original", original=tmp_path, report=None)


@pytest.mark.parametrize("name", FORMATS)
def test_export_merged_for_each_target_reloads_to_the_merged_model(tmp_path: Path, name: str) -> None:
    from transformers import LlamaForCausalLM

    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    sizes = {}
    for target in TARGETS:
        reference = adapted(FORMATS[name])
        merge_quantized(reference, target, original=base, report=None)
        expected = reference(TOKENS).logits
        model, reports = adapted(FORMATS[name]), []
        directory = ll.export_merged(model, tmp_path / target, merge_target=target, original=tmp_path / "base",
                                     report=reports.append, probe=TOKENS)
        assert len(reports) == 1 and reports[0].target == target and len(quantized_layers(model)) == 14
        assert reports[0].logits_max_diff == pytest.approx((model(TOKENS).logits - expected).abs().max().item(),
                                                           rel=1e-3, abs=1e-6)
        if target == "requantized":
            assert not (directory / "model.safetensors").exists(), "transformers must not take it for its own"
            loaded = ll.load_quantized(directory)  # the architecture from its config.json
            assert isinstance(loaded.model.layers[0].mlp.up_proj, FrozenQuantizedLinear)
        else:
            loaded = LlamaForCausalLM.from_pretrained(directory)
        torch.testing.assert_close(loaded(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
        sizes[target] = file_size(directory)
    # the requantized export is the small one: its quantized weights take a fraction of their float32 bytes (the tiny
    # model's embeddings and norms, and the file's header, are the same in all three)
    assert sizes["requantized"] < sizes["dequantized"] == sizes["original"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "requantized" / "quantized_model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys() if "::" in k)
    dense = sum(4 * layer.weight.numel() for layer in ll.adapters(adapted()).values())
    assert stored < {"nf4": 0.2, "int4": 0.3, "int8": 0.3}[name] * dense, (stored, dense)


def test_load_quantized_into_a_given_model_and_its_errors(tmp_path: Path) -> None:
    model = adapted(NF4)
    ll.export_merged(model, tmp_path / "merged", merge_target="requantized", report=None)
    loaded = ll.load_quantized(tmp_path / "merged", model=make_llama())
    reference = adapted(NF4)
    merge_quantized(reference, "requantized", report=None)
    torch.testing.assert_close(loaded(TOKENS).logits, reference(TOKENS).logits, rtol=0, atol=0)
    plain = tmp_path / "plain"
    ll.export_merged(adapted(NF4), plain, report=None)
    with pytest.raises(FileNotFoundError, match="quantized_model.safetensors does not exist: load_quantized reads"):
        ll.load_quantized(plain)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(**{**make_llama().config.to_dict(), "intermediate_size": 96}))
    with pytest.raises(ValueError, match="does not fit"):
        ll.load_quantized(tmp_path / "merged", model=other)


def test_merge_target_errors_leave_the_model_unchanged(tmp_path: Path) -> None:
    model = adapted(NF4)
    with pytest.raises(MergeError, match="Unknown merge target 'fused'"):
        merged_quantized_state_dict(model, "fused")
    with pytest.raises(MergeError, match="needs original="):
        ll.export_merged(model, tmp_path / "m", merge_target="original")
    with pytest.raises(MergeError, match="has no quantized weight"):
        ll.export_merged(adapted(), tmp_path / "m", merge_target="requantized")
    assert len(quantized_layers(model)) == 14 and not (tmp_path / "m").exists()
    with pytest.raises(ConfigError, match="go together"):
        ll.LoRACallback(quantize="nf4", merge_target="original")
    with pytest.raises(ConfigError, match="set quantize="):
        ll.LoRACallback(merge_target="requantized")
    with pytest.raises(ConfigError, match="use one of"):
        ll.LoRACallback(quantize="nf4", merge_target="fused")


def test_callback_fit_end_export_requantized_and_original(tmp_path: Path, caplog) -> None:
    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    options = {"format": "nf4", "block_size": 32, "scaler_block_size": 8}
    for target in ("requantized", "original"):
        module = TinyLlamaModule(lr=2e-2)
        callback = ll.LoRACallback(r=4, quantize=options, export_dir=str(tmp_path / target), merge_target=target,
                                   original_weights=str(tmp_path / "base") if target == "original" else None)
        with caplog.at_level("INFO"):
            trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2).fit(module, CountingTokens())
        assert callback.merge_report.target == target and callback.merge_report.layers == 14
        assert str(callback.merge_report) in caplog.text  # the fit-end message shows the report
        # measured on the first training example: the output change of this merge, as the trained model computes it
        probe = callback._probe
        assert probe.shape[0] == 1 and callback.merge_report.logits_max_diff is not None
        assert "probe output change" in str(callback.merge_report)
        module.model.eval()
        reference = module.model
        expected_state, _ = merged_quantized_state_dict(reference, target, original=tmp_path / "base", report=None)
        if target == "requantized":
            loaded = ll.load_quantized(callback.merged_dir)
            assert is_quantized(loaded.model.layers[1].self_attn.o_proj.weight)
        else:
            from transformers import LlamaForCausalLM

            loaded = LlamaForCausalLM.from_pretrained(callback.merged_dir)
        for key, value in expected_state.items():
            torch.testing.assert_close(dequantize(loaded.state_dict()[key]), dequantize(value), rtol=0, atol=0)


def test_probe_from_a_batch_keeps_what_the_model_takes() -> None:
    """The callback's probe: the first example, only the keys the model's forward names; other batch forms give none,
    and a probe the model cannot run alone is reported, not raised."""
    from lightning_lora.quantize_merge import probe_error, probe_from_batch

    model = make_llama()
    ids = torch.randint(3, 60, (3, 8))
    probe = probe_from_batch(model, {"input_ids": ids, "labels": ids, "task": ["a", "b", "c"], "extra": ids})
    assert set(probe) == {"input_ids", "labels"} and probe["input_ids"].shape == (1, 8)
    assert probe_from_batch(model, ids).shape == (1, 8)
    assert probe_from_batch(model, (ids, ids)) is None
    assert probe_error(model, probe) is None
    assert "Error" in probe_error(model, torch.zeros(1, 8))  # float ids: the embedding refuses them


def test_dequantized_merge_into_bfloat16_reports_its_rounding() -> None:
    """A merge into a narrower dtype than the exact float result: the report shows the rounding (nonzero, below
    bfloat16's relative step) and no output comparison without a probe."""
    half = merge_quantized(adapted(NF4), "dequantized", dtype=torch.bfloat16, report=None)
    assert 0 < half.weight_rel_error < 2 ** -8 and half.logits_max_diff is None
