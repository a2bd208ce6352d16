"""``LoRACallback`` on a plain ``nn.Module``: no transformers, targets named explicitly, merged state dict exported.

A frozen random MLP (the "pretrained" base) is adapted to a teacher that differs from it by a rank-2 change in its
hidden layer, which a rank-4 LoRA can represent exactly. After ``fit`` the callback has written
``merged/model.safetensors`` (a state dict with the update folded in); it loads into a fresh, adapter-free ``MLP``
that reproduces the trained model. Run with ``python -m examples.plain_module [--export-dir DIR] [--steps N]``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRACallback


class MLP(nn.Module):
    """The base model: nothing Lightning or adapter specific about it."""

    def __init__(self, features: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(torch.relu(self.inp(x)))))


class Regression(pl.LightningModule):
    """Mean-squared-error regression around any module ``net``; the optimizer sees only what still trains."""

    def __init__(self, net: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def teacher_data(base: MLP, samples: int = 2048, seed: int = 0) -> TensorDataset:
    """Inputs and targets of ``base`` with a rank-2 change added to its hidden layer: the task LoRA must learn."""
    g = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        u, v = torch.randn(64, 2, generator=g), torch.randn(2, 64, generator=g)
        teacher.hidden.weight += 0.3 * (u @ v) / 8
        x = torch.randn(samples, 16, generator=g)
        return TensorDataset(x, teacher(x))


def main(export_dir: str | None = None, steps: int = 300) -> dict[str, float]:
    """Train, export, reload the merged state dict into a plain ``MLP`` and return the numbers it printed."""
    pl.seed_everything(0)
    base = MLP()
    data = teacher_data(base)
    module = Regression(base)
    x, y = data.tensors
    with torch.no_grad():
        loss_before = float(nn.functional.mse_loss(base(x), y))
    export_dir = export_dir or tempfile.mkdtemp(prefix="plain_module_")
    # model_attr="net": the state dict is the MLP's own (keys "hidden.weight", ...), not the LightningModule's.
    lora = LoRACallback(r=4, alpha=8, target_modules=["inp", "hidden"], model_attr="net", export_dir=export_dir)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=[lora], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, default_root_dir=export_dir)
    trainer.fit(module, DataLoader(data, batch_size=64, shuffle=True))

    merged = MLP()
    merged.load_state_dict(load_file(str(lora.merged_dir / "model.safetensors")))  # strict: exactly the MLP's keys
    with torch.no_grad():
        trained_out = module.net(x)
        loss_after = float(nn.functional.mse_loss(trained_out, y))
        diff = float((merged(x) - trained_out).abs().max())
    print(f"mse {loss_before:.5f} -> {loss_after:.5f}; merged state dict {lora.merged_dir / 'model.safetensors'} "
          f"reloads into a plain MLP with max |diff| {diff:.2e}; adapter in {lora.adapter_dir}")
    if diff > 1e-5:
        raise RuntimeError(f"The merged export disagrees with the trained model by {diff:.2e}.")
    return {"loss_before": loss_before, "loss_after": loss_after, "max_abs_diff": diff}


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--export-dir", default=None, help="where adapter/ and merged/ go (default: a new temp dir)")
    cli.add_argument("--steps", type=int, default=300)
    main(**vars(cli.parse_args()))
