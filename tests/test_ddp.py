"""Two DDP processes on CPU (gloo) train the same adapter as one process on the same global batch, without
``find_unused_parameters``: only adapter parameters reach DDP's reducer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_train.py")


def train(out: Path, devices: int, batch_size: int) -> dict[str, torch.Tensor]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", str(devices), "--batch-size", str(batch_size), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_two_processes_match_one_on_the_same_global_batch(tmp_path: Path) -> None:
    single = train(tmp_path / "one", devices=1, batch_size=8)
    ddp = train(tmp_path / "two", devices=2, batch_size=4)
    assert single.keys() == ddp.keys() and len(single) == 8
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in single.items() if "lora_B" in k)
    for step in (4, 8):  # rank zero exported at each checkpoint, without a collective the other rank would miss
        exported = [load_file(tmp_path / run / f"step-{step}" / "adapter" / "adapter_model.safetensors")
                    for run in ("two", "one")]
        torch.testing.assert_close(*exported, rtol=1e-4, atol=1e-5)
    last = torch.load(tmp_path / "two" / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and len(last["state_dict"]) == 8
    assert all(".lora_" in key for key in last["state_dict"])  # the adapter only
