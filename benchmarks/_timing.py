"""Timing of training steps: one ``Variant`` (library, method, how it is compiled, memory options) built fresh from the
same seed on the same batch, its median step time, peak memory and the time to the end of its first step.

Compile modes:
- ``""``: eager;
- ``"model"``: ``torch.compile(model, dynamic=False)``, the whole model (what a user does by hand);
- ``"regional"``: ``lightning_lora.plugins.compile.compile_regions``, the code the callback runs (each decoder block
  compiled in place, ``use_cache`` off, one training graph for all blocks), with the callback's compile cache: the
  artifacts are saved after the first step (``--save-cache``) or loaded before it (``--load-cache``);
- ``"fit"``: a real ``Trainer.fit`` with ``LoRACallback`` (its default ``compile=None``: on for CUDA), timed by a
  callback around each training batch.

A compiled variant gets a fresh, empty Inductor/Triton cache folder, so its first step is a cold compile unless it
loads the compile cache (``"warm"`` rows run in a new process, see ``bench_lora.run_warm``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from _memory_options import causal_lm_parts, fused_linear_cross_entropy, selective_checkpointing
from _models import build_base, free, param_dtypes, sync, wrap_ours, wrap_peft
from _profile import profile_steps


@dataclass
class Variant:
    name: str
    lib: str  # "peft", "ours" or "full"
    method: str = "lora"
    compile: str = ""  # "", "model", "regional", "fit"
    bf16_adapters: bool = False  # cast the adapter weights to bf16 (both libraries default to fp32)
    dropout: float = 0.0  # the adapters' dropout on their input (LoRA's lora_dropout)
    fused_ce: bool = False  # _memory_options.fused_linear_cross_entropy instead of HF's loss
    sac: bool = False  # _memory_options.selective_checkpointing
    warm: bool = False  # run in a new process that loads the compile cache the cold row saved
    uniform_grad: bool = True  # regional: layer 0's input requires grad too (one training graph, not two)
    optional: bool = False


@dataclass
class Result:
    variant: Variant
    device: str = ""
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
    graphs: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "variant"}


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


def fresh_compile_caches() -> str:
    """Point Inductor and Triton at an empty folder: the next compile is cold (nothing from earlier variants)."""
    fresh = tempfile.mkdtemp(prefix="bench_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
    os.environ["TRITON_CACHE_DIR"] = os.path.join(fresh, "triton")
    try:  # artifacts recorded for the compile cache file: this variant's only
        from torch.compiler._cache import CacheArtifactManager

        CacheArtifactManager.clear()
    except (ImportError, AttributeError):
        pass
    return fresh


def _loss_fn(model: nn.Module, v: Variant):
    """The step's loss: HF's own ``model(input_ids, labels).loss``, or the fused linear cross-entropy."""
    if not v.fused_ce:
        return lambda fn, ids: fn(input_ids=ids, labels=ids).loss
    decoder, head = causal_lm_parts(model)
    return lambda fn, ids: fused_linear_cross_entropy(decoder(input_ids=ids).last_hidden_state, head.weight, ids)


def run_variant(v: Variant, args, config, ids: torch.Tensor, device: str) -> Result:
    """Build, (compile,) and time ``v``: ``args.warmup`` untimed steps (the first timed from setup), then
    ``args.steps`` timed ones."""
    if v.compile == "fit":
        return run_fit_variant(v, args, config, ids, device)
    from lightning_lora.plugins.compile import CompilePolicy, compile_regions, load_cache, save_cache

    res = Result(v, device=torch.cuda.get_device_name() if device.startswith("cuda") else device)
    free(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if v.compile and not args.warm_cache:
        fresh_compile_caches()
    model = build_base(config, torch.bfloat16, device, seed=0)
    sync(device)
    t0 = time.perf_counter()
    if v.warm and args.load_cache:
        res.extra["cache_loaded"] = load_cache(_path(args.load_cache))
    if v.lib == "peft":
        model = wrap_peft(model, v.method, args.r, args.alpha, v.bf16_adapters, dropout=v.dropout)
    elif v.lib == "ours":
        model = wrap_ours(model, v.method, args.r, args.alpha, v.bf16_adapters, dropout=v.dropout)
    else:
        model.requires_grad_(True)
    if v.sac:
        selective_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    res.trainable = sum(p.numel() for p in params)
    res.dtypes = param_dtypes(params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))
    fn, regions = model, None
    if v.compile == "model":
        fn = torch.compile(model, dynamic=False)
    elif v.compile == "regional":
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        regions = compile_regions(target, CompilePolicy(enabled=True), uniform_input_grad=v.uniform_grad)
    loss_of = _loss_fn(model, v)
    sync(device)
    res.setup_s = time.perf_counter() - t0

    def step() -> torch.Tensor:
        loss = loss_of(fn, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    sync(device)
    res.first_step_s = time.perf_counter() - t0
    if regions is not None and args.save_cache and not v.warm:
        res.extra["cache_saved"] = save_cache(_path(args.save_cache))
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
    counters = torch._dynamo.utils.counters
    res.graph_breaks = sum(counters["graph_break"].values()) if v.compile else 0
    res.graphs = counters["stats"].get("unique_graphs", 0) if v.compile else 0
    if v.compile:
        res.extra.update(cache_hits(counters))
    if args.profile and v.method == "lora" and v.lib != "full" and (not v.compile or args.profile_compiled):
        profile_steps(v.name, step, device, args)
    if regions is not None:
        regions.restore()
    del fn, model, opt, params
    if v.compile:
        torch._dynamo.reset()
    free(device)
    return res


def cache_hits(counters) -> dict:
    """Inductor FX graph cache and AOTAutograd cache hits/misses of this variant (a warm start hits, a cold one
    misses)."""
    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx cache hit/miss": f"{inductor.get('fxgraph_cache_hit', 0)}/{inductor.get('fxgraph_cache_miss', 0)}",
            "aot cache hit/miss": f"{aot.get('autograd_cache_hit', 0)}/{aot.get('autograd_cache_miss', 0)}"}


def _path(name: str):
    from pathlib import Path

    return Path(name)


def run_fit_variant(v: Variant, args, config, ids: torch.Tensor, device: str) -> Result:
    """The callback's own path: ``Trainer.fit`` of a LightningModule around the base model with ``LoRACallback``
    (compile at its default: on for CUDA), timed around each training batch."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    import lightning_lora as ll

    res = Result(v, device=torch.cuda.get_device_name() if device.startswith("cuda") else device)
    free(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if not args.warm_cache:
        fresh_compile_caches()
    times: list[float] = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_base(config, torch.bfloat16, device, seed=0)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4,
                                     fused=device.startswith("cuda"))

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(device)
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(device)
            now = time.perf_counter()
            if batch_idx == 0:
                res.first_step_s = now - t0
            times.append(now - self.t)
            res.loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)

    module = Module()
    sync(device)
    t0 = time.perf_counter()
    export = tempfile.mkdtemp(prefix="bench_fit_")
    cache = args.load_cache if v.warm else args.save_cache  # enabled None: the callback's default (CUDA only)
    compile_option = {"enabled": None, "cache": cache} if cache else None
    callback = ll.LoRACallback(v.method, r=args.r, alpha=args.alpha, target_modules="all-linear",
                               export_dir=export, export_merged=False, compile=compile_option)
    steps = max(args.warmup, 1) + args.steps
    trainer = pl.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=steps,
                         callbacks=[callback, Clock()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=export)
    data = torch.utils.data.DataLoader([ids.cpu()] * steps, batch_size=None)
    trainer.fit(module, data)
    timed = times[max(args.warmup, 1):]
    med = statistics.median(timed)
    res.step_ms, res.spread_ms = med * 1e3, (max(timed) - min(timed)) * 1e3
    res.tokens_per_s = ids.numel() / med
    if device.startswith("cuda"):
        res.peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    params = [p for p in module.parameters() if p.requires_grad]
    res.trainable, res.dtypes = sum(p.numel() for p in params), param_dtypes(params)
    res.graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    res.graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
    res.extra.update(cache_hits(torch._dynamo.utils.counters))
    res.note = "compiled by the callback" if device.startswith("cuda") else "eager (callback default on CPU)"
    del trainer, module, callback
    torch._dynamo.reset()
    free(device)
    return res
