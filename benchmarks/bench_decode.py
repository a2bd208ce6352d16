#!/usr/bin/env python
"""Decode cost of adapters: HF ``generate``, batch 1, greedy, on random-weight Llama-3.2-1B shapes in bf16: the base
model, PEFT's LoRA unmerged, ours unmerged, ours merged (and PEFT merged), in one process on one card.

Correctness first: every adapted variant gets the same LoRA weights (B non-zero, so the adapter changes the output);
on a float32 copy of the model (``--check-layers`` decoder layers) our greedy tokens must equal PEFT's, unmerged and
merged, and the prompt's logits must agree to ``--rtol``; on the timed bf16 model the prompt's logits of ours and
PEFT's are compared relative to PEFT's largest value (bf16 rounding: up to ``--bf16-rtol``) and the share of equal
greedy tokens is printed (random weights give near-ties, so bf16 paths may part after a while; not a failure).

"ours unmerged, bf16 adapters" is the serving recipe: the same adapters cast to the activations' dtype
(``served_in``: the adapter parameters only; ``model.to(torch.bfloat16)`` would also cast HF's float32 rotary
``inv_freq`` buffer and change the base's outputs); its prompt logits must equal the float32 adapters' bit for bit (tolerance 0: the forward
rounds A and B to bf16 either way), and then the decode plan keeps no copies and a compiled step casts nothing.

Timing: ``--new-tokens`` tokens after a ``--prompt``-token prompt, ``min_new_tokens`` forcing the full length, KV cache
on; each variant runs ``--rounds`` times after one warm-up and the best round counts: ms per generated token (the
prompt's prefill included, amortized). Every row names its card and its ratio to the base row of the same run.

``--compiled`` adds rows run as a server would to take the host out: HF's static-cache ``generate``
(``cache_implementation="static"``) with its forward compiled (``CompileConfig``: Inductor, ``mode="reduce-overhead"``,
so CUDA graphs), for the base, for ours unmerged and for ours unmerged with bf16 adapters (float32 adapters cost two
cast kernels per layer and step in the GEMM form), and the last once more with ``lora.DECODE_ROWS = 0``: LoRA's two
GEMMs per layer instead of ``lora.decode_update``'s reductions, which Inductor fuses with their neighbours; the
compiled rows' ratios are to the compiled base. On the CPU (``--tiny``) it compiles with the "eager" backend, only to check that the path runs.

``--overhead``: the host cost of one adapted layer alone (batch-1 decoding is bound by it): microseconds per call of
an ``nn.Linear`` and of the same layer with unmerged LoRA (1 and 2 adapters active, dropout configured in eval mode,
merged, and the general path that a forward hook on the update forces), tiny shapes (``--overhead-features``, one
token) without autograd, the variants interleaved over ``--overhead-rounds`` rounds with the best counting (CPU: the
thread's CPU time, so other processes' load counts less), and the ATen operators of one call of each; then the same
inside a model: one decode step (KV cache, one token) of a tiny-width Llama with the 1B's 16 layers (112 adapted
linears), base vs ours unmerged and merged, whose difference per adapted layer includes the cold caches of a real
forward (on a GPU the kernels are tiny, so this is the host's time).

    python benchmarks/bench_decode.py                # the GPU run
    python benchmarks/bench_decode.py --compiled     # ... plus the static-cache compiled pair
    python benchmarks/bench_decode.py --tiny         # a CPU smoke run with tiny shapes
    python benchmarks/bench_decode.py --overhead     # host cost per adapted layer (CPU, or --device cuda)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora import surgery  # noqa: E402
from lightning_lora.methods import lora as lora_method  # noqa: E402
from _models import (  # noqa: E402
    LLAMA_1B, TINY, build_base, copy_adapters_to_peft, describe_run, device_name, free, llama_config, sync, wrap_peft,
)

NAMES = ["lora_A", "lora_B"]
GEMM_FORM = "GEMM form (DECODE_ROWS=0)"  # compiled decoding with LoRA's two GEMMs, as before lora.decode_update


def adapted_pair(base, args):
    """(ours, PEFT) over copies of ``base`` with the same random LoRA weights (B scaled so the adapter matters)."""
    ours = copy.deepcopy(base)
    ll.inject(ours, ll.AdapterConfig.create("lora", r=args.r, alpha=args.alpha, target_modules="all-linear",
                                           init_weights=False))
    with torch.no_grad():
        for layer in ll.adapters(ours).values():
            layer.adapters["default"].lora_B.weight.mul_(args.b_scale)
    peft = wrap_peft(copy.deepcopy(base), "lora", args.r, args.alpha)
    copy_adapters_to_peft(ours, peft, NAMES)
    return ours.eval(), peft.eval()


def served_in(model, dtype: torch.dtype):
    """The serving recipe: ``model``'s adapter parameters cast to ``dtype`` (the activations'), nothing else."""
    for p in surgery.adapter_parameters(model):
        p.data = p.data.to(dtype)
    return model


def greedy(model, ids, new_tokens: int, **generate_options) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **generate_options)


def static_compiled(device: str) -> dict:
    """``generate`` options for HF's static KV cache with the decoding forward compiled: on CUDA with Inductor's
    CUDA graphs (``reduce-overhead``), on the CPU with the "eager" backend (a check that the path runs, not a timing)."""
    from transformers import CompileConfig

    if device.startswith("cuda"):
        config = CompileConfig(backend="inductor", mode="reduce-overhead")
    else:
        config = CompileConfig(backend="eager", mode=None)
        config._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless told
    return dict(cache_implementation="static", compile_config=config)


@torch.no_grad()
def prompt_logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(args, device: str) -> bool:
    """float32: our greedy tokens equal PEFT's, unmerged and merged; prompt logits within ``--rtol``."""
    config = llama_config(TINY if args.tiny else LLAMA_1B, args.check_layers)
    base = build_base(config, torch.float32, device, seed=1).eval()
    ours, peft = adapted_pair(base, args)
    ids = torch.randint(3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(3)).to(device)
    ok = True
    theirs, their_logits = greedy(peft, ids, args.check_tokens), prompt_logits(peft, ids)
    for label in ("unmerged", "merged"):
        if label == "merged":
            ll.merge(ours)
            peft.merge_adapter()
            theirs, their_logits = greedy(peft, ids, args.check_tokens), prompt_logits(peft, ids)
        mine = greedy(ours, ids, args.check_tokens)
        same = torch.equal(mine, theirs)
        r = rel(prompt_logits(ours, ids), their_logits)
        good = same and r <= args.rtol
        ok &= good
        print(f"[check fp32 {label}] greedy tokens {'equal' if same else 'DIFFER'} to PEFT's "
              f"({args.check_tokens} tokens), prompt logits max rel diff {r:.1e} (rtol {args.rtol:g}) "
              f"{'ok' if good else 'FAIL'}")
    base_logits = prompt_logits(base, ids)
    print(f"[check fp32] the adapter changes the logits by {rel(their_logits, base_logits):.1e} of their largest value")
    del base, ours, peft
    free(device)
    return ok


def time_generate(model, ids, args, device: str, **generate_options) -> tuple[float, torch.Tensor]:
    out = greedy(model, ids, args.new_tokens, **generate_options)  # warm-up (allocator, kernels; compiles)
    best = float("inf")
    for _ in range(args.rounds):
        sync(device)
        t = time.perf_counter()
        out = greedy(model, ids, args.new_tokens, **generate_options)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best * 1e3 / args.new_tokens, out


class AtenOps(TorchDispatchMode):
    """Records the ATen operators a block of code runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket).removeprefix("aten."))
        return func(*args, **(kwargs or {}))


def overhead_layers(features: int, r: int, dtype: torch.dtype, device: str) -> dict[str, torch.nn.Module]:
    """One ``features x features`` linear layer per variant (same weights), in eval mode."""
    def layer(adapters: int = 1, dropout: float = 0.0, merged: bool = False, hook: bool = False,
              cast: bool = False) -> torch.nn.Module:
        torch.manual_seed(0)
        holder = torch.nn.Sequential(torch.nn.Linear(features, features, bias=False, device=device, dtype=dtype))
        if adapters:
            for i in range(adapters):
                ll.inject(holder, ll.AdapterConfig.create("lora", r=r, target_modules=["0"], dropout=dropout,
                                                          init_weights=False), name=f"a{i}")
            surgery.set_active_adapters(holder, [f"a{i}" for i in range(adapters)])
            if merged:
                ll.merge(holder)
            if hook:
                holder[0].adapters["a0"].register_forward_hook(lambda *_: None)
            if cast:
                served_in(holder, dtype)
        return holder.eval()[0]

    return {
        "nn.Linear (base)": layer(adapters=0),
        "LoRA unmerged": layer(),
        "LoRA unmerged, 2 adapters": layer(adapters=2),
        "LoRA unmerged, adapters in the activations' dtype": layer(cast=True),
        "LoRA unmerged, dropout 0.1, eval": layer(dropout=0.1),
        "LoRA merged": layer(merged=True),
        "LoRA unmerged, general path (no-op hook on the update)": layer(hook=True),
    }


@torch.no_grad()
def overhead(args, device: str) -> int:
    """Host microseconds per call of one adapted layer vs ``nn.Linear``, and the ATen operators of one call."""
    clock = time.thread_time if device == "cpu" else time.perf_counter
    card = device_name(device)
    print(f"overhead: 1 token x {args.overhead_features} features, LoRA r={args.r}, no autograd, "
          f"{args.overhead_calls} calls per round, best of {args.overhead_rounds} interleaved rounds, "
          f"{torch.get_num_threads()} CPU threads")
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        layers = overhead_layers(args.overhead_features, args.r, dtype, device)
        x = torch.randn(1, 1, args.overhead_features, device=device, dtype=dtype)
        best = dict.fromkeys(layers, float("inf"))
        for layer in layers.values():
            for _ in range(100):  # warm-up: the kept factors, the allocator
                layer(x)
        for _ in range(args.overhead_rounds):
            for name, layer in layers.items():
                sync(device)
                t = clock()
                for _ in range(args.overhead_calls):
                    layer(x)
                sync(device)
                best[name] = min(best[name], (clock() - t) / args.overhead_calls * 1e6)
        base_us = best["nn.Linear (base)"]
        fast, general = layers["LoRA unmerged"](x), layers["LoRA unmerged, general path (no-op hook on the update)"](x)
        same = torch.equal(fast, general)  # same weights (same seed): the decode plan must give the same bits
        print(f"[check {str(dtype).removeprefix('torch.')}] decode plan output equal to the general path's: {same}")
        ok &= same
        print(f"\n| layer ({str(dtype).removeprefix('torch.')}) | device | us/call | extra vs nn.Linear | ATen ops/call "
              "| ATen ops |")
        print("| --- | --- | ---: | ---: | ---: | --- |")
        for name, layer in layers.items():
            with AtenOps() as recorded:
                layer(x)
            ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in Counter(recorded.names).items())
            print(f"| {name} | {card} | {best[name]:.2f} | {best[name] - base_us:+.2f} | {len(recorded.names)} "
                  f"| {ops} |")
    overhead_in_model(args, device, clock)
    print(f"\ncorrectness: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


@torch.no_grad()
def overhead_in_model(args, device: str, clock) -> None:
    """ms per decode step of a tiny-width 16-layer Llama (bf16, LoRA on all 112 linears), interleaved rounds."""
    config = llama_config(TINY, 16)
    base = build_base(config, torch.bfloat16, device, seed=0).eval()
    ours = copy.deepcopy(base)
    ll.inject(ours, ll.AdapterConfig.create("lora", r=args.r, alpha=args.alpha, target_modules="all-linear",
                                           init_weights=False))
    merged = copy.deepcopy(ours)
    ll.merge(merged)
    prompt = torch.randint(3, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)

    def step_of(model):
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def step() -> None:
            model(input_ids=token, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # back to the prompt: every step sees the same cache length
        return step

    served = served_in(copy.deepcopy(ours), torch.bfloat16)
    steps = {"base": step_of(base), "ours unmerged": step_of(ours), "ours unmerged, bf16 adapters": step_of(served),
             "ours merged": step_of(merged)}
    best = dict.fromkeys(steps, float("inf"))
    for step in steps.values():
        for _ in range(5):
            step()
    calls = max(1, args.overhead_calls // 100)
    for _ in range(args.overhead_rounds):
        for name, step in steps.items():
            sync(device)
            t = clock()
            for _ in range(calls):
                step()
            sync(device)
            best[name] = min(best[name], (clock() - t) / calls * 1e3)
    layers = len(ll.adapters(ours))
    print(f"\n| one decode step, 16-layer Llama, hidden {config.hidden_size}, bf16 | device | ms/step (best of "
          f"{args.overhead_rounds}) | extra per adapted layer ({layers}) |")
    print("| --- | --- | ---: | ---: |")
    for name, ms in best.items():
        print(f"| {name} | {device_name(device)} | {ms:.3f} | {(ms - best['base']) / layers * 1e3:+.2f} us |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the 1B's 16)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--b-scale", type=float, default=0.02, help="B's random init is scaled by this (default 0.02)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per round (default 128)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds per variant; the best counts (default 4)")
    p.add_argument("--check-layers", type=int, default=2)
    p.add_argument("--check-tokens", type=int, default=16)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--bf16-rtol", type=float, default=0.1)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--compiled", action="store_true",
                   help="add the static-cache compiled (CUDA graphs) rows: base, ours unmerged (float32 and bf16 "
                        "adapters)")
    p.add_argument("--overhead", action="store_true", help="only the host cost per adapted layer (see above)")
    p.add_argument("--overhead-features", type=int, default=64)
    p.add_argument("--overhead-calls", type=int, default=2000)
    p.add_argument("--overhead-rounds", type=int, default=15)
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.overhead:
        if device == "cpu":
            torch.set_num_threads(1)  # tiny matmuls: one thread, no pool wake-ups
        return overhead(args, device)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    print(describe_run(device))
    ok = True
    if not args.skip_check:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        ok = check(args, device)
        torch.backends.cuda.matmul.allow_tf32 = prev

    config = llama_config(TINY if args.tiny else LLAMA_1B, args.layers)
    base = build_base(config, torch.bfloat16, device, seed=0).eval()
    ours, peft = adapted_pair(base, args)
    served = served_in(copy.deepcopy(ours), torch.bfloat16)
    ids = torch.randint(3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(4)).to(device)
    mine = prompt_logits(ours, ids)
    r = rel(mine, prompt_logits(peft, ids))
    ok &= r <= args.bf16_rtol
    print(f"[check bf16] prompt logits ours vs PEFT: max rel diff {r:.1e} (rtol {args.bf16_rtol:g}) "
          f"{'ok' if r <= args.bf16_rtol else 'FAIL'}")
    same = torch.equal(prompt_logits(served, ids), mine)
    ok &= same
    print(f"[check bf16 adapters] prompt logits equal to float32 adapters' bit for bit (tolerance 0): "
          f"{'ok' if same else 'FAIL'}")
    print(f"timing: {config.num_hidden_layers} layers, hidden {config.hidden_size}, bf16, sdpa, batch 1, prompt "
          f"{args.prompt}, {args.new_tokens} new tokens, best of {args.rounds} rounds, LoRA r={args.r} on all "
          f"{len(ll.adapters(ours))} linear layers")

    compiled = "static cache, compiled"
    decode_rows = lora_method.DECODE_ROWS
    variants = [
        ("base", base, None, {}),
        ("PEFT unmerged", peft, None, {}),
        ("ours unmerged", ours, None, {}),
        ("ours unmerged, bf16 adapters", served, None, {}),
        ("ours merged", ours, lambda: ll.merge(ours), {}),
        ("PEFT merged", peft, lambda: peft.merge_adapter(), {}),
    ]
    if args.compiled:
        variants += [(f"base, {compiled}", base, None, static_compiled(device)),
                     (f"ours unmerged, {compiled}", ours, lambda: ll.unmerge(ours), static_compiled(device)),
                     (f"ours unmerged, bf16 adapters, {compiled}", served, None, static_compiled(device)),
                     (f"ours unmerged, bf16 adapters, {compiled}, {GEMM_FORM}", copy.deepcopy(served),
                      lambda: setattr(lora_method, "DECODE_ROWS", 0), static_compiled(device))]
    rows: list[tuple[str, float, torch.Tensor]] = []
    for name, model, prepare, options in variants:
        if prepare is not None:
            prepare()
        ms, tokens = time_generate(model, ids, args, device, **options)
        rows.append((name, ms, tokens))
        print(f"{name}: {ms:.2f} ms/token", flush=True)
    lora_method.DECODE_ROWS = decode_rows

    reference = {name: (ms, tokens) for name, ms, tokens in rows}
    card = device_name(device)
    twins = {"ours unmerged": "PEFT unmerged", "ours merged": "PEFT merged", "PEFT merged": "PEFT unmerged",
             "ours unmerged, bf16 adapters": "ours unmerged", f"base, {compiled}": "base",
             f"ours unmerged, {compiled}": "ours unmerged",
             f"ours unmerged, bf16 adapters, {compiled}": f"ours unmerged, {compiled}",
             f"ours unmerged, bf16 adapters, {compiled}, {GEMM_FORM}": f"ours unmerged, bf16 adapters, {compiled}"}
    print("\n| variant | device | ms/token (best of %d) | vs base | greedy tokens equal to |" % args.rounds)
    print("| --- | --- | ---: | ---: | --- |")
    for name, ms, tokens in rows:
        base_name = f"base, {compiled}" if compiled in name else "base"  # compiled rows: vs the compiled base
        twin = twins.get(name)
        equal = "—" if twin is None else (
            f"{twin}: {(tokens == reference[twin][1]).float().mean().item() * 100:.0f}% of positions")
        print(f"| {name} | {card} | {ms:.2f} | {ms / reference[base_name][0]:.2f}x vs {base_name} | {equal} |")
    print(f"\ncorrectness: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
