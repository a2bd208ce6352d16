"""LoRACallback works with both Lightning packages, ``pytorch_lightning`` and ``lightning.pytorch``, installed together
or alone: one class whose bases are the Callback classes of whichever packages import."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lightning_lora as ll
from conftest import VOCAB, make_llama

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def fit(package: str, root: Path) -> tuple[object, object]:
    """A real fit of a tiny Llama with ``package``'s Trainer and LightningModule; returns (trainer, callback)."""
    L = importlib.import_module(package)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_llama().train()

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    callback = ll.LoRACallback(r=2, target_modules=["q_proj"], export_dir=str(root / "export"))
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=[callback, checkpoint])
    tokens = list(torch.randint(3, VOCAB, (12, 10), generator=torch.Generator().manual_seed(0)))
    trainer.fit(Module(), torch.utils.data.DataLoader(tokens, batch_size=4))
    return trainer, callback


@pytest.mark.parametrize("package", PACKAGES)
def test_fit_with_each_trainer(package: str, tmp_path: Path) -> None:
    pytest.importorskip(package)
    trainer, callback = fit(package, tmp_path)
    assert trainer.global_step == 3
    assert (callback.adapter_dir / "adapter_model.safetensors").is_file()
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert all(".lora_" in key for key in saved["state_dict"]), "the checkpoint holds only the adapter"
    lora_b = [p for n, p in callback.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


ALONE = """
import sys
sys.modules[{blocked!r}] = None  # as if that package were not installed
sys.path.insert(0, {tests!r})
from pathlib import Path
import lightning_lora as ll
from lightning_lora.callbacks import _lightning
assert [p.__name__ for p in _lightning.PACKAGES] == [{package!r}], _lightning.PACKAGES
from test_namespaces import fit
trainer, callback = fit({package!r}, Path({root!r}))
assert trainer.global_step == 3
print("ok")
"""


@pytest.mark.parametrize("package, blocked", [("pytorch_lightning", "lightning"),
                                              ("lightning.pytorch", "pytorch_lightning")])
def test_fit_with_one_package_alone(package: str, blocked: str, tmp_path: Path) -> None:
    pytest.importorskip(package)
    code = ALONE.format(blocked=blocked, package=package, tests=str(Path(__file__).parent), root=str(tmp_path))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=120, env=env, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
