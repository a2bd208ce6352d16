#!/usr/bin/env python
"""Many adapters on one base: a mixed batch of 4 LoRA adapters against a single-adapter batch, ours and PEFT's
(``adapter_names``, inference only), and the time to switch adapters (hot-swap, active set, merged weights).

Correctness first: on the same random-weight Llama and the same 4 adapters (saved by us, loaded by PEFT from our
PEFT-layout directory), the mixed batch's logits must match PEFT's mixed batch and each example run alone with its
adapter within ``--rtol`` (1e-3) of the largest logit, in float32 with TF32 off (the same math); the errors in the
benchmark dtype are printed beside them (bf16 rounds two summation orders apart by a few percent of the largest
logit). A disagreement exits with status 1 after the timings. Then it times forward (no grad) and forward+backward, median of ``--iters``.

    python benchmarks/bench_multi.py                         # GPU: Llama-3.2-1B shapes, bf16, 8 x 512 tokens
    python benchmarks/bench_multi.py --device cpu --shape tiny --dtype float32 --seq 128   # the CPU measurement
    python benchmarks/bench_multi.py --device cpu --shape host --dtype float32 --seq 8 --no-peft   # host time alone
    python benchmarks/bench_multi.py --profile          # + torch.profiler tables of each single and mixed step

The ``host`` shape is the 1B model's layers and adapted projections (112) at tiny widths: its time is the Python and
dispatch overhead of each forward, which is what a GPU run at 1B shapes waits on when the host is slow. A training
step zeroes the gradients first (``set_to_none``, as Lightning's loop does), so four adapters' gradients are new
tensors each step rather than accumulated into.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lightning_lora as ll  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096),
    "host": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
NAMES = ["default", "t1", "t2", "t3"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max(args.seq, 64), attn_implementation="sdpa", **SHAPES[args.shape])
    with torch.device(args.device):  # initialized where it runs: a 1B model's CPU init takes long (same seed each time)
        return LlamaForCausalLM(config).to(dtype=args.dtype).eval()


def timed(fn, args: argparse.Namespace) -> float:
    """Median milliseconds of ``fn`` over ``--iters`` calls after ``--warmup``."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.warmup):
        fn()
    sync()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def paired(fn_a, fn_b, args: argparse.Namespace) -> tuple[float, float, float]:
    """Median milliseconds of ``fn_a`` and ``fn_b`` timed in alternation, and the median of their per-pair ratio
    b / a: on a shared, loaded machine (the CPU run) the load drifts, and alternating cancels most of it."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.warmup):
        fn_a(), fn_b()
    a_times, b_times = [], []
    for _ in range(args.iters):
        for fn, times in ((fn_a, a_times), (fn_b, b_times)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    ratio = statistics.median(b / a for a, b in zip(a_times, b_times))
    return statistics.median(a_times), statistics.median(b_times), ratio


def profile(label: str, fn, args: argparse.Namespace) -> None:
    """Print torch.profiler's table of one call of ``fn`` (after ``--warmup`` calls): wall time, host (self CPU)
    and device totals, kernel count, and the ops by self device time (on the CPU: self CPU time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync()
        wall = (time.perf_counter() - start) * 1e3
    table = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in table) / 1e3
    device = sum(e.self_device_time_total for e in table) / 1e3
    kernels = sum(e.count for e in table if e.device_type.name == "CUDA")
    print(f"\n=== {label}: {wall:.2f} ms wall (profiled); host self total {host:.2f} ms; device self total "
          f"{device:.2f} ms; kernels {kernels}")
    print(table.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=args.profile_rows,
                      max_name_column_width=60))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=1e-3, help="of the largest logit, in the float32 check")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of each step")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    rtol = args.rtol
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False

    ours = build(args)
    for i, name in enumerate(NAMES):
        ll.inject(ours, dict(method="lora", r=args.rank, alpha=2 * args.rank, target_modules=TARGETS,
                             init_weights=False), seed=i + 1, name=name)
    with torch.no_grad():  # non-zero, distinct updates of a realistic size
        for layer in ll.adapters(ours).values():
            for update in layer.adapters.values():
                update.lora_B.weight.normal_(0, 0.02)
    gen = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    mixed = [NAMES[i % len(NAMES)] for i in range(args.batch)]
    report: dict[str, object] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                                 "shape": args.shape, "dtype": str(args.dtype), "batch": f"{args.batch}x{args.seq}",
                                 "rank": args.rank, "adapters": len(NAMES)}

    # -- correctness: in float32 (TF32 off), where both libraries do the same math; the benchmark dtype's errors are
    # reported beside it (bf16 rounds the two summation orders differently by a few percent of the largest logit) --
    check = tokens[:4, :64]
    check_names = ["default", "t2", None, "t3"]

    def mixed_and_alone(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            with ll.adapter_batch(model, check_names):
                got = model(check).logits
            alone = []
            for i, name in enumerate(check_names):
                if name is None:
                    with ll.disable_adapters(model):
                        alone.append(model(check[i:i + 1]).logits)
                else:
                    ll.set_active_adapters(model, name)
                    alone.append(model(check[i:i + 1]).logits)
        return got, torch.cat(alone)

    with tempfile.TemporaryDirectory() as tmp:
        ll.save_adapter(ours, Path(tmp) / "adapters")

        def peft_from_files(dtype: torch.dtype) -> nn.Module:
            import peft

            model = peft.PeftModel.from_pretrained(build(args).to(dtype), str(Path(tmp) / "adapters")).eval()
            for name in NAMES[1:]:
                model.load_adapter(str(Path(tmp) / "adapters" / name), adapter_name=name)
            return model

        names_for_peft = [n or "__base__" for n in check_names]
        for dtype in dict.fromkeys([torch.float32, args.dtype]):
            model = ours if dtype == args.dtype else copy.deepcopy(ours).to(dtype)
            got, alone = mixed_and_alone(model)
            tag = "" if dtype == torch.float32 else f"_{str(dtype).removeprefix('torch.')}"
            report[f"check_vs_alone{tag}"] = max_rel(got, alone)
            if not args.no_peft:
                theirs = peft_from_files(dtype)
                with torch.no_grad():
                    report[f"check_vs_peft{tag}"] = max_rel(got, theirs(check, adapter_names=names_for_peft).logits)
                del theirs
            if model is not ours:
                del model
        ok = all(v <= rtol for k, v in report.items() if k in ("check_vs_alone", "check_vs_peft"))
        peft_model = None if args.no_peft else peft_from_files(args.dtype)

    # -- timings -----------------------------------------------------------------------------------------------------
    def forward(model, **kw):
        with torch.no_grad():
            model(tokens, **kw)

    def train_step(model):
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()

    def in_mixed(fn):
        def run():
            with ll.adapter_batch(ours, mixed):
                fn()
        return run

    ll.set_active_adapters(ours, "default")
    single, mix, ratio = paired(lambda: forward(ours), in_mixed(lambda: forward(ours)), args)
    report.update(ours_single_ms=single, ours_mixed4_ms=mix, ours_mixed_over_single=ratio)
    single, mix, ratio = paired(lambda: train_step(ours), in_mixed(lambda: train_step(ours)), args)
    report.update(ours_train_single_ms=single, ours_train_mixed4_ms=mix, ours_train_mixed_over_single=ratio)
    if args.profile:
        profile("ours single forward", lambda: forward(ours), args)
        profile("ours mixed forward", in_mixed(lambda: forward(ours)), args)
        profile("ours single train step", lambda: train_step(ours), args)
        profile("ours mixed train step", in_mixed(lambda: train_step(ours)), args)
    ours.zero_grad(set_to_none=True)
    if peft_model is not None:
        peft_model.set_adapter("default")
        single, mix, ratio = paired(lambda: forward(peft_model), lambda: forward(peft_model, adapter_names=mixed), args)
        report.update(peft_single_ms=single, peft_mixed4_ms=mix, peft_mixed_over_single=ratio)
        del peft_model

    # -- switching ---------------------------------------------------------------------------------------------------
    report["hotswap_from_loaded_ms"] = timed(lambda: ll.hotswap_adapter(ours, "t1", name="t3"), args)
    with tempfile.TemporaryDirectory() as tmp:
        ll.save_adapter(ours, Path(tmp) / "a", names=["t2"])
        report["hotswap_from_file_ms"] = timed(lambda: ll.hotswap_adapter(ours, str(Path(tmp) / "a" / "t2"),
                                                                         name="t3", check_base=False), args)
    report["set_active_ms"] = timed(lambda: ll.set_active_adapters(ours, "t1"), args)
    ll.merge(ours)
    flip = iter(range(10**9))
    report["merged_switch_ms"] = timed(lambda: ll.set_active_adapters(ours, NAMES[next(flip) % 2]), args)
    kept = [layer.exact_base for layer in ll.adapters(ours).values() if layer.exact_base is not None]
    for device in sorted({str(t.device) for t in kept}):  # large weights keep theirs on the CPU, small on device
        report[f"exact_base_mib_{device}"] = sum(t.numel() * t.element_size() for t in kept
                                                 if str(t.device) == device) / 2**20
    report["adapted_weights_mib"] = sum(layer.weight.numel() * layer.weight.element_size()
                                        for layer in ll.adapters(ours).values()) / 2**20
    ll.unmerge(ours)
    report["correct"] = ok
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
