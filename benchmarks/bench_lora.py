#!/usr/bin/env python
"""LoRA/DoRA training throughput: lightning_lora against PEFT, in one process on one GPU.

Part 1 (``_check.py``) checks correctness before anything is timed: identical adapter weights in PEFT and in
lightning_lora on a small random Llama of the timed shapes; logits, loss and adapter gradients must agree (float32
base to ``--rtol``, bf16 base to ``--bf16-rtol`` with PEFT's own bf16 noise printed as the yardstick). A disagreement
makes the script exit with status 1 (after the timings, unless ``--fail-fast``).

Part 2 (``_timing.py``) times training steps (forward with HF's causal-LM loss, backward, fused AdamW on the trainable
parameters) on random-weight Llama-3.2-1B shapes in bf16 with sdpa attention: median tokens/s, peak memory, and the
time from adapter setup to the end of the first step (compilation included). Every variant builds a fresh model from
the same seed and feeds the same batch. Compiled rows: ``compile`` is ``torch.compile`` of the whole model;
``regional`` is the callback's own compile code (each decoder block); ``Trainer.fit`` rows run the real callback.
Each cold compiled row starts from an empty Inductor cache and writes the callback's compile cache file; its "warm
cache (new process)" row runs the same variant in a fresh process with another empty Inductor cache, loading that
file first: the second run of the same job. Every row names its card; ratios are against PEFT's rows of this run.

Adapter dtype: both libraries keep adapter weights in float32 over a bf16 base by default; PEFT runs the adapter
matmuls in float32, we cast the adapter weights to bf16 and accumulate into the base GEMM's output. The "(bf16
adapters)" rows store them in bf16 instead, for contrast.

    python benchmarks/bench_lora.py                  # the full GPU run (Llama-3.2-1B shapes, batch 4 x 2048)
    python benchmarks/bench_lora.py --tiny           # a CPU smoke run with tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _check import check_against_peft, check_fused_cross_entropy  # noqa: E402
from _models import LLAMA_1B, TINY, describe_run, free, llama_config  # noqa: E402
from _tables import fmt, training_table  # noqa: E402
from _timing import Result, Variant, flops_per_token, measure_matmul_tflops, run_variant  # noqa: E402

WARM = ", warm cache (new process)"


def variants(args) -> list[Variant]:
    v = [
        Variant("PEFT eager", "peft"),
        Variant("ours eager", "ours"),
        Variant("PEFT compile", "peft", compile="model"),
        Variant("ours compile", "ours", compile="model"),
        Variant("ours regional compile", "ours", compile="regional"),
        Variant("ours regional compile" + WARM, "ours", compile="regional", warm=True),
        Variant("ours Trainer.fit + LoRACallback", "ours", compile="fit"),
        Variant("ours Trainer.fit + LoRACallback" + WARM, "ours", compile="fit", warm=True),
        Variant("DoRA PEFT eager", "peft", method="dora"),
        Variant("DoRA ours eager", "ours", method="dora"),
        Variant("DoRA ours regional compile", "ours", method="dora", compile="regional"),
        Variant("ours regional compile + fused CE", "ours", compile="regional", fused_ce=True),
        Variant("ours eager + fused CE", "ours", fused_ce=True, optional=True),
        Variant("PEFT compile, dropout 0.05", "peft", compile="model", dropout=0.05, optional=True),
        Variant("ours regional compile, dropout 0.05", "ours", compile="regional", dropout=0.05, optional=True),
        Variant("ours regional compile + selective AC", "ours", compile="regional", sac=True, optional=True),
        Variant("ours regional compile, two training graphs", "ours", compile="regional", uniform_grad=False,
                optional=True),
        Variant("ours eager (bf16 adapters)", "ours", bf16_adapters=True, optional=True),
        Variant("PEFT eager (bf16 adapters)", "peft", bf16_adapters=True, optional=True),
        Variant("full fine-tuning eager", "full", optional=True),
        Variant("DoRA ours compile", "ours", method="dora", compile="model", optional=True),
    ]
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(";" if ";" in args.only else ",")]
        v = [x for x in v if x.name.lower() in wanted]
    if args.no_compile:
        v = [x for x in v if not x.compile]
    return v


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_warm(v: Variant, args, cache_file: str) -> Result:
    """``v`` in a new process (empty Inductor cache, nothing compiled in memory) that loads ``cache_file``, which
    the cold row of the same variant wrote: the second run of the same job."""
    cold = v.name[:-len(WARM)]
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, __file__, "--skip-check", "--only", cold, "--as-warm", "--load-cache", cache_file,
           "--json-out", out, "--steps", str(args.steps), "--warmup", str(args.warmup), "--r", str(args.r),
           "--alpha", str(args.alpha), "--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--layers", str(args.layers)] if args.layers else []
    cmd += ["--device", args.device] if args.device else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists(out):
        return Result(v, note=f"FAILED: warm process exited {done.returncode}: {done.stderr.strip()[-200:]}")
    data = json.loads(Path(out).read_text())
    return Result(v, **data)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke run): sets small defaults below")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--layers", type=int, default=None, help="decoder layers for timing (default 16, the 1B's)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, the first included (default 3)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--check-layers", type=int, default=2, help="decoder layers in the float32 correctness model")
    p.add_argument("--check-batch", type=int, default=2)
    p.add_argument("--check-seq", type=int, default=128)
    p.add_argument("--rtol", type=float, default=1e-3, help="max |ours - PEFT| / max |PEFT| allowed per tensor")
    p.add_argument("--bf16-rtol", type=float, default=0.1,
                   help="the same for the bf16-base check against PEFT's float32 adapters (default 0.1)")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--fail-fast", action="store_true", help="exit before timing when a check fails")
    p.add_argument("--only", default="", help="variant names to time, comma- (or semicolon-) separated (default all)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds: optional variants are skipped once the run is past this (default 540)")
    p.add_argument("--warm-cache", action="store_true",
                   help="let compiled variants reuse Inductor's on-disk caches (default: off, so compiles are cold)")
    p.add_argument("--profile", action="store_true", help="profile a few steps of each eager LoRA variant")
    p.add_argument("--profile-compiled", action="store_true", help="with --profile: the compiled LoRA variants too")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--as-warm", action="store_true", help=argparse.SUPPRESS)  # run_warm's child process
    p.add_argument("--load-cache", default="", help=argparse.SUPPRESS)
    p.add_argument("--save-cache", default="", help=argparse.SUPPRESS)
    p.add_argument("--json-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    started = time.perf_counter()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY if args.tiny else LLAMA_1B
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (32 if args.tiny else 2048)
    args.steps = args.steps or (3 if args.tiny else 10)
    if args.tiny:
        args.check_seq = min(args.check_seq, 32)
    print(describe_run(device))

    ok = True
    if not args.skip_check:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the checks compare float32 math, not TF32 rounding
        for base_dtype in (torch.float32, torch.bfloat16):
            for method in ("lora", "dora"):
                ok &= check_against_peft(method, args, device, base_dtype)
        ok &= check_fused_cross_entropy(args, device)
        torch.backends.cuda.matmul.allow_tf32 = prev
        free(device)
        print(f"[check] {'PASS' if ok else 'FAIL'} ({time.perf_counter() - started:.0f} s so far)")
        if not ok and args.fail_fast:
            return 1

    config = llama_config(shapes, args.layers)
    peak_tflops = measure_matmul_tflops(device) if device.startswith("cuda") and not args.as_warm else None
    if peak_tflops:
        print(f"bf16 8192^3 matmul: {peak_tflops:.0f} TFLOP/s; LoRA roofline at that rate: "
              f"{peak_tflops * 1e12 / flops_per_token(config, args.seq, 'ours', args.r) / 1e3:.0f}k tokens/s "
              f"({flops_per_token(config, args.seq, 'ours', args.r) / 1e9:.2f} GFLOP/token)")
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    print(f"timing: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}, "
          f"batch {args.batch} x {args.seq} tokens, r={args.r} alpha={args.alpha:g}, bf16, sdpa, "
          f"{args.warmup} warmup + {args.steps} timed steps")

    chosen = variants(args)
    if args.as_warm:
        for v in chosen:
            v.warm = True
    cache_root = tempfile.mkdtemp(prefix="bench_compile_cache_")
    results: list[Result] = []
    for v in chosen:
        elapsed = time.perf_counter() - started
        if v.optional and elapsed > args.time_budget - (120 if v.compile else 30):
            print(f"skip {v.name}: {elapsed:.0f} s elapsed, budget {args.time_budget:.0f} s")
            continue
        cache_file = os.path.join(cache_root, slug(v.name.replace(WARM, "")) + ".bin")
        try:
            if v.warm and not args.as_warm:
                r = run_warm(v, args, cache_file)
            else:
                if not args.as_warm:
                    args.save_cache = cache_file if v.compile in ("regional", "fit") else ""
                r = run_variant(v, args, config, ids, device)
        except Exception as exc:  # one failing variant must not lose the others' numbers
            r = Result(v, note=f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            torch._dynamo.reset()
            free(device)
        results.append(r)
        print(f"{v.name} [{r.device}]: {fmt(r.tokens_per_s, ',.0f')} tokens/s, {fmt(r.step_ms, '.1f')} ms/step, "
              f"peak {fmt(r.peak_gib, '.2f')} GiB, first step {fmt(r.first_step_s, '.1f')} s, "
              f"loss {fmt(r.loss, '.4f')} {r.note} [{time.perf_counter() - started:.0f} s]", flush=True)

    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results[0].to_json() if results else {}))
        return 0
    print()
    print(training_table(results, config, args, peak_tflops))
    print(f"\ncorrectness vs PEFT: {'PASS' if ok else 'FAIL (or skipped)' if not args.skip_check else 'skipped'}; "
          f"total {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
