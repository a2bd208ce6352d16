"""Trains a tiny Llama's LoRA/DoRA adapter under Lightning's DeepSpeedStrategy (ZeRO 2 or 3), or one process, and
exports it; run by tests/test_deepspeed.py (CPU, gloo) and benchmarks/check_deepspeed.py (2 GPUs, NCCL).

Lightning 2.6.6 runs DeepSpeed on CUDA only; ``CPUDeepSpeedStrategy`` lifts exactly the three CUDA assumptions (the
accelerator check, the CUDA device-index check, ``root_device.index`` as DeepSpeed's device rank) so the same ZeRO code
runs in CPU processes (DeepSpeed's CPU accelerator, gloo). ZeRO-3 keeps tensors under
``stage3_param_persistence_threshold`` elements whole; it is 0 here, so every tiny tensor is partitioned. The run
writes ``facts.json`` (rank zero): what ZeRO holds, checked by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora.deepspeed_io import flat_partitions  # noqa: E402
from ddp_train import RUNS, biased_llama  # noqa: E402
from conftest import make_llama  # noqa: E402
from tiny_modules import TinyLlamaModule, TokensDataModule  # noqa: E402

# ``--runs`` entries beyond ddp_train.RUNS (every method) that ZeRO needs too: LoRA+ (its optimizer groups are split
# before ZeRO flattens them) with DoRA, LoRA's other initializations and rsLoRA as named adapters (PiSSA and OLoRA
# rewrite the base weight, before ZeRO-3 partitions it), and LoRA on both sides of a tied embedding (one tensor that
# ZeRO-3 partitions once; its merge is refused, as in one process).
DEEPSPEED_RUNS = {
    "tied": {"tie": True, "export_merged": False, "options": {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}},
    "dora_loraplus": {"method": "dora", "loraplus": 4},  # B and the magnitude at 4x the rate
    "lora_inits": {"options": {"r": None, "target_modules": None, "adapters": {
        "pissa": {"method": "lora", "r": 4, "init_weights": "pissa", "target_modules": ["q_proj"]},
        "olora": {"method": "lora", "r": 4, "init_weights": "olora", "target_modules": ["v_proj"]},
        "rslora": {"method": "lora", "r": 4, "use_rslora": True, "target_modules": ["k_proj"]},
        "gaussian": {"method": "dora", "r": 4, "init_weights": "gaussian", "target_modules": ["o_proj"]}}}},
}
ALL_RUNS = {"lora": {}, **DEEPSPEED_RUNS, **RUNS}  # every method of the registry under ZeRO (tests/test_deepspeed.py)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` in CPU processes (for tests): Lightning's three CUDA-only steps replaced, nothing else."""

    def setup_environment(self) -> None:  # Lightning refuses a non-CUDA accelerator here
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:  # without the CUDA device-index validation
        from lightning_fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):  # device_rank: root_device.index is None
        import deepspeed

        engine, zero_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, zero_optimizer


class Facts(pl.Callback):
    """Rank zero writes what ZeRO holds once training starts: how many parameters are partitioned (stage 3), and
    how many elements the ZeRO optimizer holds per rank against the adapter's size (only the adapter reaches it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(trainer.strategy, DeepSpeedStrategy):
            return
        params = list(pl_module.parameters())
        zero_optimizer = trainer.optimizers[0]
        facts = {
            "world_size": trainer.world_size,
            "params": len(params),
            "partitioned": sum(hasattr(p, "ds_id") and p.numel() < p.ds_numel for p in params),
            "adapter_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad),
            "base_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params if not p.requires_grad),
            "optimizer_numel": sum(p.numel() for p in flat_partitions(zero_optimizer)),
        }
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(facts))


def main(argv: Optional[list[str]] = None) -> None:
    """Run with ``argv`` (default: the command line); one-device runs also run in the caller's process this way."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", type=int, default=0, help="ZeRO stage (2 or 3); 0: no DeepSpeed (one process)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint to resume from")
    parser.add_argument("--export-merged", action="store_true", help="also write the merged model at each export")
    parser.add_argument("--precision", default="32-true", help="the Trainer's precision (bf16-mixed: ZeRO's bf16)")
    parser.add_argument("--loraplus", type=float, default=None, help="LoRACallback(loraplus_lr_ratio=...)")
    parser.add_argument("--options", type=json.loads, default={},
                        help='more LoRACallback options as JSON, replacing the defaults: {"adapters": {...}}')
    parser.add_argument("--bias", action="store_true", help="a Llama with biases in its projections (for BitFit)")
    parser.add_argument("--tie", action="store_true", help="a Llama whose lm_head shares the embedding's weight")
    parser.add_argument("--experts", type=int, default=0, help="LoRA experts the module holds before fit (X-LoRA)")
    parser.add_argument("--perturb-other-ranks", action="store_true",
                        help="ranks but zero scale their base by 1.5 before fit: rank zero's must reach every rank")
    parser.add_argument("--runs", type=json.loads, default=None,
                        help='several fits in one launch, each into <out>/<name>, as ddp_train.py --runs: {"<name>": '
                             '{"method": "prompt", "options": {...}, "bias": false, "export_merged": false}, ...}')
    args = parser.parse_args(argv)
    if args.runs is None:
        fit(args)
    for name, run in (args.runs or {}).items():  # the processes and their group are started once, for the first
        fit(argparse.Namespace(**{**vars(args), "out": args.out / name, **run}))


def fit(args: argparse.Namespace) -> None:
    pl.seed_everything(0)
    # compile=False: one GPU would compile the blocks by default (DeepSpeed never does); the runs must do the same math
    options = {"r": 4, "target_modules": ["q_proj", "v_proj"], "loraplus_lr_ratio": args.loraplus, **args.options}
    callback = ll.LoRACallback(args.method, **{k: v for k, v in options.items() if v is not None},
                               export_dir=str(args.out), export_merged=args.export_merged, export_on_checkpoint=True,
                               compile=False)
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=4, save_last=True, save_top_k=-1)
    strategy: object = "auto"
    if args.stage:
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.accelerator == "cpu" else "cuda")  # before the import
        if args.accelerator == "cpu":
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__ = {}  # no JIT-built op (its shared-memory all-reduce needs a compiler)
        cls = CPUDeepSpeedStrategy if args.accelerator == "cpu" else DeepSpeedStrategy
        strategy = cls(stage=args.stage, process_group_backend="gloo" if args.accelerator == "cpu" else None)
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    module = TinyLlamaModule(lr=args.lr)
    if args.bias:
        module.model = biased_llama()
    if args.tie:
        module.model = make_llama(tie=True).train()
    for i in range(args.experts):  # trained elsewhere: random, frozen by the callback
        ll.inject(module.model, {"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"],
                                 "init_weights": False}, seed=100 + i, name=f"expert{i}")
    if args.perturb_other_ranks and int(os.environ.get("LOCAL_RANK", 0)):  # the processes Lightning starts
        for param in module.model.parameters():  # DeepSpeed broadcasts the float ones, the callback the quantized ones
            param.data.mul_(1.5)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_epochs=2,
                         max_steps=args.max_steps, logger=False, enable_progress_bar=False, precision=args.precision,
                         enable_model_summary=False, default_root_dir=args.out, limit_val_batches=0,
                         callbacks=[callback, checkpoint, Facts(args.out / "facts.json")],
                         use_distributed_sampler=False)
    trainer.fit(module, TokensDataModule(count=32, batch_size=args.batch_size),
                ckpt_path=args.resume)


if __name__ == "__main__":
    main()
