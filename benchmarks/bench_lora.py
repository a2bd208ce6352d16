#!/usr/bin/env python
"""LoRA/DoRA training throughput: lightning_lora against PEFT, in one process on one GPU.

Part 1 checks correctness before anything is timed, on a small random Llama with 1B shapes that gets identical
adapter weights (non-zero B, and for DoRA a perturbed magnitude) in PEFT and in lightning_lora; the logits, the loss
and the adapter gradients after one backward pass are compared, relative to PEFT's largest value:

* float32 base, TF32 off: the same math, so they must agree to ``--rtol`` (1e-3);
* bf16 base, each library's default adapters (float32 in both; PEFT casts the activations up to float32 for the
  adapter matmuls, we cast the adapter weights down to bf16), so they must agree to ``--bf16-rtol`` (0.1). Gradients
  that flow back through a bf16 network carry its rounding: PEFT's own bf16-adapter path lands 3-6% (of the largest
  value) from its default on 1B shapes, and the script prints that yardstick beside each row.

A disagreement makes the script exit with status 1 (after the timings, unless ``--fail-fast``).

Part 2 times training steps (forward with HF's own causal-LM loss, backward, fused AdamW on the trainable parameters)
on random-weight Llama-3.2-1B shapes in bf16 with sdpa attention, and reports the median tokens/s over the timed
steps, the peak allocated memory and the time from adapter setup to the end of the first step (compilation included).
Every variant builds a fresh model from the same seed and feeds the same batch; models are freed between variants.

Adapter dtype: both libraries now keep adapter weights in float32 over a bf16 base by default (PEFT through
``autocast_adapter_dtype=True``, lightning_lora through ``adapter_dtype()``), but compute differently: PEFT casts each
adapted layer's input up to float32 and runs the adapter matmuls in float32, we cast the adapter weights down to bf16
and accumulate the update into the base GEMM's output (``addmm_``). The "(bf16 adapters)" variants store the adapter
weights in bf16 instead (PEFT: ``autocast_adapter_dtype=False``; ours: the script casts them after ``inject``), for
contrast: faster or not, bf16 adapter weights lose most small AdamW updates.

    python benchmarks/bench_lora.py                  # the full GPU run (Llama-3.2-1B shapes, batch 4 x 2048)
    python benchmarks/bench_lora.py --tiny           # a CPU smoke run with tiny shapes
"""

from __future__ import annotations

import argparse
import copy
import gc

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Cold compiles for every compiled variant: without this, a later variant whose graphs match an earlier one's
# (LoRA's math is the same in both libraries) reuses Inductor's on-disk caches and its first step looks cheap.
if "--warm-cache" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402


import lightning_lora as ll  # noqa: E402
from lightning_lora import surgery  # noqa: E402

# Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json), random weights.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=64)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=256, head_dim=16)


def llama_config(shapes: dict, layers: int | None):
    from transformers import LlamaConfig

    kw = dict(shapes)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return LlamaConfig(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_base(config, dtype: torch.dtype, device: str, seed: int) -> nn.Module:
    """A random-weight LlamaForCausalLM built directly on ``device`` (same seed -> same weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def wrap_peft(model: nn.Module, method: str, r: int, alpha: float, bf16_adapters: bool = False) -> nn.Module:
    """``get_peft_model``; by default (``autocast_adapter_dtype=True``) it upcasts bf16 adapter weights to float32."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                        use_dora=(method == "dora"), task_type="CAUSAL_LM")
    return get_peft_model(model, config, autocast_adapter_dtype=not bf16_adapters)


def wrap_ours(model: nn.Module, method: str, r: int, alpha: float, bf16_adapters: bool = False,
              random_b: bool = False) -> nn.Module:
    """``inject`` with the library's defaults (float32 adapter weights over a half-precision base); ``bf16_adapters``
    casts the adapter parameters to bfloat16 afterwards, for contrast."""
    ll.inject(model, ll.AdapterConfig.create(method, r=r, alpha=alpha, target_modules="all-linear",
                                             init_weights=False if random_b else True))
    if bf16_adapters:
        for p in surgery.adapter_parameters(model):
            p.data = p.data.to(torch.bfloat16)
    return model


def param_dtypes(params) -> str:
    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    return "+".join(sorted({names.get(str(p.dtype), str(p.dtype)) for p in params}))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------------
# Part 1: correctness against PEFT
# ---------------------------------------------------------------------------------------------------------------------
def check_against_peft(method: str, args, device: str, base_dtype: torch.dtype = torch.float32) -> bool:
    """Ours (library defaults) against PEFT (its default, float32 adapters) with identical adapter weights."""
    half = base_dtype != torch.float32
    label = f"{method}, {'bf16' if half else 'fp32'} base"
    rtol = args.bf16_rtol if half else args.rtol
    config = llama_config(TINY if args.tiny else LLAMA_1B, args.check_layers)
    base = build_base(config, base_dtype, device, seed=1)
    ours = wrap_ours(copy.deepcopy(base), method, args.r, args.alpha, random_b=True)
    peft = wrap_peft(copy.deepcopy(base), method, args.r, args.alpha)
    # the yardstick on a bf16 base: PEFT with bf16 adapter weights against PEFT's default
    peft_bf16 = wrap_peft(copy.deepcopy(base), method, args.r, args.alpha, bf16_adapters=True) if half else None
    del base
    ours_layers = {path: layer.adapters["default"] for path, layer in ll.adapters(ours).items()}  # update modules
    inner = peft.base_model.model
    peft_paths = {n for n, m in inner.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}
    if set(ours_layers) != peft_paths:
        print(f"[check {label}] FAIL: targets differ: only ours {sorted(set(ours_layers) - peft_paths)}, "
              f"only PEFT {sorted(peft_paths - set(ours_layers))}")
        return False
    names = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if method == "dora" else [])

    def peft_tensor(model: nn.Module, path: str, name: str) -> torch.Tensor:
        return getattr(model.base_model.model.get_submodule(path), name)["default"].weight

    def ours_tensor(path: str, name: str) -> torch.Tensor:
        t = getattr(ours_layers[path], name)
        return t.weight if isinstance(t, nn.Linear) else t

    gen = torch.Generator(device="cpu").manual_seed(2)
    with torch.no_grad():
        for path, layer in ours_layers.items():
            if method == "dora":  # move m away from ||W0 + sBA|| so the magnitude path is exercised
                noise = 1 + 0.1 * torch.randn(layer.lora_magnitude_vector.shape, generator=gen)
                layer.lora_magnitude_vector.mul_(noise.to(device))
            for name in names:
                for other in (peft, peft_bf16):
                    if other is not None:
                        peft_tensor(other, path, name).copy_(ours_tensor(path, name))
    ours_params = list(surgery.adapter_parameters(ours))
    peft_params = [p for p in peft.parameters() if p.requires_grad]
    n_ours, n_peft = surgery.parameter_counts(ours)[0], sum(p.numel() for p in peft_params)
    dt_ours, dt_peft = param_dtypes(ours_params), param_dtypes(peft_params)

    ids = torch.randint(3, config.vocab_size, (args.check_batch, args.check_seq), generator=gen).to(device)

    def forward_backward(model: nn.Module, tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {(path, name): tensor(path, name).grad for path in ours_layers for name in names}
        return out.logits.detach(), out.loss.detach(), grads

    def rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
        """max|a - b|, that relative to max|b|, and ||a - b|| / ||b|| (L2 over the whole tensor)"""
        a, b = a.detach().float(), b.detach().float()
        diff = (a - b).abs().max().item()
        l2 = torch.linalg.vector_norm(a - b).item() / max(torch.linalg.vector_norm(b).item(), 1e-30)
        return diff, diff / max(b.abs().max().item(), 1e-30), l2

    def compare(mine, theirs) -> list[tuple[str, float, float, float]] | str:
        rows = [("logits", *rel(mine[0], theirs[0])), ("loss", *rel(mine[1], theirs[1]))]
        for name in names:
            worst = (0.0, 0.0, 0.0)
            for path in ours_layers:
                a, b = mine[2][(path, name)], theirs[2][(path, name)]
                if a is None or b is None:
                    return f"no gradient for {path}.{name}"
                worst = max(worst, rel(a, b), key=lambda t: t[1])
            rows.append((f"grad {name}", *worst))
        return rows

    res_ours = forward_backward(ours, ours_tensor)
    res_peft = forward_backward(peft, lambda path, name: peft_tensor(peft, path, name))
    rows = compare(res_ours, res_peft)
    yard = None
    if peft_bf16 is not None:
        yard = compare(forward_backward(peft_bf16, lambda path, name: peft_tensor(peft_bf16, path, name)), res_peft)
    if isinstance(rows, str) or isinstance(yard, str):
        print(f"[check {label}] FAIL: {rows if isinstance(rows, str) else yard}")
        return False
    ok = n_ours == n_peft
    # on a half-precision base the library's default is float32 adapter weights, as PEFT's: check it still is
    dtype_ok = dt_ours == dt_peft == "fp32"
    ok &= dtype_ok
    print(f"[check {label}] {len(ours_layers)} adapted layers, trainable params ours {n_ours:,} ({dt_ours}) / "
          f"PEFT {n_peft:,} ({dt_peft}){'' if n_ours == n_peft and dtype_ok else '  MISMATCH'}")
    for i, (what, diff, relative, l2) in enumerate(rows):
        good = relative <= rtol
        ok &= good
        extra = ""
        if yard is not None:
            extra = f"  [PEFT bf16-adapters vs PEFT: {yard[i][2]:.1e}, L2 rel {yard[i][3]:.1e}]"
        print(f"[check {label}]   {what:26s} max|diff| {diff:.2e}  / max|PEFT| {relative:.2e}  {'ok' if good else 'FAIL'}"
              f" (rtol {rtol:g})  L2 rel {l2:.1e}{extra}")
    del ours, peft, peft_bf16, res_ours, res_peft
    gc.collect()
    return ok


# ---------------------------------------------------------------------------------------------------------------------
# Part 2: timing
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    lib: str  # "peft", "ours" or "full"
    method: str = "lora"
    compile: bool = False
    bf16_adapters: bool = False  # cast the adapter weights to bf16 (both libraries default to fp32)
    optional: bool = False


@dataclass
class Result:
    variant: Variant
    tokens_per_s: float = float("nan")
    step_ms: float = float("nan")
    spread_ms: float = float("nan")
    peak_gib: float = float("nan")
    first_step_s: float = float("nan")
    setup_s: float = float("nan")
    loss: float = float("nan")
    trainable: int = 0
    dtypes: str = ""
    graph_breaks: int = 0
    note: str = ""


def variants(args) -> list[Variant]:
    v = [
        Variant("PEFT eager", "peft"),
        Variant("ours eager", "ours"),
        Variant("PEFT compile", "peft", compile=True),
        Variant("ours compile", "ours", compile=True),
        Variant("DoRA PEFT eager", "peft", method="dora"),
        Variant("DoRA ours eager", "ours", method="dora"),
        Variant("ours eager (bf16 adapters)", "ours", bf16_adapters=True),
        Variant("PEFT eager (bf16 adapters)", "peft", bf16_adapters=True),
        Variant("full fine-tuning eager", "full", optional=True),
        Variant("DoRA ours compile", "ours", method="dora", compile=True, optional=True),
        Variant("ours compile (bf16 adapters)", "ours", compile=True, bf16_adapters=True, optional=True),
        Variant("PEFT compile (bf16 adapters)", "peft", compile=True, bf16_adapters=True, optional=True),
    ]
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        v = [x for x in v if x.name.lower() in wanted]
    if args.no_compile:
        v = [x for x in v if not x.compile]
    return v


def flops_per_token(config, seq: int, lib: str, r: int = 16) -> float:
    """Matrix FLOPs per trained token: forward 2N, backward 2N for input grads (+2N weight grads when the base
    trains), causal attention 2*T*d per layer forward and twice that backward, LoRA's own matmuls."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    n_linear = L * sum(a * b for a, b in per_layer) + h * config.vocab_size  # lm_head included
    attention = 3 * 2 * seq * h * L
    if lib == "full":
        return 6 * n_linear + attention
    lora = 3 * 2 * r * L * sum(a + b for a, b in per_layer)
    return 4 * n_linear + attention + lora


def measure_matmul_tflops(device: str) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 2 * n ** 3 * 20 / (time.perf_counter() - t) / 1e12


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_variant(v: Variant, args, config, ids: torch.Tensor, device: str) -> Result:
    res = Result(v)
    free(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if v.compile and not args.warm_cache:  # a fresh kernel cache too, so each compile is cold
        fresh = tempfile.mkdtemp(prefix="bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
        os.environ["TRITON_CACHE_DIR"] = os.path.join(fresh, "triton")
    model = build_base(config, torch.bfloat16, device, seed=0)
    sync(device)
    t0 = time.perf_counter()
    if v.lib == "peft":
        model = wrap_peft(model, v.method, args.r, args.alpha, v.bf16_adapters)
    elif v.lib == "ours":
        model = wrap_ours(model, v.method, args.r, args.alpha, v.bf16_adapters)
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    res.trainable = sum(p.numel() for p in params)
    res.dtypes = param_dtypes(params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))
    fn = torch.compile(model, dynamic=False) if v.compile else model
    sync(device)
    res.setup_s = time.perf_counter() - t0

    def step() -> torch.Tensor:
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    sync(device)
    res.first_step_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        step()
    times = []
    for _ in range(args.steps):
        sync(device)
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    res.loss = loss.float().item()
    med = statistics.median(times)
    res.step_ms, res.spread_ms = med * 1e3, (max(times) - min(times)) * 1e3
    res.tokens_per_s = ids.numel() / med
    if device.startswith("cuda"):
        res.peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    res.graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) if v.compile else 0

    if args.profile and not v.compile and v.method == "lora" and v.lib != "full":
        profile_steps(v, step, device, args)
    del fn, model, opt, params
    if v.compile:
        torch._dynamo.reset()
    free(device)
    return res


def profile_steps(v: Variant, step, device: str, args) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(f"\n--- profile: {v.name}, {args.profile_steps} steps, top kernels/ops by {key} ---")
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


def fmt(x: float, spec: str) -> str:
    return "—" if x != x else format(x, spec)


def table(results: list[Result], config, args, peak_tflops: float | None) -> str:
    base = next((r for r in results if r.variant.name == "PEFT eager" and r.tokens_per_s == r.tokens_per_s), None)
    lines = ["| variant | trainable dtype | tokens/s | vs PEFT eager | step ms (median, spread) | peak GiB "
             "| first step s (setup s) | trainable params | final loss | notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        v = r.variant
        # the trainable parameters' dtype as found, and the dtype the adapter matmuls run in
        dtype = r.dtypes or "—"
        if v.lib == "peft":
            dtype += f" ({r.dtypes} matmuls)" if r.dtypes else ""
        elif v.lib == "ours":
            dtype += " (bf16 matmuls)" if r.dtypes else ""
        else:
            dtype = f"{r.dtypes} (all weights)" if r.dtypes else "—"
        rel = fmt(r.tokens_per_s / base.tokens_per_s, ".2f") + "x" if base else "—"
        notes = [r.note] if r.note else []
        if v.compile:
            notes.append(f"{r.graph_breaks} graph breaks")
        if peak_tflops:
            roof = peak_tflops * 1e12 / flops_per_token(config, args.seq, v.lib, args.r)
            notes.append(f"{100 * r.tokens_per_s / roof:.0f}% of {roof / 1e3:.0f}k roofline")
        lines.append(f"| {v.name} | {dtype} | {fmt(r.tokens_per_s / 1e3, '.1f')}k | {rel} | "
                     f"{fmt(r.step_ms, '.1f')} ({fmt(r.spread_ms, '.1f')}) | {fmt(r.peak_gib, '.1f')} | "
                     f"{fmt(r.first_step_s, '.1f')} ({fmt(r.setup_s, '.1f')}) | {r.trainable:,} | "
                     f"{fmt(r.loss, '.4f')} | {'; '.join(notes)} |")
    return "\n".join(lines)


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
    p.add_argument("--only", default="", help="comma-separated variant names to time (default all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds: optional variants are skipped once the run is past this (default 480)")
    p.add_argument("--warm-cache", action="store_true",
                   help="let compiled variants reuse Inductor's on-disk caches (default: off, so compiles are cold)")
    p.add_argument("--profile", action="store_true", help="profile a few steps of each eager LoRA variant")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=20)
    args = p.parse_args()
    started = time.perf_counter()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY if args.tiny else LLAMA_1B
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (32 if args.tiny else 2048)
    args.steps = args.steps or (3 if args.tiny else 10)
    if args.tiny:
        args.check_seq = min(args.check_seq, 32)

    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"python {sys.version.split()[0]}")
    if device.startswith("cuda"):
        print(f"device {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f}"
              f" GiB), CUDA {torch.version.cuda}")
    else:
        print(f"device {device}")

    ok = True
    if not args.skip_check:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the checks compare float32 math, not TF32 rounding
        for base_dtype in (torch.float32, torch.bfloat16):
            for method in ("lora", "dora"):
                ok &= check_against_peft(method, args, device, base_dtype)
        torch.backends.cuda.matmul.allow_tf32 = prev
        free(device)
        print(f"[check] {'PASS' if ok else 'FAIL'} ({time.perf_counter() - started:.0f} s so far)")
        if not ok and args.fail_fast:
            return 1

    config = llama_config(shapes, args.layers)
    peak_tflops = measure_matmul_tflops(device) if device.startswith("cuda") else None
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
    if any(v.compile for v in chosen):  # start Inductor's worker pool and imports outside any variant's first step
        t = time.perf_counter()
        torch.compile(lambda x: torch.nn.functional.silu(x) * 2)(torch.randn(64, device=device))
        print(f"compiler warm-up: {time.perf_counter() - t:.1f} s")
    results: list[Result] = []
    for v in chosen:
        elapsed = time.perf_counter() - started
        if v.optional and elapsed > args.time_budget - (120 if v.compile else 30):
            print(f"skip {v.name}: {elapsed:.0f} s elapsed, budget {args.time_budget:.0f} s")
            continue
        try:
            r = run_variant(v, args, config, ids, device)
        except Exception as exc:  # one failing variant must not lose the others' numbers
            r = Result(v, note=f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            torch._dynamo.reset()
            free(device)
        results.append(r)
        print(f"{v.name}: {fmt(r.tokens_per_s, ',.0f')} tokens/s, {fmt(r.step_ms, '.1f')} ms/step, "
              f"peak {fmt(r.peak_gib, '.2f')} GiB, first step {fmt(r.first_step_s, '.1f')} s, "
              f"loss {fmt(r.loss, '.4f')} {r.note} [{time.perf_counter() - started:.0f} s]")

    print()
    print(table(results, config, args, peak_tflops))
    print(f"\ncorrectness vs PEFT: {'PASS' if ok else 'FAIL'}; total {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
