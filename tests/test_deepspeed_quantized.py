"""A quantized base (QLoRA) under DeepSpeed ZeRO-2/3 with 2 CPU processes (gloo), against one process on the same
global batch (``deepspeed_train.py``; see ``test_deepspeed.py``).

The quantized weights are kept out of DeepSpeed's parameters (``lightning_lora.deepspeed_quantized``), whole on every
rank, rank zero's broadcast to the others: each run starts rank one from another base (``--perturb-other-ranks``),
so an unbroadcast base would train another adapter. ZeRO partitions the adapter. Checked: the adapter (rtol 1e-4,
atol 1e-5, as for the float base), checkpoints without any base tensor in one process's layout, the merged export
(dequantized, merged in float32, written by rank zero) and one process resuming ZeRO-3's checkpoint; ZeRO's
bf16-mixed over NF4 stays within bf16 rounding of the float32 run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytest.importorskip("torchao")

import lightning_lora as ll  # noqa: E402
from lightning_lora.deepspeed_quantized import (  # noqa: E402
    hidden_quantized,
    hide_quantized,
    restore_quantized,
    visible_quantized,
)
from lightning_lora.quantize import quantized_weight_names  # noqa: E402
from lightning_lora.sharded_export import read_merged  # noqa: E402

SCRIPT = Path(__file__).with_name("deepspeed_train.py")
TOL = dict(rtol=1e-4, atol=1e-5)
NF4 = {"format": "nf4", "block_size": 16, "scaler_block_size": 4}  # block sizes that divide the tiny weights
# per run: the ZeRO stage of the 2-process launch, and what it trains
RUNS = {
    "nf4_zero3": {"stage": 3, "options": {"quantize": NF4}, "export_merged": True},
    "nf4_zero2": {"stage": 2, "method": "dora", "max_steps": 4, "export_merged": True,
                  "options": {"quantize": {**NF4, "modules": "all-linear"}}},  # QDoRA; frozen layers quantized too
    "int8_zero3": {"stage": 3, "max_steps": 4, "options": {"quantize": "int8"}},
    "int4_zero2": {"stage": 2, "max_steps": 4, "options": {"quantize": {"format": "int4", "group_size": 16}}},
}
# ZeRO's bf16 mode (params and activations in bf16, float32 masters) over NF4: against nf4_zero3's float32 step 4
BF16 = {"nf4_zero3_bf16": {**RUNS["nf4_zero3"], "precision": "bf16-mixed", "max_steps": 4, "export_merged": False}}


def launch(out: Path, devices: int, runs: dict) -> None:
    """``deepspeed_train.py --runs``: 2 processes through Lightning's launcher, or one process here."""
    argv = ["--devices", str(devices), "--batch-size", str(8 // devices), "--out", str(out), "--runs", json.dumps(runs)]
    if devices == 1:
        import deepspeed_train

        deepspeed_train.main(argv)
        return
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, str(SCRIPT), *argv, "--perturb-other-ranks"], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def step_checkpoint(run: Path, step: int) -> Path:
    return next((run / "ckpt").glob(f"*step={step}.ckpt"))


def test_quantized_base_under_zero_matches_one_process(tmp_path: Path) -> None:
    """NF4 under ZeRO-3 (LoRA, 8 steps) and ZeRO-2 (QDoRA over an all-linear NF4 base), int8 and packed int4: each
    adapter equals one process's; checkpoints and exports as one process writes them; one process resumes ZeRO-3."""
    one_dir, zero_dir = tmp_path / "one", tmp_path / "zero"
    launch(one_dir, 1, {name: {k: v for k, v in run.items() if k != "stage"} for name, run in RUNS.items()})
    launch(zero_dir, 2, {**RUNS, **BF16})
    for name in RUNS:
        one, zero = adapter(one_dir / name), adapter(zero_dir / name)
        assert zero.keys() == one.keys() and len(one) >= 8, name
        assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if "lora_B" in k), name
        torch.testing.assert_close(zero, one, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        facts = json.loads((zero_dir / name / "facts.json").read_text())
        # ZeRO sees float parameters only (the quantized weights are no parameter); stage 3 partitions all of them
        assert facts["partitioned"] == (facts["params"] if RUNS[name]["stage"] == 3 else 0), (name, facts)
        assert facts["adapter_numel"] <= 2 * facts["optimizer_numel"] <= facts["adapter_numel"] + 64, (name, facts)

        saved = torch.load(step_checkpoint(zero_dir / name, 4), weights_only=True)
        expected = torch.load(step_checkpoint(one_dir / name, 4), weights_only=True)
        assert saved["state_dict"].keys() == expected["state_dict"].keys(), name  # the adapter only
        assert all(type(v) is torch.Tensor and "adapters." in k for k, v in saved["state_dict"].items()), name
        torch.testing.assert_close(saved["state_dict"], expected["state_dict"], **TOL)
        torch.testing.assert_close(saved["optimizer_states"][0], expected["optimizer_states"][0], **TOL)
        torch.testing.assert_close(adapter(zero_dir / name / "step-4"), adapter(one_dir / name / "step-4"), **TOL)
        if RUNS[name].get("export_merged"):  # every base weight dequantized and merged in float32, by rank zero
            merged, expected_merged = read_merged(zero_dir / name / "merged"), read_merged(one_dir / name / "merged")
            assert merged.keys() == expected_merged.keys(), name
            torch.testing.assert_close(merged, expected_merged, **TOL, msg=lambda m, name=name: f"{name}: {m}")

    bf16, float32 = adapter(zero_dir / "nf4_zero3_bf16"), adapter(one_dir / "nf4_zero3" / "step-4")
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the float32 masters, exported
    torch.testing.assert_close(bf16, float32, rtol=0, atol=2e-2)  # bf16 rounding (7e-3 seen), B about 4e-2

    # one process resumes ZeRO-3's step-4 checkpoint (it holds no base: the base is quantized anew) and ends where
    # one process ends
    launch(tmp_path / "resumed", 1, {"nf4_zero3": {"options": {"quantize": NF4},
                                                   "resume": str(step_checkpoint(zero_dir / "nf4_zero3", 4))}})
    torch.testing.assert_close(adapter(tmp_path / "resumed" / "nf4_zero3"), adapter(one_dir / "nf4_zero3"), **TOL)


def test_hidden_quantized_weights_train_and_export_as_parameters() -> None:
    """What the callback does around DeepSpeed, in one process: the quantized weights leave the parameters (and the
    state dict), the model computes the same, a move keeps them, an export sees them, and they come back."""
    from conftest import make_llama

    torch.manual_seed(0)
    model = make_llama()
    ll.inject(model, {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": False})
    ll.quantize_base(model, {**NF4, "modules": "all-linear"})
    names = quantized_weight_names(model)
    tokens = torch.randint(3, 64, (2, 8))
    before = model(tokens).logits
    keys = set(model.state_dict())

    assert hide_quantized(model, "cpu") == len(names) > 4  # adapted and frozen (all-linear) layers
    assert [name for name, _ in hidden_quantized(model)] == names
    assert not quantized_weight_names(model) and not set(names) & set(model.state_dict())
    model.to("cpu")  # DeepSpeed moves the module: hidden weights stay where they are
    torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=0)
    with visible_quantized(model):
        assert set(model.state_dict()) == keys and quantized_weight_names(model) == names
    assert not quantized_weight_names(model)
    assert restore_quantized(model) == len(names)
    assert quantized_weight_names(model) == names and set(model.state_dict()) == keys


def test_quantized_deepspeed_refusals_name_the_fix(tmp_path: Path) -> None:
    """The QuantizedPrecision plugin (it would replace DeepSpeed's precision plugin, whose backward and step run the
    engine) and a merge target the ZeRO export does not write are refused in setup, with the model untouched."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DeepSpeedStrategy

    from tiny_modules import TinyLlamaModule

    module = TinyLlamaModule()
    cases = [
        ({"plugins": [ll.QuantizedPrecision("nf4")]}, {},
         r"QuantizedPrecision.*DeepSpeedPrecision.*LoRACallback\(quantize='nf4'\)"),
        ({}, {"quantize": "nf4", "merge_target": "requantized"}, r"merge_target='requantized'.*'dequantized'"),
    ]
    for trainer_options, options, message in cases:
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=DeepSpeedStrategy(stage=2), logger=False,
                             default_root_dir=tmp_path, **trainer_options)
        with pytest.raises(ll.ConfigError, match=message):
            ll.LoRACallback(r=4, target_modules=["q_proj"], **options).setup(trainer, module, "fit")
        assert not ll.adapters(module.model)
