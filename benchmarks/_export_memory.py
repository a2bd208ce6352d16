"""``bench_distributed.py --export-memory``: the peak memory per rank of the merged export under FSDP2
(``sharded_export``: one gathered base tensor at a time), measured with torchrun on N GPUs and simulated for shapes no
host holds (the model on the meta device with one real decoder layer). The models are ``bench_distributed``'s."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_distributed import build_model

SCRIPT = str(Path(__file__).with_name("bench_distributed.py"))  # torchrun runs the CLI, which dispatches back here


def export_memory_worker(args: argparse.Namespace) -> None:
    """Measured (torchrun, N GPUs): build the shape on each rank, shard it (FSDP2), then write the merged export the
    way the callback does (sharded_export: one gathered tensor at a time, rank zero writes); peak GPU memory per rank
    above the sharded model, and rank zero's peak CPU RSS."""
    import resource

    import torch
    import torch.distributed as dist

    from lightning_lora.distributed import gathered_adapters, shard_model
    from lightning_lora.sharded_export import drain, merged_tensors, write_merged

    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not args.cpu:
        torch.cuda.set_device(device)
    model = build_model(args.shape, args.base, device, torch.bfloat16, args.r)
    from torch.distributed.device_mesh import init_device_mesh

    shard_model(model, init_device_mesh(device.type, (world,)), adapters="replicated")
    if not args.cpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if not args.cpu else 0.0
    start = time.perf_counter()
    with gathered_adapters(model):
        tensors = merged_tensors(model)
        try:
            if rank == 0:
                write_merged(model, args.out / "merged", tensors)
        finally:
            drain(tensors)
    dist.barrier()
    row = {"resident_gib": resident, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if not args.cpu else 0.0,
           "seconds": time.perf_counter() - start, "cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        (args.out / "result.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def simulated_export_memory(args: argparse.Namespace, shape: str, base: str, worlds=(2, 4, 8)) -> list[str]:
    """Simulated: the model on the meta device with one real decoder layer (on the GPU, or the CPU with --cpu), whose
    merged tensors go through the sharded export's own per-tensor path (``sharded_export.merged_tensors``: the whole
    weight made dense (NF4 dequantized), merged in float32 by the layer's ``merged_weight``, handed over). Its
    transient peak is measured: on the GPU by the allocator's peak, on the CPU by torch's ``MemTracker`` (every tensor
    an op creates), plus the gathered copy of the largest weight in its own format (which the simulation's real layer
    already holds, and a sharded rank would all-gather). Per rank at world size N, as in ``export_memory_worker``:

        base bytes / N (its FSDP2 shards) + adapter bytes (whole on every rank for the export: replicated, or
        gathered by ``gathered_adapters``) + max(one layer tensor's transient, the largest tensor outside the layers,
        which is gathered whole: embed_tokens / lm_head)

    and on rank zero's host one file shard of at most ``sharded_export.DEFAULT_SHARD_SIZE`` plus one tensor."""
    import torch

    from lightning_lora.quantize import is_quantized
    from lightning_lora.sharded_export import DEFAULT_SHARD_SIZE, merged_tensors
    from lightning_lora.surgery import adapter_state_dict, base_state_dict

    device = torch.device("cpu") if args.cpu else torch.device("cuda")
    model = build_model(shape, base, device, torch.bfloat16, args.r, real_layers=1)
    block = model.model.layers[0]

    def nbytes(t) -> int:
        if is_quantized(t):  # a torchao tensor subclass: the bytes of its parts
            names, _ = t.__tensor_flatten__()
            return sum(getattr(t, name).numel() * getattr(t, name).element_size() for name in names)
        return t.numel() * t.element_size()

    layers = len(model.model.layers)
    layer_base = {k: nbytes(t) for k, t in base_state_dict(block).items()}
    layer_adapters = sum(nbytes(t) for t in adapter_state_dict(block).values())
    outside = {k: t.numel() * t.element_size() for k, t in base_state_dict(model).items()
               if not k.startswith("model.layers.")}
    base_total = sum(layer_base.values()) * layers + sum(outside.values())
    adapters_total = layer_adapters * layers
    merged_total = sum(t.numel() * 2 for t in base_state_dict(block).values()) * layers + sum(outside.values())
    if args.cpu:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        with tracker:
            for _key, tensor in merged_tensors(block):
                del tensor
        peak = tracker.get_tracker_snapshot("peak")[device]["Total"]
        measured = peak - tracker.get_tracker_snapshot("current")[device]["Total"]  # less the layer's own tensors
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _key, tensor in merged_tensors(block):  # yields host copies: only the GPU work counts here
            del tensor
        measured = torch.cuda.max_memory_allocated() - before
    largest_key = max(layer_base, key=layer_base.get)
    transient = measured + layer_base[largest_key]
    biggest_outside = max(outside.values())
    largest_merged = max(biggest_outside, max(t.numel() * 2 for t in base_state_dict(block).values()))
    gib = 2**30
    lines = [f"{shape} {base} (simulated on {device.type}: 1 real decoder layer of {layers}, the rest on meta): base "
             f"{base_total / gib:.1f} GiB, adapters {adapters_total / gib:.2f} GiB (fp32), merged bf16 model "
             f"{merged_total / gib:.1f} GiB; one layer's base {sum(layer_base.values()) / gib:.2f} GiB; merge "
             f"transient of one layer tensor {measured / gib:.2f} GiB measured + {layer_base[largest_key] / gib:.2f} "
             f"GiB gathered ({largest_key}) = {transient / gib:.2f} GiB; largest tensor outside the layers "
             f"{biggest_outside / gib:.2f} GiB (gathered whole, not merged)"]
    for world in worlds:
        peak = base_total / world + adapters_total + max(transient, biggest_outside)
        lines.append(f"  world size {world}: base shards {base_total / world / gib:.1f} + adapters "
                     f"{adapters_total / gib:.2f} + transient {max(transient, biggest_outside) / gib:.2f} = peak "
                     f"{peak / gib:.1f} GiB per rank (never the {(base_total + adapters_total) / gib:.1f} GiB model); "
                     f"rank 0 host: <= {(DEFAULT_SHARD_SIZE + largest_merged) / gib:.1f} GiB "
                     "(one file shard + one tensor)")
    return lines


def export_memory(args: argparse.Namespace, tmp: Path) -> int:
    print(f"Merged export under FSDP2 (sharded_export), LoRA r={args.r} on all projections")
    for shape in [] if args.simulate_only else args.shapes:
        for base in args.bases:
            out = tmp / f"export-{shape}-{base}"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
                       SCRIPT, "--worker", "--export-memory", "--shape", shape, "--base", base, "--out", str(out),
                       "--lora-r", str(args.r)] + (["--cpu"] if args.cpu else [])
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"{shape} {base} measured: failed: {(result.stderr or result.stdout)[-1500:]}")
                continue
            rows = json.loads((out / "result.json").read_text())
            files = sorted(p.name for p in (out / "merged").iterdir())
            shutil.rmtree(out / "merged")  # 16 GB at 8B: the next shape's export needs the disk
            print(f"{shape} {base} measured on {args.gpus} GPUs: " + "; ".join(
                f"rank {i}: sharded model {r['resident_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB "
                f"(+{r['peak_gib'] - r['resident_gib']:.2f}), CPU RSS peak {r['cpu_rss_gib']:.1f} GiB, "
                f"{r['seconds']:.0f} s" for i, r in enumerate(rows)) + f"; files {files}")
            for line in simulated_export_memory(args, shape, base, worlds=(args.gpus,)):
                print("  formula check: " + line)
    for shape in args.simulate or (["tiny"] if args.cpu else ["70b"]):
        for base in args.bases:
            for line in simulated_export_memory(args, shape, base):
                print(line, flush=True)
    return 0
