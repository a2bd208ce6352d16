"""Small LightningModules and data for the callback, CLI and DDP tests (importable by class path)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from conftest import VOCAB, make_llama, make_plain
from torch import nn


def trainer(tmp_path, callbacks: list, **kwargs) -> pl.Trainer:
    """A quiet, deterministic CPU Trainer for the callback tests; ``kwargs`` override the defaults."""
    defaults = dict(accelerator="cpu", devices=1, max_epochs=2, default_root_dir=tmp_path, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, deterministic=True)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


class AttentionNet(nn.Module):
    """A model holding ``nn.MultiheadAttention``, whose ``out_proj`` forward is never called by its owner."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ffn = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attn(x, x, x, need_weights=False)[0])


class RandomTokens(Dataset):
    """A fixed, seeded set of token sequences."""

    def __init__(self, count: int = 32, length: int = 12, seed: int = 0) -> None:
        self.data = torch.randint(3, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


class TokensDataModule(pl.LightningDataModule):
    def __init__(self, count: int = 32, length: int = 12, batch_size: int = 4, stateful: bool = False) -> None:
        super().__init__()
        self.count, self.length, self.batch_size = count, length, batch_size
        self.stateful = stateful  # torchdata's StatefulDataLoader: Lightning checkpoints its position mid-epoch

    def train_dataloader(self) -> DataLoader:
        data = RandomTokens(self.count, self.length)
        if self.stateful:
            from torchdata.stateful_dataloader import StatefulDataLoader

            return StatefulDataLoader(data, batch_size=self.batch_size, shuffle=False)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # in order, so ranks' batches tile one process's batches
            sampler = DistributedSampler(data, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
            return DataLoader(data, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(8, self.length, seed=1), batch_size=self.batch_size)


class TinyLlamaModule(pl.LightningModule):
    """A causal LM step over a tiny Llama; records each training loss."""

    def __init__(self, lr: float = 1e-2, seed: int = 0, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.model = make_llama(seed).train()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            # transformers >= 5 hooks the input embeddings itself; remove that to get 4.x's behaviour
            self.model.disable_input_require_grads()
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ConfigureModelLlama(TinyLlamaModule):
    """Builds its model in ``configure_model``, as sharded-training modules do."""

    def __init__(self, lr: float = 1e-2, seed: int = 0) -> None:
        pl.LightningModule.__init__(self)
        self.lr, self.seed, self.model, self.losses = lr, seed, None, []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = make_llama(self.seed).train()


class PlainModule(pl.LightningModule):
    """A LightningModule around a plain nn.Module (no transformers model inside)."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = make_plain().train()
        self.lr = lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(batch), batch[:, 0] % 4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
