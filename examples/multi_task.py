"""Three adapters, three tasks, one run, one dataloader: each example names its task's adapter.

A tiny Llama (random weights, built from a config: no download) learns three token-to-token maps (copy, next,
mirror) from the same kind of prompt. Every batch mixes the three tasks; ``LoRACallback(adapters=..., adapter_key="task")`` gives each task its own
adapter (two LoRAs of different ranks and a DoRA), and one forward applies each example's own adapter, so each adapter
trains on its own task's examples only. At the end each task is scored with each adapter: its own should win.

    python examples/multi_task.py            # a few seconds on a CPU
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora import LoRACallback  # noqa: E402

VOCAB, PAIRS = 24, 6
TASKS = {  # each maps a token to its answer token; the prompt alone does not say which task is meant
    "copy": lambda t: t,
    "next": lambda t: 2 + (t - 1) % (VOCAB - 2),
    "mirror": lambda t: VOCAB + 1 - t,
}
ADAPTERS = {  # each task its own method and options
    "copy": {"method": "lora", "r": 4, "alpha": 8},
    "next": {"method": "lora", "r": 8, "alpha": 16},
    "mirror": {"method": "dora", "r": 4, "alpha": 8},
}


class Tasks(Dataset):
    """``count`` examples cycling through the tasks: ``x1 y1 x2 y2 ...`` with ``y = task(x)``, the loss on the y."""

    def __init__(self, count: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(count):
            task = list(TASKS)[i % len(TASKS)]
            xs = torch.randint(2, VOCAB, (PAIRS,), generator=gen).tolist()
            tokens = torch.tensor([t for x in xs for t in (x, TASKS[task](x))])
            labels = tokens.clone()
            labels[0::2] = -100
            self.items.append({"input_ids": tokens, "labels": labels, "task": task})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class TinyLM(pl.LightningModule):
    def __init__(self, lr: float = 3e-2) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=0, eos_token_id=0))
        self.lr = lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # batch["task"] is read by LoRACallback (adapter_key): the model applies each example's own adapter
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TasksData(pl.LightningDataModule):
    """The mixed-task training data, for the CLI: ``lightning-lora fit --model=examples.multi_task.TinyLM
    --data=examples.multi_task.TasksData --lora.adapters='{"copy": {"r": 4}, ...}' --lora.adapter_key=task``."""

    def __init__(self, count: int = 96, batch_size: int = 24) -> None:
        super().__init__()
        self.count, self.batch_size = count, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Tasks(self.count, seed=0), batch_size=self.batch_size, shuffle=True)


@torch.no_grad()
def scores(model: torch.nn.Module, data: Tasks) -> dict[str, dict[str, float]]:
    """Answer loss of each task's examples under each adapter (rows: task, columns: adapter)."""
    table: dict[str, dict[str, float]] = {}
    for task in TASKS:
        items = [item for item in data.items if item["task"] == task]
        ids = torch.stack([item["input_ids"] for item in items])
        labels = torch.stack([item["labels"] for item in items])
        table[task] = {}
        for adapter in TASKS:
            with ll.adapter_batch(model, [adapter] * len(items)):
                table[task][adapter] = model(input_ids=ids, labels=labels).loss.item()
    return table


def main(max_steps: int = 40, root: str | None = None) -> dict:
    root = root or tempfile.mkdtemp(prefix="multi_task_")
    module = TinyLM()
    callback = LoRACallback(adapters=ADAPTERS, adapter_key="task", export_dir=str(Path(root) / "export"), seed=0)
    trainer = pl.Trainer(callbacks=[callback], max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root)
    trainer.fit(module, TasksData())
    table = scores(module.model.eval(), Tasks(48, seed=1))
    for task, row in table.items():
        print(f"{task:>8}: " + "  ".join(f"{adapter} {loss:.3f}" for adapter, loss in row.items()))
    return {"scores": table, "adapter_dir": callback.adapter_dir}


if __name__ == "__main__":
    main()
