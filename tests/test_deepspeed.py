"""DeepSpeed ZeRO (Lightning's ``DeepSpeedStrategy``, stages 2 and 3) with 2 CPU processes (gloo; see
``deepspeed_train.py`` for the three CUDA-only steps of Lightning 2.6.6 it replaces).

The adapter after 8 steps equals one process's on the same global batch (rtol 1e-4, atol 1e-5, as for DDP and FSDP2:
the runs differ only in the order float32 gradients are summed); ZeRO-3 partitions every tensor (adapters too) and
only the adapter reaches ZeRO's optimizer; checkpoints hold whole adapter tensors and Adam state in one process's
layout (not ZeRO-3's empty placeholders, peft #2892), in one file that one process resumes and ZeRO resumes from one
process's; the adapter and merged exports (the merged one gathering one base tensor at a time) are written once,
complete, by rank zero.
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

from lightning_lora.sharded_export import read_merged  # noqa: E402

SCRIPT = Path(__file__).with_name("deepspeed_train.py")
TOL = dict(rtol=1e-4, atol=1e-5)


def train(out: Path, devices: int, batch_size: int, *args: str) -> dict[str, torch.Tensor]:
    """``deepspeed_train.py``: 2 processes through Lightning's launcher, one process here (no process start)."""
    argv = ["--devices", str(devices), "--batch-size", str(batch_size), "--out", str(out), *args]
    if devices == 1:
        import deepspeed_train

        deepspeed_train.main(argv)
    else:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300,
                                env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return load_file(out / "adapter" / "adapter_model.safetensors")


def checkpoint(run: Path, step: int) -> dict:
    return torch.load(next((run / "ckpt").glob(f"*step={step}.ckpt")), weights_only=True)


def test_zero3_and_zero2_match_one_process_and_resume_across_world_sizes(tmp_path: Path) -> None:
    """ZeRO-3 from scratch against one process (adapter, checkpoints, exports); one process resumes ZeRO-3's
    checkpoint; ZeRO-2 resumes one process's checkpoint. All three end at one process's adapter."""
    one_dir, zero3_dir = tmp_path / "one", tmp_path / "zero3"
    one = train(one_dir, 1, 8, "--export-merged")
    zero3 = train(zero3_dir, 2, 4, "--stage", "3", "--export-merged")
    assert zero3.keys() == one.keys() and len(one) == 8
    for key in one:
        torch.testing.assert_close(zero3[key], one[key], **TOL, msg=key)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if "lora_B" in k)

    facts = json.loads((zero3_dir / "facts.json").read_text())
    assert facts["partitioned"] == facts["params"]  # ZeRO-3 partitioned every tensor, the frozen base included
    assert facts["adapter_numel"] <= 2 * facts["optimizer_numel"] <= facts["adapter_numel"] + 64  # adapter only

    saved, expected = checkpoint(zero3_dir, 4), checkpoint(one_dir, 4)
    assert saved["state_dict"].keys() == expected["state_dict"].keys()  # the adapter only, one process's key names
    torch.testing.assert_close(saved["state_dict"], expected["state_dict"], **TOL)  # whole, not empty placeholders
    assert len(saved["optimizer_states"][0]["state"]) == len(one)
    torch.testing.assert_close(saved["optimizer_states"][0], expected["optimizer_states"][0], **TOL)
    for step in (4, 8):  # exported at each checkpoint, by rank zero, after every rank gathered
        torch.testing.assert_close(load_file(zero3_dir / f"step-{step}" / "adapter" / "adapter_model.safetensors"),
                                   load_file(one_dir / f"step-{step}" / "adapter" / "adapter_model.safetensors"), **TOL)
    merged, expected_merged = read_merged(zero3_dir / "merged"), read_merged(one_dir / "merged")
    assert merged.keys() == expected_merged.keys()
    torch.testing.assert_close(merged, expected_merged, **TOL)

    resumed = train(tmp_path / "resumed1", 1, 8, "--resume", str(next((zero3_dir / "ckpt").glob("*step=4.ckpt"))))
    resumed2 = train(tmp_path / "resumed2", 2, 4, "--stage", "2",
                     "--resume", str(next((one_dir / "ckpt").glob("*step=4.ckpt"))))
    for key in one:
        torch.testing.assert_close(resumed[key], one[key], **TOL, msg=key)
        torch.testing.assert_close(resumed2[key], one[key], **TOL, msg=key)
    facts = json.loads((tmp_path / "resumed2" / "facts.json").read_text())
    assert facts["partitioned"] == 0 and 2 * facts["optimizer_numel"] >= facts["adapter_numel"]


def test_dora_with_loraplus_under_zero3_matches_one_process(tmp_path: Path) -> None:
    """DoRA's magnitude is partitioned too, and its weight norm reads the partitioned base inside the layer's forward;
    LoRA+ splits the optimizer's groups before ZeRO flattens them (B and the magnitude at 4x): 4 steps against one
    process, adapter, Adam state and merged export."""
    options = ("--method", "dora", "--loraplus", "4", "--max-steps", "4", "--export-merged")
    one = train(tmp_path / "one", 1, 8, *options)
    zero3 = train(tmp_path / "zero3", 2, 4, "--stage", "3", *options)
    assert zero3.keys() == one.keys() and len(one) == 12
    for key in one:
        torch.testing.assert_close(zero3[key], one[key], **TOL, msg=key)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if "lora_B" in k)
    torch.testing.assert_close(read_merged(tmp_path / "zero3" / "merged"), read_merged(tmp_path / "one" / "merged"),
                               **TOL)
    saved, expected = checkpoint(tmp_path / "zero3", 4)["optimizer_states"][0], checkpoint(tmp_path / "one", 4)[
        "optimizer_states"][0]
    assert [g["lr"] for g in saved["param_groups"]] == [g["lr"] for g in expected["param_groups"]] == [1e-2, 4e-2]
    torch.testing.assert_close(saved, expected, **TOL)


def test_deepspeed_refusals_name_the_fix(tmp_path: Path) -> None:
    """What is not supported under DeepSpeed is refused in setup, naming the fix, with the model untouched."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DeepSpeedStrategy

    import lightning_lora as ll
    from tiny_modules import ConfigureModelLlama, TinyLlamaModule

    def setup(module: pl.LightningModule, stage: int = 3, method: str = "lora", **options) -> None:
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=DeepSpeedStrategy(stage=stage), logger=False,
                             default_root_dir=tmp_path)
        ll.LoRACallback(method, r=4, target_modules=["q_proj"], export_merged=False, **options).setup(
            trainer, module, "fit")

    module = TinyLlamaModule()
    cases = [
        (dict(method="loha"), r"supports lora, dora with one adapter.*not loha yet.*strategy='ddp'"),
        (dict(stage=1), r"ZeRO stages 2 and 3.*deepspeed_stage_2.*not stage 1"),
        (dict(compile=True), r"compile=.*not tested under ZeRO.*strategy='ddp'"),
    ]
    for options, message in cases:
        with pytest.raises(ll.ConfigError, match=message):
            setup(module, **options)
        assert not ll.adapters(module.model)
    with pytest.raises(ll.ConfigError, match=r"deepspeed.zero.Init.*build the model in __init__.*deepspeed_stage_2"):
        setup(ConfigureModelLlama())
