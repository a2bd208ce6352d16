"""DeepSpeed ZeRO (Lightning's ``DeepSpeedStrategy``, stages 2 and 3) with 2 CPU processes (gloo; see
``deepspeed_train.py`` for the three CUDA-only steps of Lightning 2.6.6 it replaces).

Every method of the registry, trained by one launch of the processes per stage (``deepspeed_train.ALL_RUNS``:
``ddp_train.RUNS``, as DDP and FSDP2 are tested, and more): LoRA alone; DoRA with LoRA+ (its groups split before ZeRO
flattens them); PiSSA, OLoRA, rsLoRA and gaussian DoRA as named adapters; LoRA on a tied embedding and its LM head;
every weight-update method at once as named adapters, with AdaLoRA's rank allocation and AdaLoRA's and HRA's
orthogonality regularizers (hooks that read and add gradients, which ZeRO keeps in its own partitions, not in
``.grad``); each inserted method in its own model (BitFit on a biased Llama, X-LoRA over frozen experts), with the
refusals of ``test_deepspeed_refusals_name_the_fix`` for what is not supported. Each equals one process on the same
global batch, file by file: the adapter exports at steps 4 and 8 and at the end, and the merged exports (rtol 1e-4,
atol 1e-5, as for DDP and FSDP2: the runs differ only in the order float32 gradients are summed). ZeRO-3 partitions
every tensor (adapters too) and only the adapter reaches ZeRO's optimizer; checkpoints hold whole adapter tensors
(AdaLoRA's statistics too) and Adam state in one process's layout (not ZeRO-3's empty placeholders, peft #2892), in
one file that one process resumes, and ZeRO-2 resumes one process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from test_ddp import assert_same_files  # noqa: E402  (the same file-by-file comparison as DDP's and FSDP2's)

SCRIPT = Path(__file__).with_name("deepspeed_train.py")
TOL = dict(rtol=1e-4, atol=1e-5)


def one_process(out: Path, runs: dict) -> None:
    """``deepspeed_train.py --runs`` in this process (one device: no process start, no DeepSpeed)."""
    import deepspeed_train

    deepspeed_train.main(["--devices", "1", "--batch-size", "8", "--out", str(out), "--export-merged",
                          "--runs", json.dumps(runs)])


def launch(out: Path, stage: int, runs: dict) -> subprocess.Popen:
    """``deepspeed_train.py --runs`` on 2 processes (Lightning's launcher starts the second) under ZeRO ``stage``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    out.mkdir(parents=True)
    return subprocess.Popen([sys.executable, str(SCRIPT), "--devices", "2", "--batch-size", "4", "--out", str(out),
                             "--stage", str(stage), "--export-merged", "--runs", json.dumps(runs)],
                            stdout=open(out / "log.txt", "w"), stderr=subprocess.STDOUT, env=env)


def finish(process: subprocess.Popen, out: Path) -> None:
    assert process.wait(timeout=600) == 0, (out / "log.txt").read_text()[-6000:]


def step_checkpoint(run: Path, step: int) -> Path:
    return next((run / "ckpt").glob(f"*step={step}.ckpt"))


def checkpoint(run: Path, step: int) -> dict:
    return torch.load(step_checkpoint(run, step), weights_only=True)


def test_every_method_under_zero3_and_zero2_matches_one_process(tmp_path: Path) -> None:
    """ZeRO-3 launched first, one process trains meanwhile in this process, then ZeRO-2 (which also resumes one
    process's step-4 checkpoints); then one process resumes ZeRO-3's. Every run ends at one process's files."""
    from ddp_train import WEIGHT_UPDATES
    from deepspeed_train import ALL_RUNS as runs
    one_dir, zero3_dir, zero2_dir = tmp_path / "one", tmp_path / "zero3", tmp_path / "zero2"

    def resuming(source: Path) -> dict:
        return {f"resumed-{run}": {**runs[run], "resume": str(step_checkpoint(source / run, 4))}
                for run in ("lora", "weight_updates")}

    # ZeRO-3 also loads its own step-4 checkpoints into its partitions (LLaMA-Adapter's gates have one element: the
    # last rank's partition is all padding), in later runs of the same launch
    zero3 = launch(zero3_dir, 3, {**runs, **{f"resumed-{run}": {**runs[run], "resume": str(
        zero3_dir / run / "ckpt" / "epoch=0-step=4.ckpt")} for run in ("llama_adapter", "weight_updates")}})
    one_process(one_dir, runs)
    zero2 = launch(zero2_dir, 2, {**runs, **resuming(one_dir)})
    finish(zero3, zero3_dir)
    finish(zero2, zero2_dir)
    for zero_dir in (zero3_dir, zero2_dir):
        for run in runs:  # adapter exports (steps 4, 8 and the end) and merged exports, written once by rank zero
            assert assert_same_files(zero_dir / run, one_dir / run) >= 3, (zero_dir.name, run)
    one = load_file(one_dir / "lora" / "adapter" / "adapter_model.safetensors")
    assert len(one) == 8 and any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if "lora_B" in k)
    assert sorted(p.name for p in (zero3_dir / "weight_updates" / "adapter").iterdir() if p.is_dir()) == sorted(
        WEIGHT_UPDATES)
    adalora = json.loads((zero3_dir / "weight_updates" / "adapter" / "adalora" / "adapter_config.json").read_text())
    assert sum(sum(kept) for kept in adalora["rank_pattern"].values()) == 4  # the budget shrank to target_r per layer

    facts = json.loads((zero3_dir / "lora" / "facts.json").read_text())
    assert facts["partitioned"] == facts["params"]  # ZeRO-3 partitioned every tensor, the frozen base included
    assert facts["adapter_numel"] <= 2 * facts["optimizer_numel"] <= facts["adapter_numel"] + 64  # adapter only
    facts = json.loads((zero2_dir / "resumed-lora" / "facts.json").read_text())
    assert facts["partitioned"] == 0 and 2 * facts["optimizer_numel"] >= facts["adapter_numel"]
    for zero_dir in (zero3_dir, zero2_dir):
        for run in ("lora", "weight_updates", "dora_loraplus"):
            saved, expected = checkpoint(zero_dir / run, 4), checkpoint(one_dir / run, 4)
            assert saved["state_dict"].keys() == expected["state_dict"].keys()  # the adapter only, one process's
            torch.testing.assert_close(saved["state_dict"], expected["state_dict"], **TOL)  # whole, not placeholders
            torch.testing.assert_close(saved["optimizer_states"][0], expected["optimizer_states"][0], **TOL)
        lrs = [g["lr"] for g in checkpoint(zero_dir / "dora_loraplus", 4)["optimizer_states"][0]["param_groups"]]
        assert lrs == [1e-2, 4e-2]  # LoRA+'s two groups (ZeRO-2 links the second's Adam state late: deepspeed_io)

    one_process(tmp_path / "resumed", {run: {**runs[run.removeprefix("resumed-")], **resume}
                                       for run, resume in resuming(zero3_dir).items()})
    for resumed, resumed_runs in ((tmp_path / "resumed", ("lora", "weight_updates")),
                                  (zero2_dir, ("lora", "weight_updates")), (zero3_dir, ("llama_adapter", "weight_updates"))):
        for run in resumed_runs:  # the same adapters as the run that never stopped
            assert assert_same_files(resumed / f"resumed-{run}" / "adapter", one_dir / run / "adapter") >= 1, run


def test_deepspeed_refusals_name_the_fix(tmp_path: Path) -> None:
    """What is not supported under DeepSpeed is refused in setup, naming the fix, with the model untouched: a step
    that may leave a rank's adapter tensor without a gradient (per-example adapters, LoHa/LoKr's module_dropout),
    ZeRO stages 0-1, the regional compile, a model built in configure_model under ZeRO-3, and a method's
    optimizer-step hooks (AdaLoRA) with gradient accumulation."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DeepSpeedStrategy

    import lightning_lora as ll
    from tiny_modules import ConfigureModelLlama, TinyLlamaModule

    def setup(module: pl.LightningModule, stage: int = 3, **options) -> None:
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=DeepSpeedStrategy(stage=stage), logger=False,
                             default_root_dir=tmp_path)
        options = options.get("named") or {"r": 4, "target_modules": ["q_proj"], **options}
        ll.LoRACallback(export_merged=False, **options).setup(trainer, module, "fit")

    module = TinyLlamaModule()
    named = {"a": {"r": 4, "target_modules": ["q_proj"]}, "b": {"method": "loha", "r": 4}}
    cases = [
        (dict(named={"adapters": named, "adapter_key": "task"}),
         r"adapter_key='task': a rank's batch may hold no example.*Drop adapter_key.*ddp_find_unused_parameters_true"),
        (dict(named={"adapters": {**named, "b": {**named["b"], "module_dropout": 0.1}}}),
         r"b's module_dropout skips its whole update.*set module_dropout=0"),
        (dict(stage=1), r"ZeRO stages 2 and 3.*deepspeed_stage_2.*not stage 1"),
        (dict(compile=True), r"compile=.*not tested under ZeRO.*strategy='ddp'"),
    ]
    for options, message in cases:
        with pytest.raises(ll.ConfigError, match=message):
            setup(module, **options)
        assert not ll.adapters(module.model)
    with pytest.raises(ll.ConfigError, match=r"deepspeed.zero.Init.*build the model in __init__.*deepspeed_stage_2"):
        setup(ConfigureModelLlama())
    # DeepSpeed accumulates gradients inside its step, and Lightning calls the optimizer-step hooks at every batch
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=DeepSpeedStrategy(stage=2), logger=False,
                         default_root_dir=tmp_path, accumulate_grad_batches=2)
    with pytest.raises(ll.ConfigError, match=r"accumulate_grad_batches=2: adalora runs a hook.*accumulate_grad_batches=1"):
        ll.LoRACallback("adalora", init_r=4, target_r=2, target_modules=["q_proj"], total_step=8).setup(
            trainer, module, "fit")
    assert not ll.adapters(module.model)
    ll.LoRACallback("lora", r=4, target_modules=["q_proj"]).setup(trainer, module, "fit")  # no hook: accepted
    assert ll.adapters(module.model)
