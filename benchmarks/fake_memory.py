#!/usr/bin/env python
"""Peak memory per rank of bench_distributed.py's training step, on fake tensors: no GPU, no compute, a few minutes
on any CPU. Eager only (a compiled graph saves other tensors).

A Llama of the shape (bf16 or NF4 base, frozen; LoRA r16 on the seven projections, fp32 adapters; AdamW; gradient
checkpointing) runs one step under ``FakeTensorMode`` after a first step has made the optimizer state; torch's
``MemTracker`` (one rank) or ``FSDPMemTracker`` (FSDP2 on a fake process group of ``--world`` ranks, sharded by
``lightning_lora.distributed.shard_model`` with replicated adapters) records the peak by kind. ``--embeddings root``
leaves the input/output embeddings in the root unit as before ``separate_embeddings`` (the first GPU run's layout).
``--layer``: one decoder layer's forward and backward instead (what gradient checkpointing recomputes at a time).

Checked against the GPU: 8B NF4 and bf16 one-rank steps give 12.72 / 22.37 GiB here, measured 12.8 / 22.4.

    python benchmarks/fake_memory.py --shape 8b --base nf4                      # one GPU
    python benchmarks/fake_memory.py --shape 8b --base nf4 --world 2            # FSDP2 x2, embeddings as own units
    python benchmarks/fake_memory.py --shape 8b --layer                         # one layer's forward and backward
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class _NoHandle:
    def remove(self) -> None:
        pass


def _frozen_params_take_no_hooks() -> None:
    """MemTracker hooks every parameter's gradient, which a frozen base weight refuses: no hook where none can fire."""
    import torch

    hook, post_hook = torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook
    torch.Tensor.register_hook = lambda t, fn: hook(t, fn) if t.requires_grad else _NoHandle()
    torch.Tensor.register_post_accumulate_grad_hook = lambda t, fn: post_hook(t, fn) if t.requires_grad else _NoHandle()


def _gib(snapshot: dict) -> str:
    kinds = next(iter(snapshot.values()))
    return ", ".join(f"{str(k).split('.')[-1].lower()} {v / 2**30:.2f}" for k, v in kinds.items() if v) + " GiB"


def _fused_loss_memory():
    """A stand-in with the memory of the callback's compiled loss (Inductor fuses the float32 upcast, log-softmax and
    its backward): forward keeps the bf16 logits and one float32 per row, backward returns one bf16 gradient. Fake
    tensors carry no values, so only the allocations matter."""
    import torch

    class FusedLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits):
            lse = logits.new_empty(logits.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(logits, lse)
            return lse.sum()

        @staticmethod
        def backward(ctx, grad):
            logits, _ = ctx.saved_tensors
            return torch.empty_like(logits)

    return lambda logits, labels, vocab_size, **kwargs: FusedLoss.apply(logits)


def layer_memory(args: argparse.Namespace) -> None:
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    import lightning_lora as ll
    from bench_distributed import PROJECTIONS, llama_config

    config = llama_config(args.shape)
    torch.set_default_dtype(torch.bfloat16)
    layer = LlamaDecoderLayer(config, 0).requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    ll.inject(layer, {"method": "lora", "r": args.r, "alpha": 2 * args.r, "target_modules": PROJECTIONS}, seed=0)
    x = torch.randn(args.batch, args.seq, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(args.seq).unsqueeze(0)
    cos_sin = LlamaRotaryEmbedding(config)(x, positions)
    tracker = MemTracker()
    with tracker:
        out = layer(x, position_embeddings=cos_sin, position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        after_forward = tracker.get_tracker_snapshot("current")
        out.backward(torch.ones_like(out))
    print(f"one {args.shape} layer, batch {args.batch} x {args.seq}: after forward {_gib(after_forward)}; "
          f"peak in backward {_gib(tracker.get_tracker_snapshot('peak'))}")


def step_memory(args: argparse.Namespace) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    import torch.distributed as dist

    from bench_distributed import RUN, llama_config

    config = llama_config(args.shape)
    run = RUN[args.shape]
    if args.world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", rank=0, world_size=args.world, store=FakeStore())
        mesh = init_device_mesh("cpu", (args.world,))  # real tensors: before the fake mode
    with FakeTensorMode():
        _step_memory(args, config, run, mesh if args.world > 1 else None)


def _step_memory(args: argparse.Namespace, config, run: dict, mesh) -> None:
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaForCausalLM

    import lightning_lora as ll
    import lightning_lora.distributed as distributed
    from bench_distributed import NF4, PROJECTIONS
    from lightning_lora.quantize import quantize_base
    from lightning_lora.surgery import adapter_parameters

    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config).requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    ll.inject(model, {"method": "lora", "r": args.r, "alpha": 2 * args.r, "target_modules": PROJECTIONS}, seed=0)
    for p in adapter_parameters(model):  # fp32 adapters, as LoRACallback keeps them
        p.data = p.data.float()
    if args.base == "nf4":
        for layer in model.model.layers:
            quantize_base(layer, NF4)
    if args.world > 1:
        if args.embeddings == "root":
            distributed.separate_embeddings = lambda model, blocks: []
        distributed.shard_model(model, mesh, adapters="replicated")
    if args.loss == "fused":
        model.loss_function = _fused_loss_memory()
    if run["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, config.vocab_size, (run["batch"], run["seq"]))

    def step() -> None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # the optimizer state exists from the second step on
    tracker = FSDPMemTracker(model, optimizer) if args.world > 1 else MemTracker()
    if args.world == 1:
        tracker.track_external(model, optimizer)
    with tracker:
        step()
    layout = f"FSDP2 x{args.world}, embeddings in {args.embeddings}" if args.world > 1 else "one rank"
    layout += ", loss as compiled" if args.loss == "fused" else ""
    print(f"{args.shape} {args.base}, batch {run['batch']} x {run['seq']}"
          f"{' + ckpt' if run['grad_ckpt'] else ''}, {layout}: peak {_gib(tracker.get_tracker_snapshot('peak'))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8b")
    p.add_argument("--base", default="nf4", choices=["bf16", "nf4"])
    p.add_argument("--world", type=int, default=1, help="FSDP2 ranks (a fake process group); 1: no FSDP2")
    p.add_argument("--embeddings", default="own", choices=["own", "root"],
                   help="FSDP2: the untied embeddings as their own units (shard_model) or left in the root unit")
    p.add_argument("--loss", default="eager", choices=["eager", "fused"],
                   help="fused: the compiled loss's memory (bf16 logits kept, bf16 gradient; the layers stay eager)")
    p.add_argument("--layer", action="store_true", help="one decoder layer's forward and backward only")
    p.add_argument("--batch", type=int, default=2, help="--layer's batch")
    p.add_argument("--seq", type=int, default=2048, help="--layer's sequence length")
    p.add_argument("--lora-r", dest="r", type=int, default=16)
    args = p.parse_args()

    from torch._subclasses.fake_tensor import FakeTensorMode

    _frozen_params_take_no_hooks()
    start = time.perf_counter()
    if args.layer:
        with FakeTensorMode():
            layer_memory(args)
    else:
        step_memory(args)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
