#!/usr/bin/env python
"""LoRA / QLoRA under Lightning's DDP and FSDP2 (``ModelParallelStrategy``) on 1 and 2 GPUs of one host.

Every row is a real ``Trainer.fit`` with ``LoRACallback``, launched by torchrun (one process per GPU), on random-weight
Llama shapes (1B: Llama-3.2-1B, 8B: Llama-3.1-8B) with LoRA r=16 on all seven projections, a bf16 base or an NF4 base
(torchao), fp32 adapters, AdamW. The per-GPU batch is fixed (weak scaling), so the global batch grows with the GPUs.

Part 1 (correctness, before anything is timed): a 2-layer model of the shape's width in float32 trains 3 SGD steps on
the same global batch on 1 GPU, with DDP on 2, and with FSDP2 on 2 (adapters sharded, and replicated); the adapters
the callback exported must agree (max |difference| <= --check-atol + --check-rtol * |value|; float32, so only the
order of the gradient sums differs). Over NF4 the same, base quantized from the float32 weights.

Part 2 (timing): median step time over --steps steps after --warmup, tokens/s = global tokens per step / median step
time, peak allocated GPU memory per rank during training (reset when training starts; the model is built whole on each
rank before FSDP2 shards it, which --setup-peak reports separately), and the scaling efficiency
tokens/s(2 GPUs) / (2 * tokens/s(1 GPU)) against the single-GPU row of the same run and shape.

FSDP2 notes: the model's configure_model calls ``lightning_lora.distributed.shard_model`` (fully_shard per decoder
layer, then the untied input and output embeddings as their own units, then the root). With a bf16 base the default
is adapters="replicated" (FSDP2 all-gathers one dtype per unit, so fp32 adapters inside a bf16 unit need a
MixedPrecisionPolicy; --fsdp2-adapters sharded uses param_dtype=bf16/reduce_dtype=fp32 for that).

Every row runs what a ``LoRACallback`` user gets by default: on CUDA the callback compiles each decoder layer and the
transformers loss (``lightning_lora.plugins.compile.compile_regions``); ``--compile off`` times eager rows. The 1-GPU
row and the multi-GPU rows share everything but the strategy (same per-rank batch), so the peak ratio is fair.
Memory per rank is reported by phase (resident at train start, after forward = resident + what forward saved for
backward, forward / backward / optimizer-step peaks, the last timed step's).

Where the per-rank peak of the 8B NF4 row goes (Llama-3.1-8B shapes, batch 2 x 2048, gradient checkpointing, LoRA r16
on 7 projections, fp32 adapters, AdamW; GiB = 2**30 bytes; 4,096 tokens a rank):

    NF4 projections  32 layers x 218.1M weights x 0.5157 B (codes 0.5, int8 scale per 64, bf16 factor per 64x256)  3.35
    embed_tokens     128,256 x 4,096 bf16 (untied at 8B)                                                          0.98
    lm_head          128,256 x 4,096 bf16                                                                         0.98
    LoRA A/B fp32    32 x 1.31M = 41.9M x 4 B (their gradients the same again, 0.16, during backward)             0.16
    AdamW state      2 x fp32 per adapter weight                                                                  0.31
      resident (1 GPU): 5.47 at train start (measured "setup" 5.5) + AdamW 0.31 = 5.78
    checkpointed layer inputs  32 x 4,096 x 4,096 x bf16 = 32 x 32 MiB                                            1.00
    loss, eager (transformers): bf16 logits 4,096 x 128,256 (0.98), their fp32 copy (1.96), log_softmax's fp32
      output saved for backward (1.96); in backward: the saved output + nll's and log_softmax's fp32 gradients     5.87
    loss, compiled (the callback's loss compile): the bf16 logits kept for backward + their bf16 gradient          1.96
    one layer's recompute + backward: its forward saves 0.77, its backward holds 1.02 at most (eager, fake
      tensors: benchmarks/fake_memory.py --layer), + one dequantized NF4 weight 0.11                             ~1.1

    1 GPU eager: 5.78 + 1.00 + 5.87 (at the loss's backward) + 0.06 (final norm)                  = 12.7 (measured 12.8)
    FSDP2 x2 eager, before: shards (3.35 + 1.96) / 2 = 2.65, replicated adapters + AdamW 0.47, embed_tokens +
      lm_head whole all step 1.96 (they sat in the root unit, which FSDP2 never reshards after forward),
      1.00 + 5.87, ~0.2 of gathered NF4 layers                                                    = 12.2 (measured 12.2)
    FSDP2 x2 eager, embeddings as own units: 2.65 + 0.47 + 1.00 + 5.87 + lm_head's all-gather buffer 0.98
      (the root's pre-backward prefetches lm_head, the last unit, right at the loss's backward)     = 11.0 (0.86x)
    On fake tensors (benchmarks/fake_memory.py, eager; it leaves out the replicated adapters, 0.16): 1 GPU 12.72,
      FSDP2 x2 with the embeddings in the root 11.97 (+0.16 = 12.1, measured 12.2), as own units 10.89 (+0.16);
      with the compiled loss's memory (--loss fused): 1 GPU 8.81, FSDP2 x2 7.01 (+0.16).
    1 GPU compiled: 5.78 + 1.00 + 1.96 + 0.06                                                      =  8.8
      (its backward through the last layer: 5.78 + 0.16 gradients + 1.00 + 1.1 = 8.0, below that)
    FSDP2 x2 compiled: 2.65 + 0.47 + 1.00 + at lm_head's backward: its bf16 logit gradient 0.98 + lm_head
      gathered: FSDP2 all-gathers into one buffer (0.98) and copies out into the parameter (0.98), both alive
      during the copy (1.96) + 0.06                                                                =  7.1 (0.81x)
      (6.1-6.6 if the copy-out does not meet the logit gradient; the layers' phase is ~5.9)

FSDP2 shards only what is resident (5.31 of NF4 weights and embeddings at 8B); per-rank activations, the logits and
the gathered unit in use (lm_head: 1.96 while it is copied out) are not sharded by data parallelism. With S the
shardable bytes and A the rest of the peak, the ratio at N ranks is (S/N + A) / (S + A); at N = 2 it is <= 0.6 only
if A <= S/4 = 1.3, while the checkpointed inputs alone are 1.0 and the loss/lm_head phase 2.0-2.9. So <= 60% at
2 GPUs and 2 x 2048 a rank is out of reach for data parallelism alone: even sharded adapter state, CPU-offloaded
checkpoints and a vocabulary-parallel chunked loss (lm_head never gathered) leave one layer's recompute (1.1) and the
layer gathers (0.3): 4.4 vs 7.0, ~62%. Compiled rows at more GPUs: 4 GPUs 1.33 + 0.47 + 1.00 + 2.94 + 0.06 = 5.8
(0.66x), 8 GPUs 5.1 (0.58x). A chunked fused cross-entropy (benchmarks/_memory_options.py; under FSDP2 it has to
run inside lm_head's unit, which gathers lm_head in forward and again for backward) is predicted at 8.0 (1 GPU,
bound by the last layer's backward) vs 6.1 (FSDP2, at the gathers): 0.76x, not enough to be worth a model-specific
loss in the rows.

    python benchmarks/bench_distributed.py                          # all rows, 1b and 8b, bf16 and nf4 (2 GPUs)
    python benchmarks/bench_distributed.py --shapes 8b --bases nf4  # one block of rows
    python benchmarks/bench_distributed.py --cpu --shapes tiny      # CPU smoke run (gloo), tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, head_dim=64),
}
# per-GPU batch, sequence length and activation checkpointing per shape (the 8B settings of bench_qlora)
RUN = {"1b": dict(batch=8, seq=1024, grad_ckpt=False), "8b": dict(batch=2, seq=2048, grad_ckpt=True),
       "70b": dict(batch=1, seq=2048, grad_ckpt=True),
       "tiny": dict(batch=2, seq=64, grad_ckpt=True)}  # tiny: the 8B path (checkpointing) at smoke size
COMPILE = {"auto": None, "on": True, "off": False}  # --compile -> LoRACallback(compile=); auto: on with CUDA
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = {"format": "nf4"}


def llama_config(shape: str, layers=None):
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    return LlamaConfig(**kw, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")


def build_model(shape: str, base: str, device, dtype, r: int, layers=None, real_layers=None):
    """LlamaForCausalLM with LoRA, built on meta, then one module at a time on ``device`` with a seeded generator (the
    same weights on every rank and in every row), each decoder layer quantized (``base="nf4"``) right after it gets
    values. ``real_layers``: materialize only that many decoder layers (the rest, and the embeddings, stay on meta)."""
    import torch
    from torch import nn
    from transformers import LlamaForCausalLM

    import lightning_lora as ll
    from lightning_lora.quantize import quantize_base

    config = llama_config(shape, layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    ll.inject(model, {"method": "lora", "r": r, "alpha": 2 * r, "target_modules": PROJECTIONS}, seed=0)
    generator = torch.Generator(device=device).manual_seed(0)
    layer_modules = {id(m) for layer in model.model.layers for m in layer.modules()}
    blocks = [*model.model.layers, model] if real_layers is None else list(model.model.layers[:real_layers])
    with torch.no_grad():
        for block in blocks:
            for module in block.modules():
                if block is model and id(module) in layer_modules:
                    continue
                for name, param in list(module.named_parameters(recurse=False)):
                    if param.is_meta:  # norms 1, the rest N(0, 0.02): LoRA B too, so the adapter changes the loss
                        value = torch.empty(param.shape, dtype=param.dtype, device=device)
                        value.fill_(1.0) if param.dim() == 1 else value.normal_(0, 0.02, generator=generator)
                        setattr(module, name, nn.Parameter(value, requires_grad=param.requires_grad))
            if base == "nf4" and block is not model:
                quantize_base(block, NF4)
    for layer in ll.adapters(model).values():  # the kept-aside originals still point at the meta weights
        layer.original_module.weight = layer.weight
    if real_layers is None:
        if config.tie_word_embeddings:
            model.tie_weights()
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model


# -- the worker: one Trainer.fit, one process per GPU (torchrun) ------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import pytorch_lightning as pl
    import torch
    import torch.distributed as dist
    from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
    from torch import nn
    from torch.utils.data import DataLoader, Dataset, DistributedSampler

    import lightning_lora as ll
    from lightning_lora.distributed import shard_model
    from lightning_lora.plugins.quantization import skip_in_ddp_broadcast

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if args.cpu else torch.device("cuda", local_rank)
    if not args.cpu:
        torch.cuda.set_device(device)
    dtype = torch.float32 if args.check else torch.bfloat16
    def build() -> nn.Module:
        model = build_model(args.shape, args.base, device, dtype, args.r, layers=2 if args.check else None)
        if RUN[args.shape]["grad_ckpt"] and not args.check:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    class Tokens(Dataset):
        def __init__(self, count: int, seq: int, vocab: int) -> None:
            self.data = torch.randint(3, vocab, (count, seq), generator=torch.Generator().manual_seed(1))

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.data[i]

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build()

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch, labels=batch, use_cache=False).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            params = [p for p in self.parameters() if p.requires_grad]
            if args.check:
                return torch.optim.SGD(params, lr=1e-2)
            return torch.optim.AdamW(params, lr=1e-4, fused=not args.cpu)

    class ShardedModule(Module):
        def configure_model(self) -> None:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            kwargs = {}
            if args.fsdp2_adapters == "sharded" and dtype != torch.float32:
                kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
            shard_model(self.model, self.device_mesh["data_parallel"], adapters=args.fsdp2_adapters, **kwargs)
            n = args.prefetch[0]  # a worker gets one value
            if n:  # explicit prefetching: each layer starts the next layers' all-gathers
                from lightning_lora.distributed import default_blocks

                layers = default_blocks(self.model)
                for i, layer in enumerate(layers):
                    layer.set_modules_to_forward_prefetch(layers[i + 1:i + 1 + n])
                    layer.set_modules_to_backward_prefetch(layers[max(0, i - n):i][::-1])

    class Timer(pl.Callback):
        """Step times, and GPU memory by phase: the peak allocated memory is read and reset at each phase boundary
        (batch start, before backward, after backward), so ``peak`` (their maximum) is the training peak and
        ``phases`` holds the last step's forward / backward / optimizer-step peaks."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.setup_peak = self.resident = self.peak = 0.0
            self.phases: dict[str, float] = {}
            self.compiled: Optional[list] = None  # [blocks compiled, loss compiled] while training
            self._start = 0.0

        def _sync(self) -> None:
            if not args.cpu:
                torch.cuda.synchronize()

        def _phase(self, name: Optional[str]) -> None:
            if args.cpu:
                return
            peak = torch.cuda.max_memory_allocated() / 2**30
            self.peak = max(self.peak, peak)
            if name is not None:
                self.phases[name] = peak
            torch.cuda.reset_peak_memory_stats()

        def on_train_start(self, trainer, pl_module) -> None:
            compiled = callback._compiled  # the callback restores the eager model in teardown
            self.compiled = [len(compiled.paths), compiled.loss_owner is not None] if compiled is not None else None
            if not args.cpu:
                self.setup_peak = torch.cuda.max_memory_allocated() / 2**30
                self.resident = torch.cuda.memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._sync()
            self._phase(None)
            if args.profile and not args.cpu and batch_idx == args.warmup:
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.profiler.__enter__()
            self._start = time.perf_counter()

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self._phase("forward_peak_gib")
            if not args.cpu:
                self.phases["after_forward_gib"] = torch.cuda.memory_allocated() / 2**30

        def on_after_backward(self, trainer, pl_module) -> None:
            self._phase("backward_peak_gib")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync()
            self.times.append(time.perf_counter() - self._start)
            if getattr(self, "profiler", None) is not None:
                from _profile import overlap_summary

                self.profiler.__exit__(None, None, None)
                trace = str(args.out / f"trace-rank{os.environ.get('RANK', '0')}.json")
                self.profiler.export_chrome_trace(trace)
                self.profile = overlap_summary(trace, 1e3 * self.times[-1])
                self.profiler = None
            self._phase("optimizer_peak_gib")

    strategy = args.strategy
    pl.seed_everything(0)
    module = ShardedModule() if strategy == "fsdp2" else Module()
    if strategy == "ddp" and args.base == "nf4":
        skip_in_ddp_broadcast(module, module.model)  # DDP must not broadcast the NF4 weights (every rank built them)
    if world == 1:
        lightning_strategy = "auto" if strategy != "fsdp2" else ModelParallelStrategy(1, 1)
    elif strategy == "ddp":
        lightning_strategy = DDPStrategy(gradient_as_bucket_view=True)
    else:
        lightning_strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    batch = 2 if args.check else args.batch or RUN[args.shape]["batch"]
    seq = 128 if args.check else RUN[args.shape]["seq"]
    steps = args.check_steps if args.check else args.warmup + args.steps
    per_rank = batch if world > 1 else batch * (args.check_world if args.check else 1)
    data = Tokens(per_rank * world * max(steps, 1), seq, SHAPES[args.shape]["vocab_size"])
    sampler = DistributedSampler(data, world, int(os.environ.get("RANK", "0")), shuffle=False) if world > 1 else None
    loader = DataLoader(data, batch_size=per_rank, sampler=sampler, shuffle=False)
    timer = Timer()
    callback = ll.LoRACallback(r=args.r, alpha=2 * args.r, target_modules=PROJECTIONS, export_dir=str(args.out),
                               export_merged=False, compile=COMPILE[args.compile])
    trainer = pl.Trainer(accelerator="cpu" if args.cpu else "gpu", devices=world, strategy=lightning_strategy,
                         precision="32-true", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[callback, timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, loader)
    from torch.distributed.fsdp import FSDPModule

    times = timer.times[args.warmup + bool(args.profile):] if not args.check else timer.times
    timer._phase(None)
    row = {"step_s": statistics.median(times) if times else float("nan"), "peak_gib": timer.peak,
           "setup_peak_gib": timer.setup_peak, "resident_gib": timer.resident, **timer.phases,
           "tokens_per_step": per_rank * seq * world,
           "fsdp_units": [name or "(root)" for name, m in module.model.named_modules() if isinstance(m, FSDPModule)],
           "compiled": timer.compiled, "profile": getattr(timer, "profile", None)}
    rows = [row]
    if dist.is_initialized() and world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
    if trainer.is_global_zero:
        (args.out / "result.json").write_text(json.dumps(rows))


# -- merged export under FSDP2: peak memory per rank ------------------------------------------------------------------
# -- the driver: launches each row with torchrun and prints the tables -------------------------------------------------
def launch(args: argparse.Namespace, out: Path, shape: str, base: str, strategy: str, gpus: int, check: bool,
           adapters: str = "replicated", check_steps: int = 3, compile: Optional[str] = None,
           prefetch: int = 0) -> list[dict] | str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", __file__,
               "--worker", "--shape", shape, "--base", base, "--strategy", strategy, "--out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-r", str(args.r),
               "--fsdp2-adapters", adapters, "--check-world", "2", "--check-steps", str(check_steps)]
    command += ["--compile", compile or args.compile]
    command += ["--check"] if check else []
    command += ["--profile"] if args.profile else []
    command += ["--prefetch", str(prefetch)] if prefetch else []
    command += ["--batch", str(args.batch)] if args.batch else []
    command += ["--cpu"] if args.cpu else []
    env = {**os.environ, "OMP_NUM_THREADS": "1" if args.cpu else os.environ.get("OMP_NUM_THREADS", "4")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not (out / "result.json").exists():
        return f"failed (rc {result.returncode}): " + (result.stderr or result.stdout)[-1500:].replace("\n", " | ")
    return json.loads((out / "result.json").read_text())


def check(args: argparse.Namespace, tmp: Path, shape: str, base: str) -> bool:
    from safetensors.torch import load_file

    runs = {"initial": ("ddp", 1, "replicated"), "1 GPU": ("ddp", 1, "replicated"), "DDP x2": ("ddp", 2, "replicated"),
            "FSDP2 x2 (adapters sharded)": ("fsdp2", 2, "sharded"),
            "FSDP2 x2 (adapters replicated)": ("fsdp2", 2, "replicated")}
    if COMPILE[args.compile] or (COMPILE[args.compile] is None and not args.cpu):  # the rows compile: so does the
        runs["1 GPU eager"] = ("ddp", 1, "replicated")                            # check, against one eager run
    adapters = {}
    for name, (strategy, gpus, placement) in runs.items():
        out = tmp / f"check-{shape}-{base}-{name.replace(' ', '_').replace('(', '').replace(')', '')}"
        result = launch(args, out, shape, base, strategy, gpus, check=True, adapters=placement,
                        check_steps=0 if name == "initial" else 3, compile="off" if "eager" in name else None)
        if isinstance(result, str):
            print(f"  check {shape} {base} {name}: {result}")
            return False
        print(f"  check {shape} {base} {name}: compiled (blocks, loss) {result[0]['compiled']}; FSDP2 units "
              f"{result[0]['fsdp_units'] or '-'}")
        adapters[name] = load_file(out / "adapter" / "adapter_model.safetensors")
    initial, reference = adapters.pop("initial"), adapters.pop("1 GPU")
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    print(f"  check {shape} {base}: 3 SGD steps on 1 GPU moved the adapter by max |update| {moved:.2e}")
    ok = moved > 0
    for name, tensors in adapters.items():
        worst = max(((tensors[k] - reference[k]).abs() - args.check_rtol * reference[k].abs()).max().item()
                    for k in reference)
        diff = max((tensors[k] - reference[k]).abs().max().item() for k in reference)
        passed = tensors.keys() == reference.keys() and worst <= args.check_atol
        ok &= passed
        print(f"  check {shape} {base}: {name} vs 1 GPU after 3 SGD steps on the same global batch: max |diff| "
              f"{diff:.2e} -> {'ok' if passed else 'FAILED'} (atol {args.check_atol:g} + rtol {args.check_rtol:g})")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="1b", help=argparse.SUPPRESS)
    p.add_argument("--base", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-world", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--check-steps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    p.add_argument("--bases", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2"])
    p.add_argument("--gpus", type=int, default=2, help="the multi-GPU rows' GPU count (one host)")
    p.add_argument("--fsdp2-adapters", default="replicated", choices=["replicated", "sharded"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lora-r", dest="r", type=int, default=16)
    p.add_argument("--check-rtol", type=float, default=1e-3)
    p.add_argument("--check-atol", type=float, default=1e-5)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--check-only", action="store_true", help="the correctness check alone (Part 1), no timing")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=sorted(COMPILE),
                   help="LoRACallback(compile=...) for every row and the check: auto (the callback's default: the "
                        "decoder layers and the loss compiled on CUDA), on, off (eager rows)")
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU (smoke test with --shapes tiny)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per GPU per step (default per shape: 1b 8, 8b 2, 70b 1)")
    p.add_argument("--prefetch", type=int, nargs="+", default=[0],
                   help="FSDP2 rows: explicit prefetching of the next N layers' all-gathers in forward and backward "
                        "(0: FSDP2's implicit prefetching); one FSDP2 row per value")
    p.add_argument("--profile", action="store_true",
                   help="profile the first timed step of each row on each rank: compute busy time, collectives "
                        "exposed, idle gaps (the profiled step is left out of the timing)")
    p.add_argument("--export-memory", action="store_true",
                   help="instead of training: merged-export peak memory per rank, measured for --shapes on --gpus "
                        "GPUs and simulated for 70b (meta device + one real decoder layer)")
    p.add_argument("--simulate", nargs="+", default=None, choices=sorted(SHAPES),
                   help="--export-memory: the shapes to simulate (default 70b; tiny with --cpu)")
    p.add_argument("--simulate-only", action="store_true",
                   help="--export-memory: the simulation alone, no measured torchrun (the CPU cannot hold 8B ranks)")
    args = p.parse_args()
    if args.export_memory:  # the merged export's memory: its own module (it trains nothing)
        from _export_memory import export_memory, export_memory_worker

        if args.worker:
            export_memory_worker(args)
            return 0
        return export_memory(args, Path(tempfile.mkdtemp(prefix="bench_distributed-")))
    if args.worker:
        worker(args)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    ok = True
    if not args.skip_check:
        print("Part 1: correctness (float32, 2 layers of each shape's width)")
        for shape in args.shapes:
            for base in args.bases:
                ok &= check(args, tmp, shape, base)
        if not ok:
            print("correctness check failed: no timing")
            return 1
    if args.check_only:
        return 0
    print(f"\nPart 2: Trainer.fit steps, LoRA r={args.r} on {', '.join(PROJECTIONS)}; median of {args.steps} steps "
          f"after {args.warmup}; FSDP2 adapters {args.fsdp2_adapters}; compile {args.compile}")
    print("| shape | base | strategy | GPUs | batch x seq per GPU | compiled | step ms | tokens/s | scaling | peak GiB "
          "per rank (setup peak) | peak vs 1 GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    phases = []
    for shape in args.shapes:
        for base in args.bases:
            single = single_peak = None
            rows = [("ddp", 1, 0)] + [(s, args.gpus, n) for s in args.strategies
                                      for n in (args.prefetch if s == "fsdp2" else [0])]
            for strategy, gpus, prefetch in rows:
                out = tmp / f"{shape}-{base}-{strategy}-{gpus}-{prefetch}"
                result = launch(args, out, shape, base, strategy, gpus, check=False, adapters=args.fsdp2_adapters,
                                prefetch=prefetch)
                label = "1 GPU" if gpus == 1 else strategy.upper() + (f" prefetch {prefetch}" if prefetch else "")
                run = {**RUN[shape], **({"batch": args.batch} if args.batch else {})}
                if isinstance(result, str):
                    print(f"| {shape} | {base} | {label} | {gpus} | | | | | {result[:300]} |")
                    continue
                step = max(r["step_s"] for r in result)
                tokens = result[0]["tokens_per_step"] / step
                single = tokens if gpus == 1 else single
                scaling = f"{tokens / single:.2f}x ({100 * tokens / (gpus * single):.0f}%)" if single and gpus > 1 else "1.00x"
                peaks = " / ".join(f"{r['peak_gib']:.1f} ({r['setup_peak_gib']:.1f})" for r in result)
                peak = max(r["peak_gib"] for r in result)
                single_peak = peak if gpus == 1 else single_peak
                ratio = f"{peak / single_peak:.2f}x" if single_peak else "-"
                compiled = result[0]["compiled"]
                compiled = f"{compiled[0]} layers{' + loss' if compiled[1] else ''}" if compiled else "eager"
                print(f"| {shape} | {base} | {label} | {gpus} | {run['batch']} x {run['seq']}"
                      f"{' +ckpt' if run['grad_ckpt'] else ''} | {compiled} | {1000 * step:.0f} | {tokens:,.0f} | "
                      f"{scaling} | {peaks} | {ratio} |", flush=True)
                phases += [(f"{shape} {base} {label} rank {i}", r) for i, r in enumerate(result)]
                for i, r in enumerate(result):
                    if r.get("profile"):
                        print(f"<!-- profile {shape} {base} {label} rank {i}: {r['profile']} -->", flush=True)
    print("\nMemory by phase, GiB per rank (the last timed step): resident at train start (weights, adapters; "
          "AdamW state after step 1), after forward (resident + saved for backward), peaks of forward, backward and "
          "the optimizer step; FSDP2 units")
    print("| row | resident | after forward | forward peak | backward peak | optimizer peak | FSDP2 units |")
    print("|---|---|---|---|---|---|---|")
    for name, r in phases:
        units = r["fsdp_units"]
        units = f"{len(units)}: {', '.join(u for u in units if 'layers' not in u)} + layers" if units else "-"
        print(f"| {name} | {r['resident_gib']:.2f} | {r.get('after_forward_gib', 0):.2f} | "
              f"{r.get('forward_peak_gib', 0):.2f} | {r.get('backward_peak_gib', 0):.2f} | "
              f"{r.get('optimizer_peak_gib', 0):.2f} | {units} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
