"""Where a training step's GPU time goes: a few steps under ``torch.profiler``, the top kernels, and the kernel time
sorted into categories (GEMM, attention, elementwise/copy/cast, reductions, optimizer, other)."""

from __future__ import annotations

import torch

from _models import sync


def profile_steps(name: str, step, device: str, args) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(f"\n--- profile: {name}, {args.profile_steps} steps, top kernels/ops by {key} ---")
    try:
        print(events.table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=70))
    except (AttributeError, KeyError, ValueError):
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.profile_rows, max_name_column_width=70))
    if device.startswith("cuda"):
        def device_us(e) -> float:
            return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        groups = {"gemm": 0.0, "attention": 0.0, "elementwise/copy/cast": 0.0, "reduction/norm": 0.0,
                  "optimizer": 0.0, "other": 0.0}
        for e in events:
            n = e.key.lower()
            t = device_us(e)
            if t <= 0 or e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            if any(s in n for s in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")):
                groups["gemm"] += t
            elif any(s in n for s in ("flash", "fmha", "attention", "sdpa", "efficient_attention")):
                groups["attention"] += t
            elif any(s in n for s in ("adam", "foreach", "multi_tensor")):
                groups["optimizer"] += t
            elif any(s in n for s in ("reduce", "norm", "softmax", "cross_entropy", "nll", "logsumexp")):
                groups["reduction/norm"] += t
            elif any(s in n for s in ("elementwise", "copy", "cast", "vectorized", "unrolled", "fill", "mul", "add")):
                groups["elementwise/copy/cast"] += t
            else:
                groups["other"] += t
        kernel_total = sum(groups.values())
        per_step = kernel_total / args.profile_steps / 1e3
        print(f"GPU kernel time per step {per_step:.1f} ms: " + ", ".join(
            f"{k} {g / args.profile_steps / 1e3:.1f} ms ({100 * g / max(kernel_total, 1):.0f}%)"
            for k, g in groups.items()))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _covered(interval: tuple[float, float], union: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(interval[1], e) - max(interval[0], s)) for s, e in union)


def overlap_summary(trace_path: str, wall_ms: float) -> str:
    """One profiled step of a distributed run, from its Chrome trace: the compute kernels' busy time (their union),
    the collectives' (NCCL) kernel time and how much of it no compute kernel overlaps (exposed), and the wall time no
    kernel covers at all (host-bound gaps, waits). Why a rank is slower than one GPU: more compute time (contention
    with the collectives for SMs and memory bandwidth), exposed collectives, or gaps."""
    import json

    events = json.load(open(trace_path)).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    comm = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()]
    compute_union = _union(compute)
    busy = sum(e - s for s, e in compute_union) / 1e3
    comm_total = sum(e - s for s, e in comm) / 1e3
    exposed = sum((e - s) - _covered((s, e), compute_union) for s, e in _union(comm)) / 1e3
    all_union = _union(compute + comm)
    covered = sum(e - s for s, e in all_union) / 1e3
    names: dict[str, float] = {}
    for e in kernels:
        if "nccl" in e["name"].lower():
            names[e["name"][:60]] = names.get(e["name"][:60], 0.0) + e["dur"] / 1e3
    top = ", ".join(f"{n} {t:.1f} ms" for n, t in sorted(names.items(), key=lambda x: -x[1])[:4])
    return (f"step wall {wall_ms:.1f} ms: compute kernels busy {busy:.1f} ms, collectives {comm_total:.1f} ms "
            f"(exposed {exposed:.1f} ms), no kernel running {max(0.0, wall_ms - covered):.1f} ms; collectives: {top}")
