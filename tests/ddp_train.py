"""Trains a tiny Llama's LoRA adapter with N CPU processes (DDP, gloo) and saves it; run by test_ddp.py.

Lightning's DDP launcher re-runs this script once per extra process, so it must be a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

import lightning_lora as ll  # noqa: E402
from tiny_modules import TinyLlamaModule, TokensDataModule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--quantize", type=json.loads, default=None, help='LoRACallback(quantize=...) as JSON: "int8"')
    args = parser.parse_args()
    pl.seed_everything(0)
    # Checkpoints and exports at steps 4 and 8: rank zero writes them while the other ranks wait at Lightning's barrier.
    callback = ll.LoRACallback(r=4, target_modules=["q_proj", "v_proj"], export_dir=str(args.out), export_merged=False,
                               export_on_checkpoint=True, quantize=args.quantize)
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=4, save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                         max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.out, limit_val_batches=0,
                         callbacks=[callback, checkpoint], use_distributed_sampler=False)
    trainer.fit(TinyLlamaModule(lr=args.lr), TokensDataModule(count=32, batch_size=args.batch_size))


if __name__ == "__main__":
    main()
