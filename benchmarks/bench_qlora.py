#!/usr/bin/env python
"""QLoRA training steps: lightning_lora on torchao NF4 / int4 bases against our bf16 LoRA and PEFT on bitsandbytes NF4.

Part 1 checks correctness before anything is timed, on a small random Llama with the chosen shapes (``--check-layers``
decoder layers): for each format, one training step through the quantized base must match a bf16 LoRA step on the
*dequantized* weights (the same math, so loss and adapter gradients agree to bf16 rounding, ``--rtol``), and the
distance to the bf16 LoRA step on the original weights (what quantization itself changes) is printed beside it.

Part 2 times training steps (forward with HF's causal-LM loss, backward, fused AdamW on the adapters) on random-weight
Llama shapes with LoRA on all seven projections: median tokens/s over the timed steps, time from building the model to
the end of the first step (compilation included) and peak allocated memory. Models are built on the meta device and
materialized one decoder layer at a time on the device, quantized there, so the full-precision base never exists on
the device at once. "compiled" compiles each decoder layer (``layer.compile()``). PEFT on bitsandbytes NF4 (the QLoRA
most users run) is timed in the same run when bitsandbytes imports; otherwise its row says why it is missing.

Formats: ``nf4`` (torchao NF4), ``int4`` (our packed layout, ``lightning_lora.int4``: two codes a byte, dequantized
by tensor ops that compile fuses), ``int4-intx`` (torchao's intx layout, a byte a code), ``int4-tile`` (torchao's
tinygemm layout, CUDA only, unpacked by a matmul with the identity: expect it slow).

``--callback-peak`` measures the other way in: the model built whole on the CPU in bf16 (as from_pretrained loads
it), then ``Trainer.fit`` with ``LoRACallback(quantize=...)``, which quantizes each adapted layer on the GPU before
Lightning moves the model there; it reports peak GPU memory at the end of the strategy's setup (the quantization and
the move) and after the training steps, beside the size of the dense bf16 base.

    python benchmarks/bench_qlora.py --shape 8b --grad-ckpt --batch 2 --seq 2048   # the issue's settings, on a GPU
    python benchmarks/bench_qlora.py --shape 8b --grad-ckpt --batch 2 --seq 2048 --callback-peak
    python benchmarks/bench_qlora.py --tiny                                        # CPU smoke run, tiny shapes
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora.quantize import (  # noqa: E402
    Int4Config,
    NF4Config,
    dequantize,
    quantize_base,
    quantized_layers,
)

SHAPES = {
    # meta-llama/Llama-3.2-1B and Llama-3.1-8B config.json, random weights
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, head_dim=64),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FORMATS = {"nf4": NF4Config(), "int4": Int4Config(group_size=128),
           "int4-intx": Int4Config(group_size=128, packing="intx"),
           "int4-tile": Int4Config(group_size=128, packing="tile_packed")}


def llama_config(shape: str, layers: int | None):
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape], rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return LlamaConfig(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")


def lora_options(args) -> dict:
    return {"method": "lora", "r": args.r, "alpha": args.alpha, "target_modules": PROJECTIONS}


@torch.no_grad()
def _materialize(module: nn.Module, device: str, generator: torch.Generator) -> None:
    """Give the meta parameters of ``module`` (not its children's) random values on ``device``, in their dtypes:
    norms at 1, everything else normal with std 0.02 (Llama's init; LoRA B too, so the adapter changes the loss)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.is_meta:
            value = torch.empty(param.shape, dtype=param.dtype, device=device)
            value.fill_(1.0) if param.dim() == 1 else value.normal_(0, 0.02, generator=generator)
            setattr(module, name, nn.Parameter(value, requires_grad=param.requires_grad))


def build(config, device: str, dtype: torch.dtype, args, quantize=None, seed: int = 0) -> nn.Module:
    """LlamaForCausalLM with LoRA, built on meta and materialized one module at a time on ``device``; each decoder
    layer's adapted projections are quantized right after they get values, before the next layer exists."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    ll.inject(model, lora_options(args), seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    for block in [*model.model.layers, model]:
        for module in block.modules():
            if block is model and any(module is m for layer in model.model.layers for m in layer.modules()):
                continue
            _materialize(module, device, generator)
        if quantize is not None and block is not model:
            quantize_base(block, quantize)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model.train()


def build_peft_bnb(config, device: str, args, seed: int = 0) -> nn.Module:
    """PEFT LoRA over bitsandbytes NF4 (double quantization, bf16 compute): the usual QLoRA recipe, with the same
    random weights drawn layer by layer as ``build``."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name in PROJECTIONS:
                    weight = torch.empty(child.weight.shape, dtype=torch.bfloat16, device=device).normal_(
                        0, 0.02, generator=generator)
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
                    setattr(parent, name, q.to(device))
        for module in layer.modules():
            _materialize(module, device, generator)
    for module in model.modules():
        _materialize(module, device, generator)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    model.requires_grad_(False)
    peft_config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=PROJECTIONS, lora_dropout=0.0)
    return get_peft_model(model, peft_config).train()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_fn(model: nn.Module, ids: torch.Tensor, compiled: bool, grad_ckpt: bool):
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compiled:
        for layer in model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers:
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=ids.is_cuda)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# -- part 1: correctness -----------------------------------------------------------------------------------------------
def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def grad_error(grads: dict, reference: dict) -> float:
    """The largest per-tensor ||g - ref|| / ||ref|| over the adapter gradients."""
    return max(((g - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)).item() for k, g in grads.items())


def check(args, device: str) -> tuple[bool, list[str]]:
    config = llama_config(args.shape, args.check_layers)
    ids = torch.randint(3, config.vocab_size, (args.check_batch, args.check_seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(1))
    ok, lines = True, []
    original = build(config, device, torch.bfloat16, args)
    base_loss, base_grads = loss_and_grads(original, ids)
    for name in args.formats:
        quantized = build(config, device, torch.bfloat16, args, quantize=FORMATS[name])
        loss, grads = loss_and_grads(quantized, ids)
        same_math = build(config, device, torch.bfloat16, args)  # bf16 LoRA over dequant(W): what QLoRA computes
        with torch.no_grad():
            for path, layer in quantized_layers(quantized).items():
                same_math.get_submodule(path).weight.copy_(dequantize(layer.weight, torch.bfloat16))
        ref_loss, ref_grads = loss_and_grads(same_math, ids)
        loss_err, g_err = abs(loss - ref_loss) / abs(ref_loss), grad_error(grads, ref_grads)
        passed = loss_err <= args.rtol and g_err <= args.grad_rtol
        ok &= passed
        lines.append(f"| {name} | {loss_err:.2e} | {g_err:.2e} | {abs(loss - base_loss) / abs(base_loss):.2e} | "
                     f"{grad_error(grads, base_grads):.2e} | {'ok' if passed else 'FAIL'} |")
        del quantized, same_math
        free(device)
    return ok, lines


# -- part 2: timing --------------------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    tokens_per_s: float | None = None
    first_step_s: float | None = None
    peak_gib: float | None = None
    note: str = ""
    profile: str = ""


# Kernel names -> where a step's device time goes (first match wins); the rest is "other".
KERNEL_CATEGORIES = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "matmul")),
    ("fused (Triton, from compile)", ("triton_",)),
    ("copies and casts", ("copy", "cast", "convert", "to_copy", "fill")),
]


def profile_steps(step, steps: int, top: int = 12) -> str:
    """Device time of ``steps`` steps split by kernel category, and the ``top`` kernels by device time (markdown)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()
               if e.device_time_total > 0]
    total = sum(ms for _, ms, _ in kernels) or 1.0
    split: dict[str, float] = {}
    for name, ms, _ in kernels:
        low = name.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")
        split[category] = split.get(category, 0.0) + ms
    lines = [f"device time per step {total:.1f} ms: " + ", ".join(
        f"{c} {ms:.1f} ms ({100 * ms / total:.0f}%)" for c, ms in sorted(split.items(), key=lambda kv: -kv[1]))]
    lines += ["", "| kernel | ms/step | calls/step |", "|---|---:|---:|"]
    for name, ms, count in sorted(kernels, key=lambda k: -k[1])[:top]:
        lines.append(f"| `{name[:90]}` | {ms:.2f} | {count} |")
    return "\n".join(lines)


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run(name: str, make, args, ids: torch.Tensor, device: str, compiled: bool) -> Result:
    free(device)
    start = time.perf_counter()
    try:
        model = make()
        step = step_fn(model, ids, compiled, args.grad_ckpt)
        step()
        sync(device)
        first = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            step()
        times = []
        for _ in range(args.steps):
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)
        profiled = profile_steps(step, args.profile_steps) if args.profile and device.startswith("cuda") else ""
    except Exception as err:  # one variant failing (no bitsandbytes kernel, out of memory) should not hide the rest
        return Result(name, note=f"failed: {type(err).__name__}: {str(err)[:120]}")
    finally:
        model = step = None
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
    return Result(name, ids.numel() / statistics.median(times), first, peak, profile=profiled)


def variants(args, config, device: str) -> list[tuple[str, object, bool]]:
    rows = []
    for compiled in ([False] if args.no_compile else [False, True]):
        how = "compiled" if compiled else "eager"
        rows.append((f"ours, bf16 base ({how})", lambda: build(config, device, torch.bfloat16, args), compiled))
        for name in args.formats:
            rows.append((f"ours, {name} base ({how})",
                         lambda n=name: build(config, device, torch.bfloat16, args, quantize=FORMATS[n]), compiled))
        rows.append((f"PEFT, bitsandbytes nf4 ({how})", lambda: build_peft_bnb(config, device, args), compiled))
    return rows


# -- the callback path's peak memory -----------------------------------------------------------------------------------
def build_dense_cpu(config, seed: int = 0) -> nn.Module:
    """LlamaForCausalLM in bf16 with random weights, whole on the CPU: what from_pretrained hands a Trainer."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        _materialize(module, "cpu", generator)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.train()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None


def callback_peak(args, device: str) -> list[str]:
    """Trainer.fit with LoRACallback(quantize=...) over a model that starts whole on the CPU; peak GPU memory at the
    end of setup (quantized layer by layer on the GPU, then moved) and after the steps."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl

    config = llama_config(args.shape, args.layers)
    marks: dict[str, float] = {}

    class Module(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def on_fit_start(self) -> None:  # after strategy.setup: quantized, moved, optimizers built
            sync(device)
            marks["setup_s"] = time.perf_counter() - marks["fit_start"]
            marks["setup_peak"] = peak_gib(device)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4,
                                     fused=device.startswith("cuda"))

    lines = []
    for name in [f for f in args.formats if f != "int4-tile"]:
        start = time.perf_counter()
        model = build_dense_cpu(config)  # each format from the original weights, as a resumed run would
        built = time.perf_counter() - start
        dense = sum(m.weight.numel() * 2 for n, m in model.named_modules() if isinstance(m, nn.Linear)
                    and n.rsplit(".", 1)[-1] in PROJECTIONS)
        if args.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # compile off: this measures memory, and the first step would be compilation time
        extra = {"compile": False} if "compile" in inspect.signature(ll.LoRACallback).parameters else {}
        callback = ll.LoRACallback(r=args.r, alpha=args.alpha, target_modules=PROJECTIONS, quantize=FORMATS[name],
                                   export_merged=False, export_dir=f"/tmp/bench_qlora_callback/{name}", **extra)
        ids = torch.randint(3, config.vocab_size, (args.peak_steps * args.batch, args.seq),
                            generator=torch.Generator().manual_seed(0))
        trainer = pl.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                             precision="bf16-true", max_steps=args.peak_steps,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback])
        free(device)
        marks["fit_start"] = time.perf_counter()
        module = Module(model)
        trainer.fit(module, torch.utils.data.DataLoader(list(ids), batch_size=args.batch))
        lines.append(f"| {name} | {len(quantized_layers(model))} | {dense / 2 ** 30:.1f} | "
                     f"{fmt(marks['setup_peak'], '.1f')} | {marks['setup_s']:.1f} | {fmt(peak_gib(device), '.1f')} | "
                     f"{built:.0f} |")
        print(f"# {lines[-1]}", file=sys.stderr, flush=True)
        del module, trainer, model, callback
        free(device)
    return ["| format | quantized layers | dense bf16 projections GiB | peak GiB after setup | setup s | peak GiB "
            f"after {args.peak_steps} steps | CPU build s |", "|---|---|---|---|---|---|---|", *lines]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, 2 steps, no compile: a smoke run")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--layers", type=int, default=None, help="decoder layers for timing (default: the shape's)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, the first included")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--formats", default="nf4,int4",
                   help="comma-separated: nf4, int4 (ours, packed), int4-intx, int4-tile (CUDA only)")
    p.add_argument("--callback-peak", action="store_true",
                   help="only: peak GPU memory of Trainer.fit with LoRACallback(quantize=...) from a CPU model (CUDA)")
    p.add_argument("--peak-steps", type=int, default=3, help="training steps of --callback-peak")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (HF, non-reentrant)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", action="store_true", help="after timing, profile steps of each variant (CUDA)")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--only", default="", help="variant names to run, separated by semicolons (default: all)")
    p.add_argument("--check-layers", type=int, default=2)
    p.add_argument("--check-batch", type=int, default=2)
    p.add_argument("--check-seq", type=int, default=256)
    p.add_argument("--rtol", type=float, default=1e-2, help="loss: |ours - bf16 LoRA on dequant(W)| / |that|")
    p.add_argument("--grad-rtol", type=float, default=5e-2, help="adapter gradients, the same comparison")
    args = p.parse_args()
    if args.tiny:
        args.shape, args.batch, args.seq, args.steps, args.warmup = "tiny", 2, 64, 2, 1
        args.no_compile, args.check_seq, args.device = True, 64, args.device or "cpu"
    args.formats = [f for f in args.formats.split(",") if f]
    if args.tiny and "int4" in args.formats:
        FORMATS["int4"] = Int4Config(group_size=64)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({os.cpu_count()} threads)"
    torch.manual_seed(0)
    if args.callback_peak:
        print(f"## Peak memory through LoRACallback(quantize=...) on {name}: Llama {args.shape} shapes, batch "
              f"{args.batch} x {args.seq}, LoRA r {args.r} on {len(PROJECTIONS)} projections, bf16-true"
              f"{', gradient checkpointing' if args.grad_ckpt else ''}\n")
        print("\n".join(callback_peak(args, device)))
        return 0

    ok, lines = check(args, device)
    print(f"## Correctness on {name}: one step over {args.check_layers} layers of {args.shape} shapes, "
          f"batch {args.check_batch} x {args.check_seq}\n")
    print("| format | loss vs bf16 LoRA on dequant(W) | adapter grads vs it | loss vs bf16 LoRA on W | "
          "adapter grads vs it | check |\n|---|---|---|---|---|---|")
    print("\n".join(lines))
    config = llama_config(args.shape, args.layers)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    results = []
    chosen = [v for v in variants(args, config, device) if not args.only or v[0] in args.only.split(";")]
    for label, make, compiled in chosen:
        if label.startswith("PEFT"):
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as err:
                results.append(Result(label, note=f"skipped: bitsandbytes does not import ({err})"))
                continue
        results.append(run(label, make, args, ids, device, compiled))
        print(f"# {results[-1]}", file=sys.stderr, flush=True)
    print(f"\n## Training steps on {name}: Llama {args.shape} shapes, {config.num_hidden_layers} layers, batch "
          f"{args.batch} x {args.seq}, LoRA r {args.r} alpha {args.alpha:g} on {len(PROJECTIONS)} projections"
          f"{', gradient checkpointing' if args.grad_ckpt else ''}, torch {torch.__version__}\n")
    print("| variant | tokens/s | first step (s) | peak memory (GiB) | note |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r.name} | {fmt(r.tokens_per_s, ',.0f')} | {fmt(r.first_step_s, '.1f')} | {fmt(r.peak_gib, '.1f')} "
              f"| {r.note} |")
    for r in results:
        if r.profile:
            print(f"\n### Profile: {r.name}\n\n{r.profile}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
