"""Pins the Lightning hook order the callback relies on (DESIGN.md's lifecycle); fails if a Lightning upgrade changes it."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

import lightning_lora as ll
from tiny_modules import ConfigureModelLlama, TinyLlamaModule, TokensDataModule


def recorder_module(base: type) -> type:
    """A subclass of ``base`` that records its hooks and what the model looked like at each."""

    class Recording(base):
        def __init__(self, events: list) -> None:
            super().__init__()
            self.events = events

        def _has_adapters(self) -> bool:
            return self.model is not None and bool(ll.adapters(self.model))

        def setup(self, stage: str) -> None:
            self.events.append(("module.setup", self._has_adapters()))

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            self.events.append(("module.on_load_checkpoint", self._has_adapters()))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            trainable = {id(p) for p in self.parameters() if p.requires_grad}
            only_adapter = trainable == {id(p) for p in ll.surgery.adapter_parameters(self.model)}
            self.events.append(("module.configure_optimizers", only_adapter))
            return super().configure_optimizers()

    if base is ConfigureModelLlama:
        def configure_model(self) -> None:
            base.configure_model(self)
            self.events.append(("module.configure_model", self._has_adapters()))

        Recording.configure_model = configure_model
    return Recording


class RecordingCallback(Callback):
    def __init__(self, events: list) -> None:
        self.events = events

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.events.append(("callback.setup", None))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.events.append(("callback.on_load_checkpoint", None))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events.append(("callback.on_fit_start", None))


class RecordingPrecision(pl.plugins.precision.Precision):
    """Lightning's default precision, recording when it converts the module (true-half precisions cast it there)."""

    def __init__(self, events: list) -> None:
        self.events = events

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        self.events.append(("precision.convert_module", bool(ll.adapters(module.model))))
        return super().convert_module(module)


def run(tmp_path: Path, base: type, ckpt_path: str | None) -> list:
    events: list = []
    module = recorder_module(base)(events)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1 if ckpt_path is None else 2, default_root_dir=tmp_path,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ll.LoRACallback(r=2, target_modules=["q_proj"]), RecordingCallback(events),
                                    checkpoint],
                         plugins=[RecordingPrecision(events)])
    trainer.fit(module, TokensDataModule(count=8), ckpt_path=ckpt_path)
    return events


def test_hook_order_for_a_model_built_in_init(tmp_path: Path) -> None:
    run(tmp_path, TinyLlamaModule, None)
    assert run(tmp_path, TinyLlamaModule, "last") == [
        ("callback.setup", None),             # LoRACallback.setup ran just before: adapters exist from here on
        ("module.setup", True),
        ("module.on_load_checkpoint", True),  # the restore sees the adapted model
        ("callback.on_load_checkpoint", None),
        ("precision.convert_module", True),   # a true-half cast, after which the callback puts adapters back to fp32
        ("module.configure_optimizers", True),  # only adapter parameters are trainable when optimizers are built
        ("callback.on_fit_start", None),
    ]


def test_hook_order_for_a_model_built_in_configure_model(tmp_path: Path) -> None:
    run(tmp_path, ConfigureModelLlama, None)
    assert run(tmp_path, ConfigureModelLlama, "last") == [
        ("callback.setup", None),
        ("module.setup", False),               # no layers yet: setup cannot inject
        ("module.configure_model", False),     # injection follows configure_model ...
        ("module.on_load_checkpoint", True),   # ... and precedes the restore
        ("callback.on_load_checkpoint", None),
        ("precision.convert_module", True),
        ("module.configure_optimizers", True),
        ("callback.on_fit_start", None),
    ]
