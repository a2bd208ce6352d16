#!/usr/bin/env python
"""What one adapted decoder layer keeps for backward, per method: on the CPU, in seconds, no GPU.

A random Llama decoder layer of the given shapes (bf16 base, the method on the seven projections, float32 adapter
weights as the library keeps them) runs forward on ``--tokens`` tokens whose input requires grad (as every block's
does under the callback's compile):

- eager: every tensor autograd packs (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage, less
  the layer's parameters and its input (which exist anyway);
- compiled: the tensors AOTAutograd's partitioner hands from the forward graph to the backward graph, with Inductor's
  decompositions and partitioner (``min_cut_rematerialization_partition(compiler="inductor")``) but no code
  generation (as the ``aot_eager_decomp_partition`` backend), less the graph's inputs (parameters, the input).

Saved bytes grow linearly with tokens (sdpa keeps O(tokens) per head), so small ``--tokens`` scale to a training
batch: the line ``x N layers at B tokens`` multiplies out. The difference between two methods is what one costs over
the other in a step's peak (the peak is reached with every layer's saved tensors alive, at the start of backward).

    python benchmarks/saved_memory.py --methods lora,dora                     # 1B shapes, 256 tokens, both modes
    python benchmarks/saved_memory.py --methods lora,dora --list              # each saved tensor, largest first
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _models import LLAMA_1B, TINY, llama_config  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"1b": LLAMA_1B, "tiny": TINY}


def build_layer(shape: str, method: str, r: int, dropout: float, seed: int = 0):
    """One bf16 Llama decoder layer with ``method`` on its projections (float32 adapters), its rotary embedding."""
    import lightning_lora as ll
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = llama_config(SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16).requires_grad_(False)
    if method != "none":
        ll.inject(layer, ll.AdapterConfig.create(method, r=r, alpha=2 * r, dropout=dropout,
                                                 target_modules=PROJECTIONS), seed=seed)
    return layer.train(), LlamaRotaryEmbedding(config), config


def _forward(layer, rotary, x: torch.Tensor):
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    cos_sin = rotary(x, positions)
    out = layer(x, position_embeddings=cos_sin, position_ids=positions)
    return out[0] if isinstance(out, tuple) else out


def eager_saved(layer, rotary, x: torch.Tensor) -> list[tuple[str, tuple, torch.dtype, int]]:
    """(what, shape, dtype, bytes) per distinct storage autograd keeps, less parameters and the input."""
    known = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    kept: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known and ptr not in kept:
            kept[ptr] = (str(t.grad_fn or "leaf")[:40], tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _forward(layer, rotary, x)
    out.float().square().mean().backward()
    return list(kept.values())


def compiled_saved(layer, rotary, x: torch.Tensor) -> list[tuple[str, tuple, torch.dtype, int]]:
    """(node, shape, dtype, bytes) per tensor the partitioned forward graph saves for backward, less graph inputs."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.compile_fx import select_decomp_table

    saved: list[tuple] = []

    def forward_compiler(gm, example_inputs):
        return make_boxed_func(gm.forward)

    def backward_compiler(gm, example_inputs):
        for node in gm.graph.find_nodes(op="placeholder"):
            val = node.meta.get("val")
            if node.name.startswith(("primals_", "tangents_")) or not isinstance(val, torch.Tensor):
                continue
            saved.append((node.name, tuple(val.shape), val.dtype, val.numel() * val.element_size()))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                           decompositions=select_decomp_table(),
                           partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    out = _forward(compiled, rotary, x)
    out.float().square().mean().backward()
    torch._dynamo.reset()
    return saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--methods", default="lora,dora", help="comma-separated; 'none' is the bare layer")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--scale-layers", type=int, default=16, help="layers in the model the totals scale to")
    p.add_argument("--scale-tokens", type=int, default=4 * 2048, help="tokens per step the totals scale to")
    p.add_argument("--list", action="store_true", help="print each saved tensor")
    args = p.parse_args()

    scale = args.scale_layers * args.scale_tokens / args.tokens
    results = {}
    for mode in args.modes.split(","):
        for method in args.methods.split(","):
            layer, rotary, config = build_layer(args.shape, method, args.r, args.dropout)
            x = torch.randn(1, args.tokens, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
            kept = (eager_saved if mode == "eager" else compiled_saved)(layer, rotary, x)
            total = sum(k[3] for k in kept)
            results[mode, method] = total
            print(f"{mode:8} {method:5}: {len(kept):3} tensors, {total / 2**20:8.2f} MiB per layer at {args.tokens} "
                  f"tokens; x {args.scale_layers} layers at {args.scale_tokens} tokens: {total * scale / 2**30:.2f} GiB",
                  flush=True)
            if args.list:
                for name, shape, dtype, nbytes in sorted(kept, key=lambda k: -k[3]):
                    print(f"    {nbytes / 2**20:8.3f} MiB  {str(dtype).removeprefix('torch.'):8} {shape}  {name}")
        base = args.methods.split(",")[0]
        for method in args.methods.split(",")[1:]:
            extra = results[mode, method] - results[mode, base]
            print(f"{mode:8} {method} - {base}: {extra / 2**20:+.2f} MiB per layer, {extra * scale / 2**30:+.2f} GiB "
                  f"at {args.scale_layers} layers x {args.scale_tokens} tokens")


if __name__ == "__main__":
    main()
