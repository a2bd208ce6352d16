"""Two DDP processes on CPU (gloo) train the same adapters as one process on the same global batch, without
``find_unused_parameters``: only adapter parameters reach DDP's reducer. Every method of the registry: LoRA alone,
every weight-update method at once as named adapters (VeRA's shared projections, AdaLoRA's rank allocation after each
step and HRA's regularizer included), each inserted-module method in its own model (``ddp_train.RUNS``), and
per-example adapters (``adapter_key``) where each rank's batch trains one of them; one launch of the processes trains
them all, one after another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_train.py")
TOL = dict(rtol=1e-4, atol=1e-5)  # float32; the two differ only in the order gradients are summed


def train(out: Path, devices: int, batch_size: int, *args: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", str(devices), "--batch-size", str(batch_size), "--out", str(out),
         *args], capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return load_file(out / "adapter" / "adapter_model.safetensors") if (out / "adapter").is_dir() else {}


def assert_same_files(got: Path, expected: Path) -> int:
    """Every safetensors file under ``expected`` (adapter exports, their named sub-folders, step exports, merged
    models) is under ``got`` with the same tensors; returns how many files."""
    files = sorted(p.relative_to(expected) for p in expected.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(got) for p in got.rglob("*.safetensors"))
    for name in files:
        one, two = load_file(expected / name), load_file(got / name)
        assert one.keys() == two.keys(), name
        for key in one:
            torch.testing.assert_close(two[key], one[key], **TOL, msg=f"{name}: {key}")
    return len(files)


def test_two_processes_match_one_on_the_same_global_batch(tmp_path: Path) -> None:
    from ddp_train import ROUTED, RUNS, WEIGHT_UPDATES

    runs = json.dumps({"lora": {}, **RUNS, "routed": ROUTED})
    train(tmp_path / "one", 1, 8, "--runs", runs)
    train(tmp_path / "two", 2, 4, "--runs", runs)
    single, ddp = (load_file(tmp_path / run / "lora" / "adapter" / "adapter_model.safetensors") for run in ("one", "two"))
    assert single.keys() == ddp.keys() and len(single) == 8
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in single.items() if "lora_B" in k)
    # rank zero exported at each checkpoint, without a collective the other rank would miss
    for run in ["lora", *RUNS, "routed"]:
        assert assert_same_files(tmp_path / "two" / run, tmp_path / "one" / run) >= 3, run  # adapter, step-4, step-8
    assert sorted(p.name for p in (tmp_path / "two" / "weight_updates" / "adapter").iterdir() if p.is_dir()) == sorted(
        WEIGHT_UPDATES)
    adalora = json.loads((tmp_path / "two" / "weight_updates" / "adapter" / "adalora" / "adapter_config.json").read_text())
    assert sum(sum(kept) for kept in adalora["rank_pattern"].values()) == 4  # the budget shrank to target_r per layer
    last = torch.load(tmp_path / "two" / "lora" / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and len(last["state_dict"]) == 8
    assert all(".lora_" in key for key in last["state_dict"])  # the adapter only


def test_steps_without_an_adapter_gradient_under_ddp_need_find_unused_parameters(tmp_path: Path) -> None:
    """A rank whose batch holds no example of an adapter gives it no gradient, which plain DDP stops the fit for
    (shown by the routed run above, where it passes with find_unused_parameters): refused in setup, model untouched."""
    import pytest
    import pytorch_lightning as pl

    import lightning_lora as ll
    from tiny_modules import TinyLlamaModule

    module = TinyLlamaModule()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False, default_root_dir=tmp_path)
    callback = ll.LoRACallback(adapters={"a": {"r": 4, "target_modules": ["q_proj"]}, "b": {"method": "loha", "r": 4}},
                               adapter_key="task")
    with pytest.raises(ll.ConfigError, match="under DDP: adapter_key='task': a rank's batch may hold no example.*"
                                             "strategy='ddp_find_unused_parameters_true'"):
        callback.setup(trainer, module, "fit")
    assert not ll.adapters(module.model)
    # LoHa/LoKr's module dropout skips a layer's whole update in some steps: the same, named by adapter
    with pytest.raises(ll.ConfigError, match="b's module_dropout skips its whole update.*find_unused_parameters_true"):
        ll.LoRACallback(adapters={"a": {"r": 4, "target_modules": ["q_proj"]},
                                  "b": {"method": "lokr", "r": 4, "module_dropout": 0.1}}).setup(trainer, module, "fit")
    assert not ll.adapters(module.model)
    callback.setup(trainer, module, "validate")  # no backward, nothing to refuse
