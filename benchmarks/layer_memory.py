#!/usr/bin/env python
"""Memory of one decoder layer's forward and backward (eager), on fake tensors: no compute, runs on any CPU in seconds.

Under gradient checkpointing a training step keeps each layer's input and, in backward, recomputes one layer at a
time: what that layer's forward saves and its backward's working set are the part of the per-rank peak that neither
checkpointing nor FSDP2 shrinks (bench_distributed.py's docstring adds up the rest). One Llama layer of the shape,
bf16 base (frozen), LoRA r16 on the seven projections, under ``FakeTensorMode``, tracked by torch's ``MemTracker``:
"after forward" is the layer's weights + what forward saved for backward; "peak" the most held during backward.

    python benchmarks/layer_memory.py --shape 8b --batch 2 --seq 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class _NoHandle:
    def remove(self) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lora-r", dest="r", type=int, default=16)
    args = p.parse_args()

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    import lightning_lora as ll
    from bench_distributed import PROJECTIONS, llama_config

    # MemTracker hooks every parameter's gradient, which a frozen base weight refuses: no hook where none can fire
    hook, post_hook = torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook
    torch.Tensor.register_hook = lambda t, fn: hook(t, fn) if t.requires_grad else _NoHandle()
    torch.Tensor.register_post_accumulate_grad_hook = lambda t, fn: post_hook(t, fn) if t.requires_grad else _NoHandle()
    config = llama_config(args.shape)
    with FakeTensorMode():
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
        peak = tracker.get_tracker_snapshot("peak")
    for name, snapshot in (("after forward", after_forward), ("peak in backward", peak)):
        kinds = next(iter(snapshot.values()))
        print(f"{name}: " + ", ".join(f"{str(k).split('.')[-1].lower()} {v / 2**30:.3f}" for k, v in kinds.items()
                                     if v) + " GiB")


if __name__ == "__main__":
    main()
