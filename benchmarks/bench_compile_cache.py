"""Time to the first training step of the same job run again: ``Trainer.fit`` with ``LoRACallback`` (compile on, the
compile cache file kept), each row in its own new process, as a user's runs are.

Rows (1B Llama shapes, bf16, batch 4 x 2048, LoRA r16 on all linear layers, fused AdamW):
- ``eager``: ``compile=False``; the floor (setup, injection, the first step's CUDA/cuBLAS start-up).
- ``cold``: empty Inductor and Triton caches; compiles, then writes ``compile_cache.bin``.
- ``warm from the file``: empty Inductor and Triton caches again (a new machine or container), the file loaded.
- ``second run, same machine``: Inductor's and Triton's default cache folders, filled by the run before it (not
  shown), as on a user's own machine (the file is loaded too, and adds nothing they lack).
Each row prints Inductor's FX graph cache and AOTAutograd cache hits/misses: a warm row must hit, and miss nothing.
The first step is timed from the ``Trainer``'s construction to the end of the first ``training_step``'s batch.

``--keep-bytecode``: the rows run as a default Python does, writing and reusing ``.pyc`` files (into a folder of their
own, ``PYTHONPYCACHEPREFIX``), for images that set ``PYTHONDONTWRITEBYTECODE=1``: there every new process compiles
the sources of the modules the compile imports lazily (Inductor's above all) again, seconds of the warm first step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {"eager": "eager", "cold": "fresh", "warm from the file": "fresh", "(fills the default cache folders)": "same",
        "second run, same machine": "same"}


def child(mode: str, cache: str, layers: int, steps: int, out: str) -> None:
    """One run of the job in this process; writes its first step time and cache counters to ``out`` (JSON)."""
    if mode == "fresh":  # before torch is imported: a cache folder of its own, as on a new machine
        folder = tempfile.mkdtemp(prefix="bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _models import LLAMA_1B, build_base, llama_config

    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    import lightning_lora as ll

    config = llama_config(LLAMA_1B, layers)
    ids = torch.randint(0, config.vocab_size, (4, 2048), generator=torch.Generator().manual_seed(0))
    ends: list[float] = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_base(config, torch.bfloat16, "cuda", seed=0)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4, fused=True)

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            ends.append(time.perf_counter())

    module = Module()
    start = time.perf_counter()
    compile_option = False if mode == "eager" else {"enabled": True, "cache": cache}
    callback = ll.LoRACallback("lora", r=16, alpha=32, target_modules="all-linear", export_dir=tempfile.mkdtemp(),
                               export_merged=False, compile=compile_option)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=steps, callbacks=[callback, Clock()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, torch.utils.data.DataLoader([ids] * steps, batch_size=None))
    counters = torch._dynamo.utils.counters
    Path(out).write_text(json.dumps({
        "card": torch.cuda.get_device_name(), "first_step_s": ends[0] - start,
        "step_ms": (ends[-1] - ends[-2]) * 1e3 if len(ends) > 1 else None,
        "fx hit/miss": f"{counters['inductor'].get('fxgraph_cache_hit', 0)}/"
                       f"{counters['inductor'].get('fxgraph_cache_miss', 0)}",
        "aot hit/miss": f"{counters['aot_autograd'].get('autograd_cache_hit', 0)}/"
                        f"{counters['aot_autograd'].get('autograd_cache_miss', 0)}",
        "cache file bytes": os.path.getsize(cache) if os.path.exists(cache) else 0}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the 1B's 16)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--keep-bytecode", action="store_true",
                   help="write and reuse .pyc files across the rows, as a default Python install does")
    p.add_argument("--child", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.cache, args.layers, args.steps, args.child[1])
        return 0
    folder = tempfile.mkdtemp(prefix="bench_compile_cache_")
    cache = os.path.join(folder, "compile_cache.bin")
    env = dict(os.environ)
    if args.keep_bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(folder, "pyc")
    rows = []
    order = ({"(writes the .pyc files, as pip install does)": "eager"} if args.keep_bytecode else {}) | ROWS
    for name, mode in order.items():
        out = os.path.join(folder, "row.json")
        cmd = [sys.executable, __file__, "--child", mode, out, "--cache", cache, "--steps", str(args.steps)]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{name}: FAILED ({done.returncode})\n{done.stderr[-2000:]}")
            return 1
        rows.append((name, json.loads(Path(out).read_text())))
    print(f"\n.pyc files: {'written and reused' if args.keep_bytecode else 'as the environment says'} "
          f"(PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})")
    print(f"\n| run (new process each) | card | first step | step | FX cache hit/miss | AOT cache hit/miss |")
    print("|---|---|---:|---:|---|---|")
    for name, r in rows:
        if name.startswith("("):
            continue
        step = f"{r['step_ms']:.0f} ms" if r["step_ms"] else "—"
        print(f"| {name} | {r['card']} | {r['first_step_s']:.1f} s | {step} | {r['fx hit/miss']} | {r['aot hit/miss']} |")
    warm = [r for name, r in rows if name in ("warm from the file", "second run, same machine")]
    ok = all(r["fx hit/miss"].split("/")[1] == "0" and r["fx hit/miss"].split("/")[0] != "0" for r in warm)
    print("warm rows hit the cache and miss nothing:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
