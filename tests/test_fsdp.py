"""FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` per decoder layer) with 2 CPU processes (gloo).

The adapter after 8 steps equals one process's on the same global batch (rtol 1e-4, atol 1e-5, as for DDP: the
two differ only in the order float32 gradients are summed); checkpoints hold adapter tensors only, in one file that
one process resumes; the adapter export is written once, complete, by rank zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_train.py")
TOL = dict(rtol=1e-4, atol=1e-5)


def train(out: Path, devices: int, batch_size: int, *args: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", str(devices), "--batch-size", str(batch_size), "--out", str(out),
         *args], capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("one")
    return out, train(out, 1, 8)


@pytest.mark.parametrize("adapters", ["sharded", "replicated"])
def test_fsdp2_matches_one_process_and_resumes_on_one(tmp_path: Path, single, adapters: str) -> None:
    one_dir, one = single
    two = train(tmp_path / "two", 2, 4, "--strategy", "fsdp2", "--adapters", adapters)
    assert two.keys() == one.keys() and len(one) == 8
    for key in one:
        torch.testing.assert_close(two[key], one[key], **TOL, msg=key)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if "lora_B" in k)
    step4 = load_file(tmp_path / "two" / "step-4" / "adapter" / "adapter_model.safetensors")  # exported at a checkpoint
    torch.testing.assert_close(step4, load_file(one_dir / "step-4" / "adapter" / "adapter_model.safetensors"), **TOL)

    ckpt = next((tmp_path / "two" / "ckpt").glob("*step=4.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    expected = torch.load(next((one_dir / "ckpt").glob("*step=4.ckpt")), weights_only=True)
    assert saved["state_dict"].keys() == expected["state_dict"].keys()  # the adapter only, one process's key names
    assert all(type(v) is torch.Tensor for v in saved["state_dict"].values())  # whole tensors, not DTensor shards
    torch.testing.assert_close(saved["state_dict"], expected["state_dict"], **TOL)
    assert len(saved["optimizer_states"][0]["state"]) == 8  # Adam's state of the adapter only, as one process's
    torch.testing.assert_close(saved["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"], **TOL)
    if adapters == "sharded":
        # saved at world size 2, resumed at world size 1 (plain strategy): the same adapter as the run never stopped
        resumed = train(tmp_path / "resumed", 1, 8, "--resume", str(ckpt))
        for key in one:
            torch.testing.assert_close(resumed[key], one[key], **TOL, msg=key)


def test_fsdp2_refusals_name_the_fix(tmp_path: Path) -> None:
    """Tensor parallelism, and a model that does not exist before configure_model, are refused in setup, with the
    model untouched."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    import lightning_lora as ll
    from tiny_modules import ConfigureModelLlama, TinyLlamaModule

    def setup(module: pl.LightningModule, **sizes: int) -> None:
        strategy = ModelParallelStrategy(**sizes)
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, default_root_dir=tmp_path)
        ll.LoRACallback(r=4, target_modules=["q_proj"], export_merged=False).setup(trainer, module, "fit")

    module = TinyLlamaModule()
    with pytest.raises(ll.ConfigError, match=r"tensor_parallel_size=2.*ModelParallelStrategy\(data_parallel_size=1, "
                                             r"tensor_parallel_size=1\)"):
        setup(module, data_parallel_size=1, tensor_parallel_size=2)
    assert not ll.adapters(module.model)
    with pytest.raises(ll.ConfigError, match="build it in __init__ and shard it in configure_model"):
        setup(ConfigureModelLlama(), data_parallel_size=1, tensor_parallel_size=1)
