"""Trains a tiny Llama's LoRA adapter with N CPU processes (gloo) and saves it; run by test_ddp.py and test_fsdp.py.

``--strategy ddp`` (Lightning's DDP) or ``fsdp2`` (``ModelParallelStrategy``; the module's ``configure_model`` shards
each decoder layer and the model with ``lightning_lora.distributed.shard_model``, adapters sharded or replicated).
Lightning's launcher re-runs this script once per extra process, so it must be a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.strategies import ModelParallelStrategy  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora.distributed import shard_model  # noqa: E402
from tiny_modules import TinyLlamaModule, TokensDataModule  # noqa: E402


class ShardedLlama(TinyLlamaModule):
    """The model is built in ``__init__`` (LoRACallback injects before ``configure_model``) and sharded here."""

    def __init__(self, lr: float, adapters: str) -> None:
        super().__init__(lr=lr)
        self.adapter_placement = adapters

    def configure_model(self) -> None:
        shard_model(self.model, self.device_mesh["data_parallel"], adapters=self.adapter_placement)
        # the kept-aside original modules hold the shards too, so fully_shard could free the full weights
        assert all(layer.original_module.weight is layer.weight for layer in ll.adapters(self.model).values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--quantize", type=json.loads, default=None, help='LoRACallback(quantize=...) as JSON: "int8"')
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--adapters", choices=["sharded", "replicated"], default="sharded", help="fsdp2 only")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint to resume from")
    parser.add_argument("--export-merged", action="store_true", help="also write the merged model at each export")
    parser.add_argument("--method", default="lora")
    args = parser.parse_args()
    pl.seed_everything(0)
    # Checkpoints and exports at steps 4 and 8: rank zero writes them while the other ranks wait at Lightning's barrier.
    callback = ll.LoRACallback(args.method, r=4, target_modules=["q_proj", "v_proj"], export_dir=str(args.out),
                               export_merged=args.export_merged,
                               export_on_checkpoint=True, quantize=args.quantize)
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=4, save_last=True, save_top_k=-1)
    if args.devices == 1:
        strategy, module = "auto", TinyLlamaModule(lr=args.lr)
    elif args.strategy == "ddp":
        strategy, module = "ddp", TinyLlamaModule(lr=args.lr)
    else:
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
        module = ShardedLlama(lr=args.lr, adapters=args.adapters)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=2,
                         max_steps=args.max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.out, limit_val_batches=0,
                         callbacks=[callback, checkpoint], use_distributed_sampler=False)
    trainer.fit(module, TokensDataModule(count=32, batch_size=args.batch_size), ckpt_path=args.resume)


if __name__ == "__main__":
    main()
