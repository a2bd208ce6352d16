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
