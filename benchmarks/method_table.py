#!/usr/bin/env python
"""Every registered method on one tiny Llama, on the CPU: trainable parameters and mean training step time.

Iterates ``lightning_lora.methods.registry.METHODS`` with each method's default options (so methods added later
appear without changes here), trains through a real ``Trainer.fit`` with ``LoRACallback(method=...)`` (so methods
that hook the training loop, such as AdaLoRA's budget or LoRA+'s optimizer groups, run as users run them), and times
each optimizer step after a warm-up. A full fine-tuning row (no adapter, every weight trained) is the yardstick.
A method that cannot run on this model with its defaults gets a row that says why. The methods run in several rounds
(each a fresh fit), so that a slow spell of a shared machine is spread over all of them rather than one.

    python benchmarks/method_table.py                 # the Markdown table on stdout
    python benchmarks/method_table.py --steps 20 --rounds 1 --only lora,loha,vera
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora.methods.registry import METHODS  # noqa: E402
from lightning_lora.surgery import parameter_counts  # noqa: E402

# widths divisible by 64, so block methods (OFT, Bone) fit with their default block sizes
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 512, 128, 384, 4, 4, 2


def make_model(seed: int = 0) -> torch.nn.Module:
    """A Llama-like decoder from a config (no download): d x k weights of 128 x 128, 64 x 128, 384 x 128 and the
    transposes, with biases (so BitFit has something to train)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=256, attention_bias=True, mlp_bias=True, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = make_model()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class StepTimer(pl.Callback):
    """Wall time of each training batch (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(method: str | None, steps: int, warmup: int, batch: torch.Tensor) -> tuple[int, int, list[float]]:
    """(trainable, total) parameters and the timed steps of one method (None: full fine-tuning)."""
    module, timer = Module(), StepTimer()
    callbacks: list = [timer]
    with tempfile.TemporaryDirectory() as tmp:
        if method is not None:
            callbacks.append(ll.LoRACallback(method=method, export_dir=tmp, export_merged=False))
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp, callbacks=callbacks)
        trainer.fit(module, DataLoader(batch, batch_size=len(batch) // (warmup + steps)))
    trainable, total = parameter_counts(module.model)
    return trainable, total, timer.times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method and round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="fits per method, interleaved (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    parser.add_argument("--only", default="", help="comma-separated method names (default: all registered)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    count = (args.warmup + args.steps) * args.batch
    batch = torch.randint(3, VOCAB, (count, args.length), generator=torch.Generator().manual_seed(0))
    methods = [m for m in METHODS if not args.only or m in args.only.split(",")]

    counts: dict = {}
    times: dict = {method: [] for method in [None, *methods]}
    failed: dict = {}
    for round_ in range(args.rounds):
        for method in times:
            if method in failed:
                continue
            quiet()
            try:
                *counts[method], steps = run(method, args.steps, args.warmup, batch)
                times[method] += steps
            except Exception as err:  # a row that says why, not a crash of the whole table
                failed[method] = f"not run: {type(err).__name__}: {str(err).split('. ')[0].replace('|', '/')[:110]}"
            print(f"round {round_ + 1}: {method or 'full fine-tuning'} done", file=sys.stderr, flush=True)
    rows = []
    for method, steps in times.items():
        name = "full fine-tuning" if method is None else method
        merge = "-" if method is None else ("yes" if METHODS[method].mergeable else "no")
        if method in failed:
            rows.append(f"| {name} | {merge} | - | - | {failed[method]} |")
            continue
        trainable, total = counts[method]
        spread = statistics.stdev(steps) * 1e3 if len(steps) > 1 else 0.0
        rows.append(f"| {name} | {merge} | {trainable:,} | {100 * trainable / total:.2f} | "
                    f"{statistics.mean(steps) * 1e3:.1f} ± {spread:.1f} |")
    print(f"Tiny Llama ({LAYERS} layers, hidden {HIDDEN}, intermediate {INTERMEDIATE}, vocabulary {VOCAB}, biases), batch "
          f"{args.batch} x {args.length} tokens, CPU, {args.threads} thread(s), torch {torch.__version__}; each "
          f"method's default options; mean (± standard deviation) of {args.rounds} x {args.steps} steps, each fit after "
          f"{args.warmup} warm-up steps, rounds interleaved across methods.\n")
    print("| method | mergeable | trainable parameters | % of model | step time (ms) |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))


def quiet() -> None:
    """Lightning's and our INFO lines (set up as runs start) would interleave with the table: errors only."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning", "lightning_lora")):
            logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    main()
