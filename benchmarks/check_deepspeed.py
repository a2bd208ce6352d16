"""LoRACallback under Lightning's DeepSpeedStrategy on 2 GPUs (NCCL): ZeRO-2 and ZeRO-3 against one GPU on the same
global batch, and the checkpoint, resume and export checks; prints PASS/FAIL per check, exits 1 on any FAIL.

Each run is ``tests/deepspeed_train.py`` (the suite's CPU test runs the same script with gloo): a tiny random Llama,
LoRA/DoRA r=4 on q/v, AdamW (a torch optimizer: no DeepSpeed JIT op is built), float32 (TF32 off by torch's default for
matmuls), 8 steps of a global batch of 8 (2 x 4 on 2 GPUs), checkpoints and exports at steps 4 and 8, ZeRO-3 with
``stage3_param_persistence_threshold=0`` so every tensor is partitioned. Checks, per method and stage:

- adapter: the final adapter export equals one GPU's (rtol 1e-4, atol 1e-5: the runs differ only in the order float32
  gradients are summed);
- zero: ZeRO-3 partitioned every parameter (the frozen base too), and ZeRO's optimizer holds the adapter only;
- checkpoint: the step-4 ``.ckpt`` holds the adapter's whole tensors (no empty ZeRO-3 placeholders) and Adam state in
  one process's layout, equal to one GPU's;
- exports: step-4/step-8 adapter exports and the merged exports (gathered one base tensor at a time) equal one GPU's;
- resume: one GPU resumes the ZeRO run's step-4 checkpoint, and ZeRO on 2 GPUs resumes one GPU's, each ending at one
  GPU's adapter;
- bf16: ZeRO-3 with precision="bf16-mixed" trains and exports float32 adapters (its distance to the float32 run is
  printed, not checked).

    python benchmarks/check_deepspeed.py --methods lora     # 2 GPUs: 8 runs (3-5 minutes); --methods dora likewise
    python benchmarks/check_deepspeed.py --accelerator cpu  # both methods on 2 CPU processes (gloo): 50 checks
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
SCRIPT = ROOT / "tests" / "deepspeed_train.py"
ADAPTER = "adapter_model.safetensors"

results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    return ok


def run(out: Path, devices: int, batch_size: int, accelerator: str, *args: str) -> bool:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cuda" if accelerator == "gpu" else "cpu"}
    if accelerator == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), "--devices", str(devices), "--batch-size", str(batch_size),
                             "--out", str(out), "--accelerator", accelerator, *args],
                            capture_output=True, text=True, timeout=900, env=env)
    print(f"      ran {' '.join(args) or 'one device'} on {devices} in {time.perf_counter() - start:.0f} s", flush=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--methods", nargs="+", default=["lora", "dora"])
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
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
          f"{pytorch_lightning.__version__}; tolerance rtol {args.rtol}, atol {args.atol}")
    root = args.out or Path(tempfile.mkdtemp(prefix="check_deepspeed-"))
    acc = args.accelerator
    for method in args.methods:
        one_dir = root / f"{method}-one"
        if not check(f"{method}: one device trains", run(one_dir, 1, 8, acc, "--method", method, "--export-merged")):
            continue
        one = load_file(one_dir / "adapter" / ADAPTER)
        for stage in args.stages:
            label = f"{method} ZeRO-{stage}"
            zero_dir = root / f"{method}-zero{stage}"
            if not check(f"{label}: 2 devices train", run(zero_dir, 2, 4, acc, "--method", method, "--stage",
                                                          str(stage), "--export-merged")):
                continue
            check(f"{label}: adapter equals one device's", *close(load_file(zero_dir / "adapter" / ADAPTER), one, tol))
            facts = json.loads((zero_dir / "facts.json").read_text())
            partitioned = facts["partitioned"] == (facts["params"] if stage == 3 else 0)
            adapter_only = facts["adapter_numel"] <= 2 * facts["optimizer_numel"] <= facts["adapter_numel"] + 64
            check(f"{label}: partitions as ZeRO-{stage} does, optimizer holds the adapter only",
                  partitioned and adapter_only, json.dumps(facts))
            saved = torch.load(ckpt(zero_dir, 4), weights_only=True)
            expected = torch.load(ckpt(one_dir, 4), weights_only=True)
            whole = all(type(v) is torch.Tensor and v.numel() > 0 for v in saved["state_dict"].values())
            ok, detail = close(saved["state_dict"], expected["state_dict"], tol)
            check(f"{label}: checkpoint holds the whole adapter only, equal to one device's", ok and whole, detail)
            check(f"{label}: checkpoint's Adam state in one process's layout, equal",
                  *close(saved["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"], tol))
            for step in (4, 8):
                check(f"{label}: step-{step} adapter export equals one device's",
                      *close(load_file(zero_dir / f"step-{step}" / "adapter" / ADAPTER),
                             load_file(one_dir / f"step-{step}" / "adapter" / ADAPTER), tol))
            from lightning_lora.sharded_export import read_merged

            check(f"{label}: merged export equals one device's",
                  *close(read_merged(zero_dir / "merged"), read_merged(one_dir / "merged"), tol))
            resumed = root / f"{method}-zero{stage}-resumed-on-one"
            if check(f"{label}: one device resumes its step-4 checkpoint",
                     run(resumed, 1, 8, acc, "--method", method, "--resume", str(ckpt(zero_dir, 4)))):
                check(f"{label}: ... and ends at one device's adapter", *close(load_file(resumed / "adapter" / ADAPTER),
                                                                            one, tol))
            resumed = root / f"{method}-zero{stage}-resumes-one"
            if check(f"{label}: resumes one device's step-4 checkpoint",
                     run(resumed, 2, 4, acc, "--method", method, "--stage", str(stage),
                         "--resume", str(ckpt(one_dir, 4)))):
                check(f"{label}: ... and ends at one device's adapter", *close(load_file(resumed / "adapter" / ADAPTER),
                                                                            one, tol))
        if 3 in args.stages and acc == "gpu":
            bf16_dir = root / f"{method}-zero3-bf16"
            if check(f"{method} ZeRO-3 bf16-mixed: 2 devices train", run(bf16_dir, 2, 4, acc, "--method", method,
                                                                         "--stage", "3", "--precision", "bf16-mixed")):
                bf16 = load_file(bf16_dir / "adapter" / ADAPTER)
                ok = bf16.keys() == one.keys() and all(v.dtype == torch.float32 and v.isfinite().all()
                                                       for v in bf16.values())
                check(f"{method} ZeRO-3 bf16-mixed: float32 adapter exported", ok,
                      f"max |diff| to the float32 run {max_diff(bf16, one):.2e} (bf16 rounding; not checked)")
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed; runs in {root}")
    if failed:
        print("FAILED: " + "; ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
