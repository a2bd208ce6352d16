"""LoRACallback under Lightning's DeepSpeedStrategy on 2 GPUs (NCCL): ZeRO-2 and ZeRO-3 against one GPU on the same
global batch, and the checkpoint, resume and export checks; prints PASS/FAIL per check, exits 1 on any FAIL.

Each launch is ``tests/deepspeed_train.py --runs`` (the suite's CPU test runs the same script with gloo), training the
chosen methods one after another in the same processes: a tiny random Llama, AdamW (a torch optimizer: no DeepSpeed JIT
op is built), float32 (TF32 off by torch's default for matmuls), 8 steps of a global batch of 8 (2 x 4 on 2 GPUs),
checkpoints and exports at steps 4 and 8, ZeRO-3 with ``stage3_param_persistence_threshold=0`` so every tensor is
partitioned. ``--methods`` names runs: ``lora`` and ``dora`` (r=4 on q/v), ``weight_updates`` (every weight-update
method of the registry at once as named adapters: LoRA, DoRA, AdaLoRA with its rank allocation, VeRA, OFT, BOFT, HRA
with its regularizer, Bone, MiSS, LoHa, LoKr), ``dora_loraplus`` (LoRA+), ``lora_inits`` (PiSSA, OLoRA, rsLoRA and
gaussian DoRA as named adapters), and each inserted method in its own model (``houlsby``, ``pfeiffer``,
``llama_adapter``, ``prefix``, ``prompt``, ``bitfit``, ``xlora``); ``all`` is every one of them. Checks, per run and
stage:

- adapter: the final adapter export equals one GPU's, each file of it (named adapters write one folder each) (rtol
  1e-4, atol 1e-5: the runs differ only in the order float32 gradients are summed);
- zero: ZeRO-3 partitioned every parameter (the frozen base too), and ZeRO's optimizer holds the adapter only;
- checkpoint: the step-4 ``.ckpt`` holds the adapter's whole tensors (no empty ZeRO-3 placeholders) and Adam state in
  one process's layout, equal to one GPU's;
- exports: step-4/step-8 adapter exports and the merged exports (gathered one base tensor at a time; mergeable
  methods) equal one GPU's, file by file;
- resume: one GPU resumes the ZeRO run's step-4 checkpoint, and ZeRO on 2 GPUs resumes one GPU's, each ending at one
  GPU's adapter;
- bf16: ZeRO-3 with precision="bf16-mixed" trains and exports float32 adapters (its distance to the float32 run is
  printed, not checked).

    python benchmarks/check_deepspeed.py --methods all      # 2 GPUs: 8 launches, every method (10-15 minutes)
    python benchmarks/check_deepspeed.py --methods lora     # 2 GPUs: 8 launches of one method (3-5 minutes)
    python benchmarks/check_deepspeed.py --accelerator cpu --methods all  # 2 CPU processes (gloo)

With ``--quantize`` every run trains over a quantized base (``LoRACallback(quantize=...)``, JSON; the tiny weights
need small NF4 blocks), and rank one starts from another base than rank zero (``--perturb-other-ranks``: rank zero's
quantized base must reach every rank; not in resumed runs, which check each rank's base fingerprint):

    python benchmarks/check_deepspeed.py --methods lora dora \
        --quantize '{"format": "nf4", "block_size": 16, "scaler_block_size": 4}'
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

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # deepspeed_train.ALL_RUNS: the runs of every method
SCRIPT = ROOT / "tests" / "deepspeed_train.py"
ADAPTER = "adapter_model.safetensors"

results: list[tuple[str, bool, str]] = []
QUANTIZE: list[str] = []  # deepspeed_train.py's arguments for --quantize


def check(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    return ok


def run(out: Path, devices: int, batch_size: int, accelerator: str, *args: str) -> bool:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cuda" if accelerator == "gpu" else "cpu"}
    if accelerator == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    # over a quantized base rank one starts from another base, except when resuming (each rank checks its own
    # base's fingerprint against the checkpoint's)
    perturb = QUANTIZE and devices > 1 and not any("resume" in a for a in args)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), "--devices", str(devices), "--batch-size", str(batch_size),
                             "--out", str(out), "--accelerator", accelerator, *args, *QUANTIZE,
                             *(["--perturb-other-ranks"] if perturb else [])],
                            capture_output=True, text=True, timeout=900, env=env)
    shown = [a if not a.startswith("{") else "{" + ", ".join(json.loads(a)) + "}" for a in args]  # JSON: its keys
    print(f"      ran {' '.join(shown) or 'one device'} on {devices} in {time.perf_counter() - start:.0f} s",
          flush=True)
    if result.returncode != 0:
        print(result.stdout[-4000:] + result.stderr[-6000:])
    return result.returncode == 0


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference over the tensors of two (nested) dicts with the same keys."""
    diffs = [max_diff(a[k], v) if isinstance(v, dict) else float((a[k].float() - v.float()).abs().max())
             for k, v in b.items() if isinstance(v, (dict, torch.Tensor))]
    return max(diffs, default=0.0)


def on_cpu(d: dict) -> dict:
    """The same nested dict with its tensors on the CPU: a one-GPU checkpoint keeps CUDA tensors, ours CPU ones."""
    return {k: on_cpu(v) if isinstance(v, dict) else v.cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def close(a: dict, b: dict, tol: dict) -> tuple[bool, str]:
    a, b = on_cpu(a), on_cpu(b)
    if a.keys() != b.keys():
        return False, f"keys differ: {sorted(set(a) ^ set(b))[:4]}"
    try:
        torch.testing.assert_close(a, b, **tol)
    except AssertionError as err:
        return False, str(err).splitlines()[0]
    return True, f"max |diff| {max_diff(a, b):.2e}"


def ckpt(run_dir: Path, step: int) -> Path:
    return next((run_dir / "ckpt").glob(f"*step={step}.ckpt"))


def run_names() -> list[str]:
    from deepspeed_train import ALL_RUNS

    return list(dict.fromkeys(["lora", "dora", *ALL_RUNS]))


def method_runs(methods: list[str]) -> dict[str, dict]:
    """deepspeed_train.py ``--runs`` entries for ``--methods``: LoRA/DoRA alone on q/v, and the rest as
    ``tests/deepspeed_train.py``'s ``ALL_RUNS`` hold them (the runs the suite's test trains)."""
    from deepspeed_train import ALL_RUNS

    names = run_names() if "all" in methods else methods
    unknown = sorted(set(names) - set(run_names()))
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; choose from {', '.join(run_names())} or all")
    return {name: {"method": name} if name in ("lora", "dora") else ALL_RUNS[name] for name in names}


def runs_args(runs: dict[str, dict]) -> list[str]:
    return ["--export-merged", "--runs", json.dumps(runs)]


def same_files(got: Path, expected: Path, tol: dict) -> tuple[bool, str]:
    """Every safetensors file under ``expected`` is under ``got`` with close tensors (``close`` per file)."""
    files = sorted(p.relative_to(expected) for p in expected.rglob("*.safetensors"))
    if files != sorted(p.relative_to(got) for p in got.rglob("*.safetensors")):
        return False, f"files differ: {[str(f) for f in files][:6]}"
    worst = 0.0
    for name in files:
        ok, detail = close(load_file(got / name), load_file(expected / name), tol)
        if not ok:
            return False, f"{name}: {detail}"
        worst = max(worst, max_diff(load_file(got / name), load_file(expected / name)))
    return bool(files), f"{len(files)} files, max |diff| {worst:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--methods", nargs="+", default=["lora", "dora"],
                        help=f"runs: {', '.join(run_names())} or all (module docstring)")
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--quantize", type=json.loads, default=None,
                        help='LoRACallback(quantize=...) for every run, as JSON: \'{"format": "nf4", ...}\'')
    args = parser.parse_args()
    if args.quantize is not None:
        QUANTIZE[:] = ["--options", json.dumps({"quantize": args.quantize})]
    tol = dict(rtol=args.rtol, atol=args.atol)
    import deepspeed
    import pytorch_lightning

    if args.accelerator == "gpu":
        if torch.cuda.device_count() < 2:
            sys.exit(f"check_deepspeed needs 2 GPUs, found {torch.cuda.device_count()} (--accelerator cpu runs gloo)")
        device = torch.cuda.get_device_name(0)
    else:
        device = "CPU (gloo)"
    print(f"device {device}; torch {torch.__version__}, deepspeed {deepspeed.__version__}, pytorch-lightning "
          f"{pytorch_lightning.__version__}; tolerance rtol {args.rtol}, atol {args.atol}; quantize {args.quantize}")
    root = args.out or Path(tempfile.mkdtemp(prefix="check_deepspeed-"))
    acc = args.accelerator
    runs = method_runs(args.methods)
    one_dir = root / "one"
    if not check("one device trains " + ", ".join(runs), run(one_dir, 1, 8, acc, *runs_args(runs))):
        sys.exit(1)
    for stage in args.stages:
        zero_dir = root / f"zero{stage}"
        if not check(f"ZeRO-{stage}: 2 devices train", run(zero_dir, 2, 4, acc, "--stage", str(stage),
                                                          *runs_args(runs))):
            continue
        for name in runs:
            label = f"{name} ZeRO-{stage}"
            check(f"{label}: adapter equals one device's", *same_files(zero_dir / name / "adapter",
                                                                        one_dir / name / "adapter", tol))
            facts = json.loads((zero_dir / name / "facts.json").read_text())
            partitioned = facts["partitioned"] == (facts["params"] if stage == 3 else 0)
            adapter_only = facts["adapter_numel"] <= 2 * facts["optimizer_numel"] <= facts["adapter_numel"] + 64
            check(f"{label}: partitions as ZeRO-{stage} does, optimizer holds the adapter only",
                  partitioned and adapter_only, json.dumps(facts))
            saved = torch.load(ckpt(zero_dir / name, 4), weights_only=True)
            expected = torch.load(ckpt(one_dir / name, 4), weights_only=True)
            whole = all(type(v) is torch.Tensor and v.numel() > 0 for v in saved["state_dict"].values())
            ok, detail = close(saved["state_dict"], expected["state_dict"], tol)
            check(f"{label}: checkpoint holds the whole adapter only, equal to one device's", ok and whole, detail)
            check(f"{label}: checkpoint's Adam state in one process's layout, equal",
                  *close(saved["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"], tol))
            check(f"{label}: step-4/step-8 and merged exports equal one device's",
                  *same_files(zero_dir / name, one_dir / name, tol))
        for devices, source, what in ((1, zero_dir, "one device resumes its step-4 checkpoints"),
                                      (2, one_dir, "resumes one device's step-4 checkpoints")):
            resumed = root / f"zero{stage}-resumed-on-{devices}"
            resume = {name: {**spec, "resume": str(ckpt(source / name, 4))} for name, spec in runs.items()}
            if check(f"ZeRO-{stage}: {what}", run(resumed, devices, 8 // devices, acc,
                                                   *(["--stage", str(stage)] if devices == 2 else []),
                                                   *runs_args(resume))):
                for name in runs:
                    check(f"{name} ZeRO-{stage}: {what}, ending at one device's adapter",
                          *same_files(resumed / name / "adapter", one_dir / name / "adapter", tol))
    if 3 in args.stages and acc == "gpu":
        bf16_dir = root / "zero3-bf16"
        if check("ZeRO-3 bf16-mixed: 2 devices train", run(bf16_dir, 2, 4, acc, "--stage", "3", "--precision",
                                                           "bf16-mixed", *runs_args(runs))):
            for name in runs:
                files = sorted((one_dir / name / "adapter").rglob(ADAPTER))
                bf16 = {f"{f.parent.name}/{k}": v for f in files
                        for k, v in load_file(bf16_dir / name / f.relative_to(one_dir / name)).items()}
                one = {f"{f.parent.name}/{k}": v for f in files for k, v in load_file(f).items()}
                ok = bf16.keys() == one.keys() and all(v.dtype == torch.float32 and v.isfinite().all()
                                                       for v in bf16.values())
                check(f"{name} ZeRO-3 bf16-mixed: float32 adapter exported", ok,
                      f"max |diff| to the float32 run {max_diff(bf16, one):.2e} (bf16 rounding; not checked)")
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed; runs in {root}")
    if failed:
        print("FAILED: " + "; ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
