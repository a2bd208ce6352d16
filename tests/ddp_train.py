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
import torch  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.strategies import ModelParallelStrategy  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora.distributed import shard_model  # noqa: E402
from lightning_lora.methods.base import AdaptedLayer  # noqa: E402
from conftest import make_llama  # noqa: E402
from tiny_modules import RandomTokens, TinyLlamaModule, TokensDataModule  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler  # noqa: E402


# Every weight-update method at once, as named adapters on their own modules (two on q_proj, several on the other
# projections of both layers), each small enough for the tiny Llama; AdaLoRA shrinks its budget (4 -> 2 per layer)
# from the first step and HRA trains with its regularizer, so both training-loop hooks run.
WEIGHT_UPDATES = {
    "lora": {"method": "lora", "r": 4, "target_modules": ["q_proj"]},
    "dora": {"method": "dora", "r": 4, "target_modules": ["q_proj"]},
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2, "target_modules": ["k_proj"]},
    "vera": {"method": "vera", "r": 8, "target_modules": ["v_proj", "o_proj"]},  # one projection pair, two shapes
    "oft": {"method": "oft", "oft_block_size": 8, "target_modules": ["o_proj"]},
    "boft": {"method": "boft", "boft_block_size": 4, "target_modules": ["gate_proj"]},
    "hra": {"method": "hra", "r": 4, "orth_reg_weight": 0.1, "target_modules": ["up_proj"]},
    "bone": {"method": "bone", "r": 8, "target_modules": ["down_proj"]},
    "miss": {"method": "miss", "r": 8, "target_modules": ["gate_proj"]},
    "loha": {"method": "loha", "r": 4, "target_modules": ["k_proj"]},
    "lokr": {"method": "lokr", "r": 4, "init_weights": False, "target_modules": ["up_proj"]},  # w1 = 0 gives w2
    # tiny early gradients whose float rounding Adam (g / sqrt(v)) magnifies past the tolerance
}
# ``--runs`` entries: the weight-update methods in one model, and each inserted-module method in its own (they take
# one adapter per model); the inserted ones that cannot merge write no merged export
NO_TARGETS = {"r": None, "target_modules": None}
RUNS = {
    "weight_updates": {"options": {**NO_TARGETS, "adapters": WEIGHT_UPDATES}},
    **{method: {"method": method, "options": {**NO_TARGETS, **options}, "export_merged": method == "bitfit"}
       for method, options in {"houlsby": {"reduction_factor": 8}, "pfeiffer": {"reduction_factor": 8},
                               "llama_adapter": {"adapter_len": 4}, "prefix": {"num_virtual_tokens": 4},
                               "prompt": {"num_virtual_tokens": 4}, "bitfit": {},
                               "xlora": {"use_trainable_adapters": True}}.items()},
}
RUNS["bitfit"]["bias"] = True
RUNS["xlora"]["experts"] = 2
# per-example adapters (adapter_key): with 2 ranks, rank 0's examples all train "a" and rank 1's all "b"
ROUTED = {"options": {**NO_TARGETS, "adapter_key": "task", "adapters": {
    "a": {"method": "lora", "r": 4, "target_modules": ["q_proj"]},
    "b": {"method": "loha", "r": 4, "target_modules": ["q_proj", "v_proj"]}}},
    "strategy": "ddp_find_unused_parameters_true"}


class ShardedLlama(TinyLlamaModule):
    """The model is built in ``__init__`` (LoRACallback injects before ``configure_model``) and sharded here."""

    def __init__(self, lr: float, adapters: str) -> None:
        super().__init__(lr=lr)
        self.adapter_placement = adapters

    def configure_model(self) -> None:
        shard_model(self.model, self.device_mesh["data_parallel"], adapters=self.adapter_placement)
        # the kept-aside original modules hold the shards too, so fully_shard could free the full weights
        assert all(layer.original_module.weight is layer.weight for layer in ll.adapters(self.model).values()
                   if isinstance(layer, AdaptedLayer))


class RoutedTokens(Dataset):
    """``RandomTokens`` as dict batches: example ``i`` trains adapter ``names[i % len(names)]`` (``adapter_key="task"``)."""

    def __init__(self, names: list[str], count: int = 32) -> None:
        self.data, self.names = RandomTokens(count), names

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.data[index], "task": self.names[index % len(self.names)]}


class RoutedData(TokensDataModule):
    def __init__(self, names: list[str], batch_size: int) -> None:
        super().__init__(batch_size=batch_size)
        self.names = names

    def train_dataloader(self) -> DataLoader:
        data, trainer = RoutedTokens(self.names), self.trainer
        sampler = DistributedSampler(data, trainer.world_size, trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


def routed(module: pl.LightningModule) -> pl.LightningModule:
    """``module`` reading the token ids of a dict batch."""
    step = module.training_step
    module.training_step = lambda batch, batch_idx: step(batch["input_ids"], batch_idx)
    return module


def biased_llama() -> torch.nn.Module:
    """``make_llama``'s model with biases in the attention and MLP projections."""
    from transformers import LlamaForCausalLM

    config = make_llama().config
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--quantize", type=json.loads, default=None, help='LoRACallback(quantize=...) as JSON: "int8"')
    parser.add_argument("--strategy", choices=["ddp", "ddp_find_unused_parameters_true", "fsdp2"], default="ddp")
    parser.add_argument("--adapters", choices=["sharded", "replicated"], default="sharded", help="fsdp2 only")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint to resume from")
    parser.add_argument("--export-merged", action="store_true", help="also write the merged model at each export")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--options", type=json.loads, default={},
                        help='more LoRACallback options as JSON, replacing the defaults: {"adapters": {...}}')
    parser.add_argument("--bias", action="store_true", help="a Llama with biases in its projections (for BitFit)")
    parser.add_argument("--experts", type=int, default=0, help="LoRA experts the module holds before fit (X-LoRA)")
    parser.add_argument("--runs", type=json.loads, default=None,
                        help='several fits in one launch, each into <out>/<name>: {"<name>": {"method": "prompt", '
                             '"options": {...}, "bias": false, "experts": 0}, ...} (each replaces those arguments)')
    args = parser.parse_args()
    if args.runs is None:
        fit(args)
    for name, run in (args.runs or {}).items():  # the processes and their group are started once, for the first
        fit(argparse.Namespace(**{**vars(args), "out": args.out / name, **run}))


def fit(args: argparse.Namespace) -> None:
    pl.seed_everything(0)
    # Checkpoints and exports at steps 4 and 8: rank zero writes them while the other ranks wait at Lightning's barrier.
    options = {"r": 4, "target_modules": ["q_proj", "v_proj"], **args.options}
    callback = ll.LoRACallback(args.method, **{k: v for k, v in options.items() if v is not None},
                               export_dir=str(args.out), export_merged=args.export_merged,
                               export_on_checkpoint=True, quantize=args.quantize)
    checkpoint = ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=4, save_last=True, save_top_k=-1)
    if args.devices == 1:
        strategy, module = "auto", TinyLlamaModule(lr=args.lr)
    elif args.strategy != "fsdp2":
        strategy, module = args.strategy, TinyLlamaModule(lr=args.lr)
    else:
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
        module = ShardedLlama(lr=args.lr, adapters=args.adapters)
    if args.bias:
        module.model = biased_llama()
    for i in range(args.experts):  # trained elsewhere: random, frozen by the callback
        ll.inject(module.model, {"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"],
                                 "init_weights": False}, seed=100 + i, name=f"expert{i}")
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=2,
                         max_steps=args.max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.out, limit_val_batches=0,
                         callbacks=[callback, checkpoint], use_distributed_sampler=False)
    key = options.get("adapter_key")
    data = RoutedData(list(options["adapters"]), args.batch_size) if key else TokensDataModule(32, batch_size=args.batch_size)
    trainer.fit(routed(module) if key else module, data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
